"""The server's TLS credentials, read once at start, and the loopback test behind the clear-text warning."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc

_CERTIFICATE_MARK = b"-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY_MARK = b"PRIVATE KEY-----"


def read_pem(path: Path, what: str, mark: bytes) -> bytes:
    """The bytes of a PEM file, or ValueError saying which file is missing, unreadable or not ``what``."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {error.strerror or error}") from None
    if mark not in data:
        raise ValueError(f"{path} holds no PEM {what} (no '{mark.decode()}' line)")
    return data


def check_key_pair(certificate: Path, private_key: Path) -> None:
    """ValueError naming both files unless `private_key` is an unencrypted PEM key of `certificate`'s leaf."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # the empty password makes an encrypted key fail here instead of prompting (gRPC cannot use one anyway)
        context.load_cert_chain(certificate, private_key, password=lambda: b"")
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"{private_key} is not the private key of {certificate}; give the key issued with that "
                             "certificate") from None
        raise ValueError(f"{certificate} with {private_key}: not a certificate and its unencrypted private key "
                         f"({error.reason or error}); give the pair as PEM, the key without a passphrase") from None


@dataclass(frozen=True)
class ServerTls:
    """What the server presents (``certificate_chain``, PEM, leaf first, and its ``private_key``) and, for mutual
    TLS, the CA bundle every client certificate must chain to (``client_ca``; None: clients are not asked for one).

    Bytes, not paths: the files are read once at start, so replacing them takes a restart.
    """

    certificate_chain: bytes
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = None

    @classmethod
    def from_files(cls, certificate: Path, private_key: Path, client_ca: Path | None = None) -> ServerTls:
        """Read the PEM files; ValueError names the file that is missing, unreadable or of the wrong kind, or the
        two files when the key is not the certificate's (gRPC would only say "Failed to bind" at start)."""
        tls = cls(
            certificate_chain=read_pem(certificate, "certificate", _CERTIFICATE_MARK),
            private_key=read_pem(private_key, "private key", _PRIVATE_KEY_MARK),
            client_ca=None if client_ca is None else read_pem(client_ca, "client CA certificate", _CERTIFICATE_MARK),
        )
        check_key_pair(certificate, private_key)
        return tls

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS credentials; with ``client_ca`` a handshake without a client certificate that chains to it fails."""
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.mutual,
        )


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback IP literals; a wildcard ("0.0.0.0", "::") or any other name is not."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
