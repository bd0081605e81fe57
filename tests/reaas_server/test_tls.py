"""TLS and mutual TLS: server flags, EncoderClient / reaas-certify credentials, what crosses the wire.

Every certificate is made here by trustme; the server's names both "localhost" and "127.0.0.1", so clients dial
the IP and verify it without a name override.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import threading
import time

import grpc
import numpy as np
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reaas_client import EncoderClient, ServiceError
from reaas_client import cli as certify_cli
from reaas_client.tls import ClientTls
from reaas_server import ServerConfig, run_server, start_server
from reaas_server import cli as server_cli
from reaas_server.tls import ServerTls, is_loopback

API_KEY = "sk-reaas-7c1e9b4d2f"  # distinctive enough that finding it in the bytes means it crossed in clear


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_tls(ca) -> ServerTls:
    issued = ca.issue_cert("localhost", "127.0.0.1")
    return ServerTls(b"".join(pem.bytes() for pem in issued.cert_chain_pems), issued.private_key_pem.bytes())


def _client_tls(ca: trustme.CA, issuer: trustme.CA | None = None) -> ClientTls:
    """Trusts ``ca``; with ``issuer``, presents a client certificate that ``issuer`` signed."""
    if issuer is None:
        return ClientTls(root_certificates=ca.cert_pem.bytes())
    issued = issuer.issue_cert("alice@client.example")
    return ClientTls(ca.cert_pem.bytes(), b"".join(pem.bytes() for pem in issued.cert_chain_pems),
                     issued.private_key_pem.bytes())


@pytest.fixture(scope="module")
def tls_address(demo_encoder, server_tls):
    with run_server(ServerConfig(port=0, mode="seaas", max_batch_size=64, tls=server_tls), demo_encoder) as (_, port):
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def mtls_address(demo_encoder, server_tls, ca):
    config = ServerConfig(port=0, mode="seaas", tls=dataclasses.replace(server_tls, client_ca=ca.cert_pem.bytes()))
    with run_server(config, demo_encoder) as (_, port):
        yield f"127.0.0.1:{port}"


def _refused(address: str, tls: ClientTls | None) -> grpc.StatusCode:
    """The status a one-try info() gets, failing within a few seconds rather than hanging."""
    started = time.monotonic()
    with EncoderClient(address, timeout_s=5, max_attempts=1, tls=tls) as client, \
            pytest.raises(ServiceError) as refused:
        client.info()
    assert time.monotonic() - started < 4
    return refused.value.code


def test_tls_server_answers_a_tls_client_as_the_insecure_one_does(tls_address, seaas_address, ca, make_images):
    images = make_images(12, seed=3)
    with EncoderClient(tls_address, tls=_client_tls(ca)) as secure, EncoderClient(seaas_address) as plain:
        assert np.array_equal(secure.features(images), plain.features(images))
        assert secure.info().model_sha256 == plain.info().model_sha256
    channel_credentials = _client_tls(ca).channel_credentials()
    with grpc.secure_channel(tls_address, channel_credentials) as channel:  # health shares the TLS port
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_wrong_kind_of_channel_is_unavailable_not_a_hang(tls_address, seaas_address, ca) -> None:
    assert _refused(tls_address, None) == grpc.StatusCode.UNAVAILABLE  # insecure client, TLS server
    assert _refused(seaas_address, _client_tls(ca)) == grpc.StatusCode.UNAVAILABLE  # TLS client, insecure server
    assert _refused(tls_address, ClientTls()) == grpc.StatusCode.UNAVAILABLE  # default roots: test CA untrusted


def test_mutual_tls_answers_only_a_certificate_of_its_client_ca(mtls_address, ca) -> None:
    assert _refused(mtls_address, _client_tls(ca)) == grpc.StatusCode.UNAVAILABLE  # no certificate
    assert _refused(mtls_address, _client_tls(ca, trustme.CA())) == grpc.StatusCode.UNAVAILABLE  # another CA's
    with EncoderClient(mtls_address, timeout_s=10, tls=_client_tls(ca, ca)) as client:
        assert client.info().feature_dim > 0


class _RecordingProxy:
    """A loopback TCP proxy that forwards both ways and keeps every byte the client sent."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.sent = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(downstream, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if record:
                    with self._lock:
                        self.sent += chunk
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):  # one side hung up: so does the other
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()

    def close(self) -> None:
        self._listener.close()


@pytest.mark.parametrize("secure", [True, False], ids=["tls", "insecure-control"])
def test_api_key_crosses_the_wire_only_encrypted(secure, tls_address, seaas_address, ca) -> None:
    proxy = _RecordingProxy(int((tls_address if secure else seaas_address).rsplit(":", 1)[1]))
    try:
        with EncoderClient(f"127.0.0.1:{proxy.port}", api_key=API_KEY, timeout_s=10,
                           tls=_client_tls(ca) if secure else None) as client:
            assert client.info().feature_dim > 0
    finally:
        proxy.close()
    assert len(proxy.sent) > 0
    assert (API_KEY.encode() in proxy.sent) is not secure


@pytest.mark.parametrize(("host", "tls", "warns"), [("0.0.0.0", False, True), ("127.0.0.1", False, False),
                                                    ("0.0.0.0", True, False)])
def test_insecure_port_off_loopback_is_warned_about(host, tls, warns, demo_encoder, server_tls, caplog) -> None:
    config = ServerConfig(host=host, port=0, mode="seaas", tls=server_tls if tls else None)
    with caplog.at_level(logging.WARNING, logger="reaas_server.app"):
        start_server(config, demo_encoder).stop(grace_s=0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "clear text" in r.getMessage()]
    assert len(warnings) == (1 if warns else 0)


