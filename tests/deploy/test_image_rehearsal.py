"""The image's two build-time assumptions, rehearsed without Docker (none runs here).

* The files the Dockerfile's build stage copies are enough to build the wheel, and building it generates reaas/v1
  (a module added to the project but not to those COPY lines would be missing from the image).
* The runtime stage's layout serves: the default ENCODER copied to /models/encoder.{safetensors,json} is a checkpoint
  that `reaas-server --checkpoint /models/encoder` (the image's CMD) loads, and the image's HEALTHCHECK command
  then passes.
"""

from __future__ import annotations

import configparser
import json
import shlex
import shutil
import subprocess
import sys
import zipfile

from deploy_files import DEPLOY, ROOT, dockerfile_arg_defaults, dockerfile_stages

from reaas_client.background_server import background_server


def build_stage_copies() -> list[str]:
    """The context paths the build stage (the first) copies."""
    return [source for op, args in dockerfile_stages()[0] if op == "COPY" for source in shlex.split(args)[:-1]]


def test_the_build_stage_copies_build_a_wheel_with_generated_protobuf_code(tmp_path):
    context = tmp_path / "src"
    for source in build_stage_copies():
        target = context / source
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / source, target)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(context)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("reaas-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    packages = [p for p in setup["options.packages.find"]["include"].split() if "*" not in p]
    # a package the project declares but the COPY lines miss would silently drop out of the wheel
    assert {f"{package}/__init__.py" for package in packages} <= names
    assert {"reaas/v1/encoder_service_pb2.py", "reaas/v1/encoder_service_pb2_grpc.py", "reaas_scripts.py",
            "robust_pretrain/assets/demo_pca.safetensors"} <= names
    assert not (context / "reaas").exists()  # generated in the build, never copied in


def test_the_default_encoder_at_the_images_path_serves_and_passes_the_healthcheck(tmp_path):
    runtime = dockerfile_stages()[-1]
    encoder = dockerfile_arg_defaults()["ENCODER"]
    models = tmp_path / "models"  # the image's /models
    models.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy2(ROOT / f"{encoder}{suffix}", models / f"encoder{suffix}")
    command = json.loads(next(args for op, args in runtime if op == "CMD"))
    assert command[command.index("--checkpoint") + 1] == "/models/encoder"
    healthcheck = json.loads(next(args for op, args in runtime if op == "HEALTHCHECK").split("CMD", 1)[1])
    assert healthcheck[:2] == ["python", "/opt/reaas/healthcheck.py"]
    with background_server("reaas", checkpoint=models / "encoder", log_path=tmp_path / "server.log") as address:
        probe = healthcheck[2:]
        probe[probe.index("--address") + 1] = address  # the image probes 127.0.0.1:50051; here a free port
        result = subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), *probe],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
