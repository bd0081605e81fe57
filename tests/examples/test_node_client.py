"""examples/node_client: a Node client built from the .proto alone agrees with the Python client bit for bit.

Runs when `node` is on PATH; installs the client's pinned packages with `npm ci` when they are missing, and
skips (saying why) when that is not possible.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from bounds import SAFETY_MARGIN
from reaas.v1 import encoder_service_pb2 as pb
from reaas.v1 import encoder_service_pb2_grpc as pb_grpc
from reaas_client import EncoderClient, encode_tensor
from reaas_client.retry import RETRY_PUSHBACK_HEADER
from reaas_server import ServedEncoder, ServerConfig, run_server
from reaas_server.ledger import UsageLedger

NODE_CLIENT = Path(__file__).resolve().parents[2] / "examples" / "node_client"
INSTALL = "npm ci --prefix examples/node_client"
FEATURE_RADII = [0.0, 0.05, 0.1, 0.5, 1.0, 2.0]


@pytest.fixture(scope="module")
def node_client() -> list[str]:
    """The command that runs client.js, after installing its packages if they are missing."""
    node = shutil.which("node")
    if node is None:
        pytest.skip(f"`node` is not on PATH: install Node.js >= 18.3, then `{INSTALL}`")
    if not (NODE_CLIENT / "node_modules" / ".package-lock.json").is_file():  # npm writes it last
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip(f"examples/node_client/node_modules is missing and `npm` is not on PATH: `{INSTALL}`")
        try:
            install = [npm, "ci", "--prefix", str(NODE_CLIENT), "--prefer-offline", "--no-audit", "--no-fund"]
            subprocess.run(install, check=True, capture_output=True, text=True, timeout=180)
        except subprocess.CalledProcessError as error:
            first_lines = " | ".join(error.stderr.strip().splitlines()[:3])
            pytest.skip(f"`{INSTALL}` failed (registry unreachable?): {first_lines}")
        except subprocess.TimeoutExpired:
            pytest.skip(f"`{INSTALL}` took over 180 s (registry unreachable?)")
    return [node, str(NODE_CLIENT / "client.js")]


@pytest.fixture(scope="module")
def ledger(tmp_path_factory) -> tuple[Path, str]:
    """A ledger that issued one key (so the server requires it): its path and the key."""
    path = tmp_path_factory.mktemp("node-ledger") / "ledger.sqlite3"
    keys = UsageLedger(path)
    secret = keys.add_key("node-test")
    keys.close()
    return path, secret


@pytest.fixture(scope="module")
def api_key(ledger) -> str:
    return ledger[1]


@pytest.fixture(scope="module")
def address(ledger):
    config = ServerConfig(port=0, max_batch_size=4, ledger_path=ledger[0])  # 6 images: 2 requests
    with run_server(config, ServedEncoder.load(None, "cpu")) as (_, port):
        yield f"127.0.0.1:{port}"


@pytest.fixture()
def images(address, api_key) -> np.ndarray:
    """Seeded in-range pixels, [6, C, H, W] float32."""
    with EncoderClient(address, api_key=api_key) as client:
        shape = client.info().input_shape
    return np.random.default_rng(7).random((len(FEATURE_RADII), *shape), dtype=np.float32)


def run_node(command: list[str], address: str, images: np.ndarray, tmp_path: Path, *extra: str):
    path = tmp_path / "images.f32"
    images.astype("<f4").tofile(path)
    return subprocess.run([*command, "--address", address, "--images", str(path), *extra],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("bound", ["", "ibp"], ids=["default_bound", "ibp"])
def test_node_client_matches_python_client(node_client, address, api_key, images, tmp_path, bound):
    radii_flag = ",".join(map(str, FEATURE_RADII))
    done = run_node(node_client, address, images, tmp_path,
                    "--api-key", api_key, "--feature-radii", radii_flag, "--bound", bound)
    assert done.returncode == 0, done.stderr
    node = json.loads(done.stdout)
    with EncoderClient(address, api_key=api_key) as client:
        info = client.info()
        features = client.features(images)
        reply = client.f2i_perturb(images, FEATURE_RADII, bound=bound)  # a list travels in float64 too

    assert node["info"]["default_bound"] == info.default_bound
    assert node["info"]["lipschitz_upper"] == info.lipschitz_upper
    node_features = np.asarray(node["features"], dtype=np.float32)  # JSON numbers hold each float32 exactly
    np.testing.assert_array_equal(node_features.view(np.uint32), features.view(np.uint32))
    assert [r["image_radius"] for r in node["radii"]] == reply.image_radius.tolist()
    assert [r["bound"] for r in node["radii"]] == list(reply.bound)
    assert [r["search_steps"] for r in node["radii"]] == reply.search_steps.tolist()
    # the contract's closed form, safety margin included
    for radius, feature_radius in zip(node["radii"], FEATURE_RADII, strict=True):
        if radius["bound"] == "lipschitz" and radius["search_steps"] == 0:
            expected = feature_radius * (1 - SAFETY_MARGIN) / info.lipschitz_upper
            assert radius["image_radius"] == pytest.approx(expected, rel=1e-12, abs=0)


def test_64_concurrent_calls_of_one_key_are_all_answered_without_a_refusal(node_client, address, api_key, tmp_path):
    """Issue 22: a raw client with 64 calls in flight is queued by admission, not refused (the server's limit on
    one key's running calls makes the rest wait their turn)."""
    many = np.random.default_rng(8).random((256, 1, 28, 28), dtype=np.float32)  # 64 requests of 4 images
    done = run_node(node_client, address, many, tmp_path, "--api-key", api_key, "--concurrency", "64")
    assert done.returncode == 0, done.stderr
    node = json.loads(done.stdout)
    assert node["retried_busy"] == 0
    with EncoderClient(address, api_key=api_key) as client:
        expected = client.features(many)
    np.testing.assert_array_equal(np.asarray(node["features"], dtype=np.float32).view(np.uint32),
                                  expected.view(np.uint32))


def test_node_client_sends_the_api_key(node_client, address, images, tmp_path):
    done = run_node(node_client, address, images, tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("UNAUTHENTICATED")


class _RefusingEncoder(pb_grpc.EncoderServiceServicer):
    """Refuses the first `refusals` Feature calls with RESOURCE_EXHAUSTED (with `pushback_ms` as the retry
    hint when given), then answers ones."""

    def __init__(self, refusals: int, pushback_ms: str | None) -> None:
        self.refusals = refusals
        self.pushback_ms = pushback_ms
        self.feature_calls = 0

    def GetEncoderInfo(self, request, context):
        return pb.EncoderInfo(input_shape=[1, 2, 2], feature_dim=2, max_batch_size=8, max_message_bytes=2**20)

    def Feature(self, request, context):
        self.feature_calls += 1
        if self.feature_calls <= self.refusals:
            if self.pushback_ms is not None:
                context.set_trailing_metadata(((RETRY_PUSHBACK_HEADER, self.pushback_ms),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "refused by the test")
        return pb.FeatureResponse(features=encode_tensor(np.ones((request.images.shape[0], 2), np.float32)))


@pytest.mark.parametrize(
    ("refusals", "pushback_ms", "answered", "calls"),
    [(2, "30", True, 3), (1, None, False, 1), (1, "-1", False, 1)],
    ids=["busy_retried_after_hint", "no_hint_not_retried", "negative_hint_not_retried"],
)
def test_node_client_follows_the_retry_contract(node_client, tmp_path, refusals, pushback_ms, answered,
                                                 calls):
    servicer = _RefusingEncoder(refusals, pushback_ms)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_EncoderServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        done = run_node(node_client, f"127.0.0.1:{port}", np.zeros((3, 1, 2, 2), np.float32), tmp_path)
    finally:
        server.stop(None)
    assert servicer.feature_calls == calls
    if answered:
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["features"] == [[1.0, 1.0]] * 3
    else:
        assert done.returncode == 1
        assert done.stderr.startswith("RESOURCE_EXHAUSTED: refused by the test")
