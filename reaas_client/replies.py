"""Typed views of the service's replies (frozen dataclasses), decoupled from the generated protobuf classes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reaas.v1 import encoder_service_pb2 as pb


@dataclass(frozen=True)
class BoundCost:
    """What one offered bound is and what one evaluation of it costs per image on the server (proto BoundCost)."""

    name: str
    description: str
    closed_form: bool
    seconds_per_image: float | None  # None when the server did not measure it

    @classmethod
    def from_proto(cls, cost: pb.BoundCost) -> BoundCost:
        return cls(cost.name, cost.description, cost.closed_form,
                   cost.seconds_per_image if cost.cost_measured else None)


@dataclass(frozen=True)
class TextInputInfo:
    """What a text encoder reads (proto TextInputInfo): ids in [0, vocab_size), max_length per sequence."""

    vocab_size: int
    max_length: int
    embed_dim: int
    pad_id: int
    unk_id: int
    threat_model: str  # one line: what a radius certifies in embedding space

    @classmethod
    def from_proto(cls, text: pb.TextInputInfo) -> TextInputInfo:
        return cls(int(text.vocab_size), int(text.max_length), int(text.embed_dim), int(text.pad_id),
                   int(text.unk_id), text.threat_model)


@dataclass(frozen=True)
class EncoderInfo:
    input_shape: tuple[int, int, int]  # [channels, height, width]; text: [embed_dim, 1, max_length]
    accepted_dtypes: tuple[str, ...]
    value_min: float
    value_max: float
    normalization: str
    feature_dim: int
    model_id: str
    model_sha256: str
    lipschitz_upper: float
    f2i_perturb_offered: bool
    mode: str
    max_batch_size: int
    description: str
    bounds_offered: tuple[str, ...]
    default_bound: str
    max_message_bytes: int
    device: str
    bound_costs: tuple[BoundCost, ...] = ()  # one per bounds_offered entry (empty from older servers)
    open_access: bool = False  # no API keys issued: every caller is billed as "anonymous"
    max_calls_per_key: int = 0  # default concurrent calls per key (0 from older servers)
    modality: str = "image"  # "image" or "text" (older servers send none: "image")
    text_input: TextInputInfo | None = None  # set for modality "text"
    max_feature_radius: float = 0.0  # the largest R_F F2IPerturb accepts (0 from older servers: no limit known)

    @classmethod
    def from_proto(cls, info: pb.EncoderInfo) -> EncoderInfo:
        return cls(
            input_shape=tuple(int(d) for d in info.input_shape),
            accepted_dtypes=tuple(pb.DType.Name(d) for d in info.accepted_dtypes),
            value_min=info.value_min,
            value_max=info.value_max,
            normalization=info.normalization,
            feature_dim=int(info.feature_dim),
            model_id=info.model_id,
            model_sha256=info.model_sha256,
            lipschitz_upper=info.lipschitz_upper,
            f2i_perturb_offered=info.f2i_perturb_offered,
            mode=info.mode,
            max_batch_size=int(info.max_batch_size),
            description=info.description,
            bounds_offered=tuple(info.bounds_offered),
            default_bound=info.default_bound,
            max_message_bytes=int(info.max_message_bytes),
            device=info.device,
            bound_costs=tuple(BoundCost.from_proto(c) for c in info.bound_costs),
            open_access=info.open_access,
            max_calls_per_key=int(info.max_calls_per_key),
            modality=info.modality or "image",
            text_input=TextInputInfo.from_proto(info.text_input) if info.HasField("text_input") else None,
            max_feature_radius=info.max_feature_radius,
        )


@dataclass(frozen=True)
class F2IReply:
    """Image-space certified radii for a batch, in request order."""

    image_radius: np.ndarray  # [batch] float64
    bound: tuple[str, ...]  # the bound that decided each radius
    search_steps: np.ndarray  # [batch] int64

    @classmethod
    def concatenate(cls, parts: list[F2IReply]) -> F2IReply:
        return cls(
            image_radius=np.concatenate([p.image_radius for p in parts]),
            bound=tuple(name for p in parts for name in p.bound),
            search_steps=np.concatenate([p.search_steps for p in parts]),
        )

    @classmethod
    def from_proto(cls, reply: pb.F2IPerturbResponse) -> F2IReply:
        return cls(
            image_radius=np.array([r.image_radius for r in reply.radii], dtype=np.float64),
            bound=tuple(r.bound for r in reply.radii),
            search_steps=np.array([r.search_steps for r in reply.radii], dtype=np.int64),
        )


@dataclass(frozen=True)
class RpcUsage:
    rpc: str
    calls: int
    queries: int
    request_bytes: int
    response_bytes: int


@dataclass(frozen=True)
class Quota:
    """A key's query quota: at most ``limit`` queries per ``period_s`` seconds (periods aligned to the epoch)."""

    limit: int
    period_s: int
    used: int
    remaining: int
    resets_at_unix: float


@dataclass(frozen=True)
class UsageReport:
    """What the server's ledger says it served this API key (compare with the client's own QueryLedger)."""

    key_name: str  # the key's name on the server ("anonymous" in open access), never the key
    rpcs: dict[str, RpcUsage]
    total_queries: int
    quota: Quota | None  # None: no quota on this key
    max_concurrent_calls: int

    @classmethod
    def from_proto(cls, report: pb.UsageReport) -> UsageReport:
        rpcs = {
            u.rpc: RpcUsage(u.rpc, u.calls, u.queries, u.request_bytes, u.response_bytes) for u in report.rpcs
        }
        quota = (Quota(report.quota_queries, report.quota_period_seconds, report.quota_used, report.quota_remaining,
                       report.quota_resets_at_unix) if report.quota_queries else None)
        return cls(key_name=report.key_name, rpcs=rpcs, total_queries=report.total_queries, quota=quota,
                   max_concurrent_calls=report.max_concurrent_calls)