@pytest.mark.parametrize(("host", "loopback"), [("localhost", True), ("127.0.0.1", True), ("127.8.0.1", True),
                                                ("[::1]", True), ("0.0.0.0", False), ("::", False),
                                                ("10.0.0.5", False), ("reaas.example", False)])
def test_loopback_hosts(host, loopback) -> None:
    assert is_loopback(host) is loopback


def test_server_whose_key_is_not_its_certificates_says_so(demo_encoder, server_tls, ca) -> None:
    foreign_key = ca.issue_cert("localhost").private_key_pem.bytes()
    config = ServerConfig(port=0, mode="seaas", tls=ServerTls(server_tls.certificate_chain, foreign_key))
    with pytest.raises(OSError, match="private key"):
        start_server(config, demo_encoder)


@pytest.fixture(scope="module")
def pem_files(tmp_path_factory, ca):
    folder = tmp_path_factory.mktemp("pem")
    issued = ca.issue_cert("localhost", "127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    issued.private_key_pem.write_to_path(str(folder / "server.key"))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    client = ca.issue_cert("alice@client.example")
    client.cert_chain_pems[0].write_to_path(str(folder / "client.pem"))
    client.private_key_pem.write_to_path(str(folder / "client.key"))
    return folder


def test_server_flags_read_the_files_once(pem_files) -> None:
    config = server_cli.parse_args(["--port", "0", "--tls-cert", str(pem_files / "server.pem"),
                                    "--tls-key", str(pem_files / "server.key"),
                                    "--tls-client-ca", str(pem_files / "ca.pem")])
    assert config.tls == ServerTls.from_files(pem_files / "server.pem", pem_files / "server.key", pem_files / "ca.pem")
    assert config.tls.mutual and "PRIVATE" not in repr(config)
    assert server_cli.parse_args(["--port", "0"]).tls is None


@pytest.mark.parametrize(("flags", "message"), [
    (["--tls-cert", "server.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-key", "server.key"], "--tls-cert and --tls-key go together"),
    (["--tls-client-ca", "ca.pem"], "needs --tls-cert and --tls-key"),
    (["--tls-cert", "server.pem", "--tls-key", "absent.key"], "cannot read private key"),
    (["--tls-cert", "server.pem", "--tls-key", "server.pem"], "holds no PEM private key"),
    (["--tls-cert", "server.key", "--tls-key", "server.key"], "holds no PEM certificate"),
])
def test_server_flags_refuse_before_start(flags, message, pem_files, capsys) -> None:
    args = [a if a.startswith("--") else str(pem_files / a) for a in flags]
    with pytest.raises(SystemExit):
        server_cli.parse_args(["--port", "0", *args])
    assert message in capsys.readouterr().err


def test_certify_flags_build_the_client_tls(pem_files, capsys) -> None:
    parser = certify_cli.build_parser()

    def tls_of(*flags: str) -> ClientTls | None:
        args = parser.parse_args(["--server", "h:1", "--dataset", "d", "--path", "reaas-bc", *flags])
        return certify_cli.client_tls(parser, args)

    assert tls_of() is None
    assert tls_of("--tls") == ClientTls()
    assert tls_of("--tls-ca", str(pem_files / "ca.pem")) == ClientTls((pem_files / "ca.pem").read_bytes())
    mutual = tls_of("--tls-ca", str(pem_files / "ca.pem"), "--tls-client-cert", str(pem_files / "client.pem"),
                    "--tls-client-key", str(pem_files / "client.key"))
    assert mutual.client_key == (pem_files / "client.key").read_bytes()
    with pytest.raises(SystemExit):
        tls_of("--tls-client-cert", str(pem_files / "client.pem"))
    assert "go together" in capsys.readouterr().err


def test_certify_runs_over_mutual_tls(demo_encoder, pem_files, tmp_path) -> None:
    config = server_cli.parse_args(["--port", "0", "--tls-cert", str(pem_files / "server.pem"),
                                    "--tls-key", str(pem_files / "server.key"),
                                    "--tls-client-ca", str(pem_files / "ca.pem"), "--bound-cost-budget", "0"])
    with run_server(config, demo_encoder) as (_, port):
        code = certify_cli.main(["--server", f"127.0.0.1:{port}", "--dataset", "mnist-embedded", "--path", "reaas-bc",
                                 "--train-size", "20", "--test-size", "2", "--epochs", "1", "--hidden", "8",
                                 "--bound", "lipschitz", "--no-cache", "--quiet", "--out", str(tmp_path),
                                 "--tls-ca", str(pem_files / "ca.pem"),
                                 "--tls-client-cert", str(pem_files / "client.pem"),
                                 "--tls-client-key", str(pem_files / "client.key")])
    assert code == 0 and (tmp_path / "records.csv").exists()


def test_replicas_share_one_checked_name(tls_address, ca) -> None:
    tls = _client_tls(ca)
    with EncoderClient([tls_address, tls_address], timeout_s=10, tls=tls) as client:  # one ipv4: target
        assert client.info().feature_dim > 0
    assert tls.name_override(["127.0.0.1:1"]) is None  # gRPC checks the dialled host itself
    assert tls.name_override(["127.0.0.1:1", "127.0.0.1:2"]) == "127.0.0.1"
    with pytest.raises(ValueError, match="server_name"):
        tls.name_override(["10.0.0.1:1", "10.0.0.2:1"])
    assert ClientTls(server_name="reaas.example").name_override(["10.0.0.1:1", "10.0.0.2:1"]) == "reaas.example"
