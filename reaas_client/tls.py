"""ClientTls: how EncoderClient verifies the server (root certificates) and, for mutual TLS, proves who it is."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {error.strerror or error}") from None


@dataclass(frozen=True)
class ClientTls:
    """TLS for every replica of one deployment.

    ``root_certificates`` (PEM): the CAs the server's certificate must chain to; None trusts gRPC's default roots
    (the bundle shipped with grpcio, or the file named by GRPC_DEFAULT_SSL_ROOTS_FILE_PATH), i.e. a server with a
    publicly issued certificate. ``client_certificate`` + ``client_key`` (PEM) are presented for mutual TLS.
    ``server_name``: the name the server's certificate must carry when it is not the dialled host (needed for
    several replicas on different hosts, which share one gRPC target). Bytes, not paths: read once.
    """

    root_certificates: bytes | None = None
    client_certificate: bytes | None = None
    client_key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("a client certificate and its key go together: give both, or neither")

    @classmethod
    def from_files(cls, root_certificates: Path | None = None, client_certificate: Path | None = None,
                   client_key: Path | None = None, server_name: str | None = None) -> ClientTls:
        """Read the PEM files (None: not used); ValueError names a file that is missing or unreadable."""
        return cls(
            root_certificates=_read(root_certificates, "CA certificates"),
            client_certificate=_read(client_certificate, "client certificate"),
            client_key=_read(client_key, "client key"),
            server_name=server_name,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.client_key, self.client_certificate)

    def name_override(self, addresses: Sequence[str]) -> str | None:
        """The name to check the certificate against, when gRPC would not check the dialled host by itself.

        One address: gRPC checks its host, so only an explicit ``server_name`` overrides it. Several addresses
        make one ``ipv4:a,b`` target whose authority names no single host: their shared host is checked, and
        replicas on different hosts need ``server_name``.
        """
        if self.server_name is not None or len(addresses) == 1:
            return self.server_name
        hosts = {address.rsplit(":", 1)[0].strip("[]") for address in addresses}
        if len(hosts) != 1:
            raise ValueError(f"TLS to replicas on several hosts {sorted(hosts)} needs ClientTls(server_name=...): "
                             "the name their certificates carry")
        return hosts.pop()
