"""reaas_client: the client side of REaaS.

Public face:

* the service: ``EncoderClient`` (typed gRPC client with per-input query accounting, retries per
  ``RetryPolicy``, TLS per ``ClientTls``; images or, for a text encoder, ``token_ids=``, plus ``embed`` and
  ``vocabulary``), ``QueryLedger``, the reply dataclasses (``TextInputInfo`` for text encoders),
  ``ServiceError``, and the one tensor codec shared with the server (``encode_tensor`` / ``decode_tensor``);
* the downstream classifier: ``fetch_features`` (1 query per training input, cached), ``train_classifier``
  (head kinds ``HEAD_KINDS``: "mlp", "linear", "lipschitz", "orthogonal", "prototype", by ``TrainConfig.head``),
  ``select_head`` / ``HeadSearch`` (the head chosen on held-out training features);
* smoothing: ``Smooth`` (Cohen et al. PREDICT / CERTIFY), with ``GaussianFeatureSamples`` (REaaS-SC, noise on
  f(x) locally) or ``StreamedImageSamples`` (SEaaS-SC, noisy images through StreamFeatures, rounded to a wire dtype by
  ``WireRounding``) as sample source;
* the certification paths: ``certify_reaas_bc``, ``certify_reaas_sc``, ``certify_seaas_sc``, ``run_path``;
* metrics: ``InputRecord``, ``RunSummary``, ``average_certified_radius``, ``certified_accuracy``.

The service half (and metrics) needs only the base install (grpcio, protobuf, numpy); the downstream, smoothing and
certification names need the ``certify`` extra (torch, scipy, statsmodels) and are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# The transport needs grpcio, protobuf and numpy only (the base install, a light client); these load now.
from reaas_client.client import EncoderClient, ServiceError, channel_target
from reaas_client.ledger import LedgerRow, QueryLedger
from reaas_client.metrics import InputRecord, RunSummary, average_certified_radius, certified_accuracy
from reaas_client.replies import BoundCost, EncoderInfo, F2IReply, Quota, RpcUsage, TextInputInfo, UsageReport
from reaas_client.retry import RetryPolicy
from reaas_client.tls import ClientTls
from reaas_client.wire import decode_tensor, encode_tensor

# Certification needs torch, scipy and statsmodels (the `certify` extra): its names load on first use, so a light
# client that never touches them neither needs those packages nor pays for importing them.
_CERTIFICATION_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["FeatureSet", "TrainConfig", "fetch_features", "train_classifier"], "reaas_client.downstream"),
    **dict.fromkeys(["CandidateScore", "HeadSearch", "HeadSelection", "select_head"], "reaas_client.head_selection"),
    **dict.fromkeys(["HEAD_KINDS", "lipschitz_margin_loss"], "reaas_client.heads"),
    **dict.fromkeys(
        ["PathConfig", "PathResult", "SmoothingConfig", "certify_features", "certify_reaas_bc", "certify_reaas_sc",
         "certify_seaas_sc", "run_path"],
        "reaas_client.pipelines",
    ),
    **dict.fromkeys(["WIRE_DTYPES", "StreamedImageSamples", "WireRounding"], "reaas_client.seaas"),
    **dict.fromkeys(
        ["ABSTAIN", "GaussianFeatureSamples", "Smooth", "SmoothCertificate", "SmoothPrediction"],
        "reaas_client.smoothing",
    ),
}

if TYPE_CHECKING:
    from reaas_client.downstream import FeatureSet, TrainConfig, fetch_features, train_classifier
    from reaas_client.head_selection import CandidateScore, HeadSearch, HeadSelection, select_head
    from reaas_client.heads import HEAD_KINDS, lipschitz_margin_loss
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
    from reaas_client.seaas import WIRE_DTYPES, StreamedImageSamples, WireRounding
    from reaas_client.smoothing import (
        ABSTAIN,
        GaussianFeatureSamples,
        Smooth,
        SmoothCertificate,
        SmoothPrediction,
    )


def __getattr__(name: str) -> object:
    """Import a certification name on first access (PEP 562) and keep it, so later lookups are plain."""
    module = _CERTIFICATION_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
