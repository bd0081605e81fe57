"""The package as users install it: a wheel built from a clean copy of the tree, installed into fresh virtual
environments that see nothing of this one (no --system-site-packages, never run from the repository).

* The base install is the light client: no torch; EncoderClient's info / features / F2I / usage work against a
  server, and the console scripts whose extra is missing say which one to install (exit 2).
* With every role's extra (slow: it installs torch and the rest, about a minute): every console script runs, and
  a server started from that environment answers the light client.

pip resolves the dependencies through its configured indexes, as `make setup` does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

from reaas_client import EncoderClient
from reaas_client.background_server import background_server
from reaas_server import ServedEncoder, ServerConfig, run_server
from tests.numerics import assert_same_features

REPO = Path(__file__).resolve().parents[2]
# what a clean checkout has beside the package sources, and what building needs none of
_NOT_SOURCES = {".git", ".venv", "build", "reaas", "runs", "tests", "benchmarks", "examples", ".pytest_cache",
                ".ruff_cache", ".whl", "node_modules"}

LIGHT_CLIENT = """
import importlib.util, json, sys
import numpy as np
from reaas_client import EncoderClient

address, images_path = sys.argv[1:]
images = np.load(images_path)
with EncoderClient(address, timeout_s=60) as client:
    info = client.info()
    features = client.features(images, input_ids=[f"x{i}" for i in range(len(images))])
    radii = client.f2i_perturb(images, [0.5] * len(images)).image_radius
    usage = client.usage()
print(json.dumps({
    "torch_found": importlib.util.find_spec("torch") is not None,
    "torch_loaded": "torch" in sys.modules,
    "reaas_client": importlib.util.find_spec("reaas_client").origin,
    "feature_dim": info.feature_dim,
    "features": features.tolist(),
    "radii": radii.tolist(),
    "queries": usage.total_queries,
}))
"""


def _environment() -> dict[str, str]:
    """This process's environment without what would let a child import from the repository."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _run(args: list[str], cwd: Path, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=timeout_s)


def _fresh_venv(path: Path, requirement: str) -> Path:
    """A new virtual environment at ``path`` with ``requirement`` pip-installed; its python."""
    venv.EnvBuilder(with_pip=True).create(path)
    python = path / "bin" / "python"
    install = _run([str(python), "-m", "pip", "install", "-q", requirement], cwd=path, timeout_s=540)
    assert install.returncode == 0, install.stderr[-3000:]
    return python


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of the tree as a fresh clone has it (no generated reaas/, no build/), built by pip with
    this environment's setuptools and grpcio-tools (--no-build-isolation: nothing downloaded to build)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(REPO, source, ignore=lambda folder, names: (
        [n for n in names if n in _NOT_SOURCES or n.endswith(".egg-info")] if Path(folder) == REPO else
        [n for n in names if n == "__pycache__"]))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  str(work / "dist"), str(source)], cwd=work)
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = (work / "dist").glob("reaas-*.whl")
    return path


@pytest.fixture(scope="module")
def light_python(wheel, tmp_path_factory) -> Path:
    return _fresh_venv(tmp_path_factory.mktemp("light") / "venv", str(wheel))


def _light_client_call(python: Path, address: str, images: np.ndarray, work: Path) -> dict:
    np.save(work / "images.npy", images)
    (work / "light_client.py").write_text(LIGHT_CLIENT)
    called = _run([str(python), str(work / "light_client.py"), address, str(work / "images.npy")], cwd=work)
    assert called.returncode == 0, called.stderr[-3000:]
    return json.loads(called.stdout)


def _images(count: int) -> np.ndarray:
    return np.random.default_rng(0).random((count, 1, 28, 28), dtype=np.float32)


def test_the_light_client_wheel_calls_features_and_f2i_without_torch(light_python, tmp_path):
    images = _images(6)
    encoder = ServedEncoder.load(None, "cpu")
    with run_server(ServerConfig(port=0, mode="reaas", max_batch_size=64), encoder) as (_, port):
        address = f"127.0.0.1:{port}"
        reply = _light_client_call(light_python, address, images, tmp_path)
        with EncoderClient(address) as client:
            expected = client.features(images)
    assert not reply["torch_found"] and not reply["torch_loaded"]
    assert Path(reply["reaas_client"]).is_relative_to(light_python.parents[1])  # the wheel's, not the tree's
    features = np.array(reply["features"], dtype=np.float32)
    assert features.shape == (6, reply["feature_dim"])
    assert_same_features(features, expected)
    assert len(reply["radii"]) == 6 and all(r > 0 for r in reply["radii"])
    assert reply["queries"] == 12  # 6 Feature + 6 F2IPerturb, the server's own count


def test_the_light_client_wheels_scripts_name_the_missing_extra(light_python, tmp_path):
    bin_dir = light_python.parent
    for script, extra in [("reaas-server", "server"), ("reaas-certify", "certify"), ("reaas-pretrain", "pretrain")]:
        result = _run([str(bin_dir / script), "--help"], cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and f"pip install 'reaas[{extra}]'" in result.stderr
    keys = _run([str(bin_dir / "reaas-keys"), "--ledger", str(tmp_path / "ledger.sqlite3"), "list"], cwd=tmp_path)
    assert keys.returncode == 0, keys.stderr
    assert "no keys issued" in keys.stdout


@pytest.mark.slow
def test_the_full_wheel_runs_every_script_and_serves_the_light_client(wheel, light_python, tmp_path, monkeypatch):
    python = _fresh_venv(tmp_path / "venv", f"{wheel}[server,certify,pretrain]")
    for script in ("reaas-server", "reaas-keys", "reaas-certify", "reaas-pretrain"):
        result = _run([str(python.parent / script), "--help"], cwd=tmp_path)
        assert result.returncode == 0, f"{script}: {result.stderr[-3000:]}"
        assert f"usage: {script}" in result.stdout
    monkeypatch.chdir(tmp_path)  # `python -m reaas_server.cli` must not find the repository's reaas_server
    with background_server("reaas", python=str(python), log_path=tmp_path / "server.log",
                           extra_args=("--demo-kind", "pca")) as address:
        reply = _light_client_call(light_python, address, _images(4), tmp_path)
    assert np.array(reply["features"]).shape == (4, reply["feature_dim"])
    assert reply["queries"] == 8
