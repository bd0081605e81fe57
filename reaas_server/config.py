"""ServerConfig: every knob of a REaaS deployment, parsed once (CLI or test) and passed down frozen."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODES = ("reaas", "seaas")


@dataclass(frozen=True)
class ServerConfig:
    """How one server process serves one encoder.

    ``mode="seaas"`` is a standard encoder service: Feature RPCs only, F2IPerturb answers UNIMPLEMENTED.
    ``api_keys=None`` accepts every caller (usage is still counted per ``x-api-key``, "anonymous" when
    absent); a set of keys makes the server reject missing or unknown keys with UNAUTHENTICATED.
    """

    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (tests)
    mode: str = "reaas"
    checkpoint: Path | None = None  # None: the demo encoder `demo_kind` shipped with robust_pretrain
    demo_kind: str | None = None  # None: robust_pretrain.DEFAULT_DEMO_KIND; ignored when `checkpoint` is set
    max_batch_size: int = 4096  # images per request
    max_message_bytes: int = 64 * 1024 * 1024
    api_keys: frozenset[str] | None = None
    default_bound: str | None = None  # None: bounds.DEFAULT_BOUND
    f2i_memory_budget_bytes: int = 2 * 1024**3  # caps the bound computation's working set per call
    f2i_chunk_size: int = 64  # images per bound computation; cancellation is checked between chunks
    bound_cost_budget_s: float = 5.0  # start-up time cap for measuring each bound's cost (EncoderInfo.bound_costs)
    workers: int = 8  # gRPC handler threads
    grace_s: float = 10.0  # SIGTERM: in-flight calls get this long to finish
    device: str | None = None  # None: "cuda" when available, else "cpu"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
