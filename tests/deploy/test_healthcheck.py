"""deploy/healthcheck.py, the containers' probe, run as the image runs it (a subprocess) against in-process servers.

The TLS case is why the probe exists (deploy/k8s/deployment.yaml): a plaintext health check, which is all the
kubelet's built-in gRPC probe can make, fails against a --tls-cert server; this probe, given the CA, passes.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import trustme
from deploy_files import DEPLOY

from reaas_server import ServedEncoder, ServerConfig, start_server
from reaas_server.tls import ServerTls

PROBE = DEPLOY / "healthcheck.py"
SERVER_NAME = "reaas-grpc.reaas.svc"  # not the dialled 127.0.0.1, as in a pod: the probe must override the name


def probe(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(PROBE), "--address", address, "--timeout", "5", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def encoder() -> ServedEncoder:
    return ServedEncoder.load(None, "cpu")


@pytest.fixture()
def running(encoder):
    server = start_server(ServerConfig(port=0, mode="seaas"), encoder)
    yield server
    server.stop(grace_s=0)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_serving_server_passes_and_a_draining_one_fails(running):
    address = f"127.0.0.1:{running.port}"
    healthy = probe(address)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert healthy.stdout.strip().endswith(": SERVING")

    running.enter_graceful_shutdown()  # what SIGTERM does first, for --drain-delay seconds
    draining = probe(address)
    assert draining.returncode == 1
    assert "NOT_SERVING" in draining.stdout


def test_nothing_listening_fails():
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused = probe(f"127.0.0.1:{port}", "--timeout", "2")
    assert refused.returncode == 1
    assert "UNAVAILABLE" in refused.stdout or "DEADLINE_EXCEEDED" in refused.stdout


def test_tls_server_fails_a_plaintext_probe_and_passes_one_with_its_ca(encoder, ca, tmp_path):
    issued = ca.issue_cert(SERVER_NAME)
    tls = ServerTls(b"".join(pem.bytes() for pem in issued.cert_chain_pems), issued.private_key_pem.bytes())
    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    server = start_server(ServerConfig(port=0, mode="seaas", tls=tls), encoder)
    try:
        address = f"127.0.0.1:{server.port}"
        plaintext = probe(address)  # what the kubelet's grpc: probe would do
        assert plaintext.returncode == 1, plaintext.stdout

        secure = probe(address, "--tls-ca", str(ca_file), "--tls-server-name", SERVER_NAME)
        assert secure.returncode == 0, secure.stdout + secure.stderr

        wrong_name = probe(address, "--tls-ca", str(ca_file))  # 127.0.0.1 is not on the certificate
        assert wrong_name.returncode == 1
    finally:
        server.stop(grace_s=0)


def test_unreadable_ca_file_is_named_and_fails_with_docker_s_unhealthy_code(tmp_path):
    missing = tmp_path / "absent-ca.crt"
    result = probe("127.0.0.1:1", "--tls-ca", str(missing))
    assert result.returncode == 1  # 2 is reserved by Docker's HEALTHCHECK
    assert str(missing) in result.stderr
