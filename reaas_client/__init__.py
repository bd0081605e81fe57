"""reaas_client: the client side of REaaS.

Public face:

* the service: ``EncoderClient`` (typed gRPC client with per-input query accounting, retries per
  ``RetryPolicy``, TLS per ``ClientTls``; images or, for a text encoder, ``token_ids=``, plus ``embed`` and
  ``vocabulary``), ``QueryLedger``, the reply dataclasses (``TextInputInfo`` for text encoders),
  ``ServiceError``, and the one tensor codec shared with the server (``encode_tensor`` / ``decode_tensor``);
* the downstream classifier: ``fetch_features`` (1 query per training input, cached), ``train_classifier``
  (head kinds "mlp", "linear", "lipschitz" by ``TrainConfig.head``), ``select_head`` / ``HeadSearch`` (the head
  chosen on held-out training features);
* smoothing: ``Smooth`` (Cohen et al. PREDICT / CERTIFY), with ``GaussianFeatureSamples`` (REaaS-SC, noise on
  f(x) locally) or ``StreamedImageSamples`` (SEaaS-SC, noisy images through StreamFeatures, rounded to a wire dtype by
  ``WireRounding``) as sample source;
* the certification paths: ``certify_reaas_bc``, ``certify_reaas_sc``, ``certify_seaas_sc``, ``run_path``;
* metrics: ``InputRecord``, ``RunSummary``, ``average_certified_radius``, ``certified_accuracy``.
"""

from reaas_client.client import EncoderClient, ServiceError, channel_target
from reaas_client.downstream import FeatureSet, TrainConfig, fetch_features, train_classifier
from reaas_client.head_selection import CandidateScore, HeadSearch, HeadSelection, select_head
from reaas_client.heads import HEAD_KINDS, lipschitz_margin_loss
from reaas_client.ledger import LedgerRow, QueryLedger
from reaas_client.metrics import InputRecord, RunSummary, average_certified_radius, certified_accuracy
from reaas_client.pipelines import (
    PathConfig,
    PathResult,
    SmoothingConfig,
    certify_features,
    certify_reaas_bc,
    certify_reaas_sc,
    certify_seaas_sc,
    run_path,
)
from reaas_client.replies import BoundCost, EncoderInfo, F2IReply, Quota, RpcUsage, TextInputInfo, UsageReport
from reaas_client.retry import RetryPolicy
from reaas_client.seaas import WIRE_DTYPES, StreamedImageSamples, WireRounding
from reaas_client.smoothing import (
    ABSTAIN,
    GaussianFeatureSamples,
    Smooth,
    SmoothCertificate,
    SmoothPrediction,
)
from reaas_client.tls import ClientTls
from reaas_client.wire import decode_tensor, encode_tensor

__all__ = [
    "ABSTAIN",
    "HEAD_KINDS",
    "WIRE_DTYPES",
    "CandidateScore",
    "ClientTls",
    "EncoderClient",
    "BoundCost",
    "EncoderInfo",
    "F2IReply",
    "FeatureSet",
    "GaussianFeatureSamples",
    "HeadSearch",
    "HeadSelection",
    "InputRecord",
    "LedgerRow",
    "PathConfig",
    "PathResult",
    "QueryLedger",
    "RetryPolicy",
    "RpcUsage",
    "RunSummary",
    "ServiceError",
    "Smooth",
    "SmoothCertificate",
    "SmoothPrediction",
    "SmoothingConfig",
    "StreamedImageSamples",
    "TextInputInfo",
    "TrainConfig",
    "Quota",
    "WireRounding",
    "UsageReport",
    "average_certified_radius",
    "certified_accuracy",
    "certify_features",
    "certify_reaas_bc",
    "certify_reaas_sc",
    "certify_seaas_sc",
    "channel_target",
    "decode_tensor",
    "encode_tensor",
    "fetch_features",
    "lipschitz_margin_loss",
    "run_path",
    "select_head",
    "train_classifier",
]
