"""reaas_server: serves one encoder over gRPC (reaas.v1.EncoderService) with health and reflection.

Public face: ``ServerConfig``, ``run_server`` (context manager for tests and embedding), ``start_server``
and the ``reaas-server`` CLI (``reaas_server.cli:main``). Bound math lives in ``bounds``; the model and its
checkpoint format in ``robust_pretrain``.
"""

from reaas_server.app import RunningServer, run_server, start_server
from reaas_server.config import ServerConfig
from reaas_server.encoder_host import ServedEncoder

__all__ = ["RunningServer", "ServedEncoder", "ServerConfig", "run_server", "start_server"]
