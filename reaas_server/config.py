"""ServerConfig: every knob of a REaaS deployment, parsed once (CLI or test) and passed down frozen."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reaas_server.admission import AdmissionLimits
from reaas_server.tls import ServerTls

MODES = ("reaas", "seaas")


@dataclass(frozen=True)
class ServerConfig:
    """How one server process serves one encoder.

    ``mode="seaas"`` is a standard encoder service: Feature RPCs only, F2IPerturb answers UNIMPLEMENTED.
    API keys live in the ledger (``reaas-keys``): with none active every caller is billed as "anonymous"; with
    some, a call without a valid ``x-api-key`` gets UNAUTHENTICATED.
    ``tls=None`` opens an insecure port (the loopback default; elsewhere the server warns that API keys would
    travel in clear text); a ``ServerTls`` makes the one port, health and reflection included, TLS or mutual TLS.
    """

    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (tests)
    metrics_port: int | None = None  # Prometheus exporter on `host`; None: none, 0: a free port
    mode: str = "reaas"
    checkpoint: Path | None = None  # None: the demo encoder `demo_kind` shipped with robust_pretrain
    demo_kind: str | None = None  # None: robust_pretrain.DEFAULT_DEMO_KIND; ignored when `checkpoint` is set
    max_batch_size: int = 4096  # images per request
    max_message_bytes: int = 64 * 1024 * 1024
    # the SQLite usage ledger and API keys (ledger.py); None keeps them in memory, lost at exit (tests, embedding)
    ledger_path: Path | None = None
    default_bound: str | None = None  # None: bounds.DEFAULT_BOUND
    # caps the bound computations' working set, shared by the admitted F2I calls (each gets its share)
    f2i_memory_budget_bytes: int = 256 * 1024**2
    forward_chunk_size: int = 256  # images per forward pass: bounds the activations a large request holds
    # dynamic batching (batcher.py): concurrent Feature requests share forward passes of up to this many images
    # (0: every request runs its own pass), waiting at most batch_max_delay_s for company (0: never waits)
    batch_max_images: int = 1024
    batch_max_delay_s: float = 0.0
    f2i_chunk_size: int = 64  # images per bound computation; cancellation is checked between chunks
    # F2I requests for one searched bound share searches (batcher.RadiusBatcher): None = on CUDA only. On 2 CPU
    # cores concurrent searches of their own use the cores better (bench-service: 1.6 vs 0.9 images/s)
    f2i_batching: bool | None = None
    bound_cost_budget_s: float = 5.0  # start-up time cap for measuring each bound's cost (EncoderInfo.bound_costs)
    workers: int = 16  # gRPC handler threads, shared by every RPC including health checks
    # Admission (admission.py): concurrent calls per pool and per API key; the pools together must leave
    # `reserved_workers` handler threads free so health checks and refusals are answered at once.
    max_feature_calls: int = 4  # unary Feature
    max_feature_streams: int = 4  # StreamFeatures
    max_f2i_calls: int = 4  # F2IPerturb and StreamF2IPerturb
    max_calls_per_key: int = 4
    reserved_workers: int = 4
    grace_s: float = 10.0  # SIGTERM: in-flight calls get this long to finish
    drain_delay_s: float = 1.0  # SIGTERM: health says NOT_SERVING at least this long before the port closes
    device: str | None = None  # None: "cuda" when available, else "cpu"
    tls: ServerTls | None = None  # None: insecure port

    @property
    def f2i_memory_budget_per_search(self) -> int:
        """The bound computations' working set one F2I search may use: the admitted F2I calls share the budget."""
        return self.f2i_memory_budget_bytes // self.max_f2i_calls

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.forward_chunk_size < 1:
            raise ValueError("forward_chunk_size must be >= 1")
        if self.batch_max_images < 0 or self.batch_max_delay_s < 0:
            raise ValueError("batch_max_images and batch_max_delay_s must be >= 0")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be in 0..65535, got {self.metrics_port}")
        if min(self.max_feature_calls, self.max_feature_streams, self.max_f2i_calls, self.max_calls_per_key) < 1:
            raise ValueError("every admission limit (calls per pool, calls per key) must be >= 1")
        admitted = self.max_feature_calls + self.max_feature_streams + self.max_f2i_calls
        if admitted + self.reserved_workers > self.workers:
            raise ValueError(
                f"{self.workers} workers cannot hold {admitted} admitted calls and keep {self.reserved_workers} "
                "free for health checks and refusals; raise --workers or lower the per-pool limits"
            )
        if self.grace_s < 0 or self.drain_delay_s < 0:
            raise ValueError("grace and drain delay must be >= 0 seconds")

    @property
    def admission_limits(self) -> AdmissionLimits:
        return AdmissionLimits(
            pool_calls={"feature": self.max_feature_calls, "feature_stream": self.max_feature_streams,
                        "f2i": self.max_f2i_calls},
            calls_per_key=self.max_calls_per_key,
        )
