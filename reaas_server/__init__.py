"""reaas_server: serves one encoder over gRPC (reaas.v1.EncoderService) with health and reflection.

Public face: ``ServerConfig`` (with ``ServerTls``), ``run_server`` (context manager for tests and embedding),
``start_server``, the ``UsageLedger`` of API keys and usage, and the CLIs ``reaas-server``
(``reaas_server.cli:main``) and ``reaas-keys`` (``reaas_server.keys_cli:main``). Bound math lives in
``bounds``; the model and its checkpoint format in ``robust_pretrain``.

The names are imported on first use (PEP 562), not with the package: ``reaas-keys`` reads the ledger with the
standard library alone and must not wait for torch, which the server's encoder host imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS: dict[str, str] = {
    "RunningServer": "reaas_server.app",
    "run_server": "reaas_server.app",
    "start_server": "reaas_server.app",
    "ServerConfig": "reaas_server.config",
    "ServedEncoder": "reaas_server.encoder_host",
    "UsageLedger": "reaas_server.ledger",
    "ServerTls": "reaas_server.tls",
}

if TYPE_CHECKING:
    from reaas_server.app import RunningServer, run_server, start_server
    from reaas_server.config import ServerConfig
    from reaas_server.encoder_host import ServedEncoder
    from reaas_server.ledger import UsageLedger
    from reaas_server.tls import ServerTls

__all__ = ["RunningServer", "ServedEncoder", "ServerConfig", "ServerTls", "UsageLedger", "run_server", "start_server"]


def __getattr__(name: str) -> object:
    """Import an exported name on first access and keep it, so later lookups are plain."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
