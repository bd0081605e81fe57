"""reaas_server: serves one encoder over gRPC (reaas.v1.EncoderService) with health and reflection.

Public face: ``ServerConfig`` (with ``ServerTls``), ``run_server`` (context manager for tests and embedding),
``start_server``, the ``UsageLedger`` of API keys and usage, and the CLIs ``reaas-server``
(``reaas_server.cli:main``) and ``reaas-keys`` (``reaas_server.keys_cli:main``). Bound math lives in
``bounds``; the model and its checkpoint format in ``robust_pretrain``.
"""

from reaas_server.app import RunningServer, run_server, start_server
from reaas_server.config import ServerConfig
from reaas_server.encoder_host import ServedEncoder
from reaas_server.ledger import UsageLedger
from reaas_server.tls import ServerTls

__all__ = ["RunningServer", "ServedEncoder", "ServerConfig", "ServerTls", "UsageLedger", "run_server", "start_server"]
