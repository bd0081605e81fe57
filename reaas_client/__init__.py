"""reaas_client: the client side of REaaS.

Public face: ``EncoderClient`` (typed gRPC client with per-input query accounting), ``QueryLedger``, the reply
dataclasses, ``ServiceError``, and the tensor codec used by both client and server (``reaas_client.wire``).
Certification pipelines (REaaS-BC, REaaS-SC, SEaaS-SC) build on these.
"""

from reaas_client.client import EncoderClient, ServiceError, channel_target
from reaas_client.ledger import LedgerRow, QueryLedger
from reaas_client.replies import EncoderInfo, F2IReply, RpcUsage, UsageReport
from reaas_client.wire import decode_tensor, encode_tensor

__all__ = [
    "EncoderClient",
    "EncoderInfo",
    "F2IReply",
    "LedgerRow",
    "QueryLedger",
    "RpcUsage",
    "ServiceError",
    "UsageReport",
    "channel_target",
    "decode_tensor",
    "encode_tensor",
]
