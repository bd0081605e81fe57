"""ServerConfig: every knob of a REaaS deployment, parsed once (CLI or test) and passed down frozen."""

from __future__ import annotations

import os
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
    metrics_port: int | None = None  # Prometheus exporter; None: none, 0: a free port
    metrics_host: str | None = None  # where the exporter binds; None: `host`
    heap: str = "lean"  # glibc heap policy (memory.HEAP_POLICIES): "lean" bounds RSS, "fast" speeds heavy encoders
    mode: str = "reaas"
    checkpoint: Path | None = None  # None: the demo encoder `demo_kind` shipped with robust_pretrain
    demo_kind: str | None = None  # None: robust_pretrain.DEFAULT_DEMO_KIND; ignored when `checkpoint` is set
    max_batch_size: int = 4096  # images per request
    max_message_bytes: int = 64 * 1024 * 1024
    # HTTP/2 receive window of each call (flow control; BDP probing stays off so it never grows): the bytes a client
    # may send ahead of what the server has read. Every held call may buffer this much, so it trades memory for the
    # speed of a lone stream: 1 MiB (a 256-image float32 message fits) served one PCA stream 0.73-0.85 of the bare
    # server against 0.65-0.77 at gRPC's 64 KiB (+4 to +15 %, four runs of alternating rounds), but took bench-load's
    # 50 streams to 1.98-2.01x idle RSS (goal 2x) against 1.69x
    stream_window_bytes: int = 64 * 1024
    # API keys, usage and quota counts (ledger.py): a SQLite file, or a postgresql:// URL (str) replicas share;
    # None keeps them in memory, lost at exit (tests, embedding)
    ledger_path: Path | str | None = None
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
    # at most workers - reserved_workers calls are held (running or waiting) at once: each keeps its request in
    # memory and may hold a compute thread (one per held call, made as needed). The names are from the thread-pool
    # server, where each held call held a gRPC handler thread; on grpc.aio health checks need no thread of their own.
    workers: int = 128
    # Admission (admission.py): what may run at once per pool, and how long a call may wait for it.
    # images of unary Feature / Embed calls running at once (a key: 3/4 of them), and twice as many may wait: the
    # most image data the pool holds. Measured (bench-load, non-robust CNN): one key's 8 x 4 096-image calls all
    # held, none refused, beside another key's 4-image calls at p99 69 ms, peak RSS 1.62x idle
    max_feature_images: int = 12288
    max_feature_streams: int = 4  # StreamFeatures calls (a key: 3/4 of them); 8 made bench-load peak RSS 2.17x idle
    max_f2i_calls: int = 4  # F2IPerturb and StreamF2IPerturb calls (a key: all, but others are admitted first)
    max_calls_per_key: int = 32  # running calls of one key, all pools (reaas-keys may set a key's own); more wait
    reserved_workers: int = 8
    max_queue_wait_s: float = 30.0  # a call that found no room waits this long at most (and never past its deadline)
    grace_s: float = 10.0  # SIGTERM: in-flight calls get this long to finish
    drain_delay_s: float = 1.0  # SIGTERM: health says NOT_SERVING at least this long before the port closes
    device: str | None = None  # None: "cuda" when available, else "cpu"
    # torch's intra-op threads in the serving process; None: the cores this process may use / max_f2i_calls, at
    # least 1 (concurrent calls, not one pass's threads, fill the cores: on 2 busy cores two OpenMP threads made a
    # 256-image forward 17x slower than one, 5.0 ms against 0.30)
    torch_threads: int | None = None
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
        if not 1024 <= self.stream_window_bytes <= 2**31 - 1:
            raise ValueError(f"the stream window must be 1 KiB to 2 GiB (--stream-window-kib 1 to 2097151), got "
                             f"{self.stream_window_bytes} bytes")
        if self.forward_chunk_size < 1:
            raise ValueError("forward_chunk_size must be >= 1")
        if self.batch_max_images < 0 or self.batch_max_delay_s < 0:
            raise ValueError("batch_max_images and batch_max_delay_s must be >= 0")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.heap not in ("lean", "fast"):
            raise ValueError(f"heap policy must be 'lean' or 'fast', got {self.heap!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be in 0..65535, got {self.metrics_port}")
        if min(self.max_feature_images, self.max_feature_streams, self.max_f2i_calls, self.max_calls_per_key) < 1:
            raise ValueError("every admission limit (images or calls per pool, calls per key) must be >= 1")
        if self.max_queue_wait_s < 0:
            raise ValueError("the longest queue wait must be >= 0 seconds")
        if self.workers - self.reserved_workers < 1 or self.reserved_workers < 1:
            raise ValueError(
                f"{self.workers} workers must exceed the {self.reserved_workers} reserved ones (at least one): the "
                "calls held at once are workers - reserved-workers; raise --workers or lower --reserved-workers"
            )
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch threads must be >= 1, got {self.torch_threads}")
        if self.grace_s < 0 or self.drain_delay_s < 0:
            raise ValueError("grace and drain delay must be >= 0 seconds")

    @property
    def intra_op_threads(self) -> int:
        if self.torch_threads is not None:
            return self.torch_threads
        return max(1, len(os.sched_getaffinity(0)) // self.max_f2i_calls)

    @property
    def admission_limits(self) -> AdmissionLimits:
        return AdmissionLimits(
            pools={"feature": AdmissionLimits.with_share(self.max_feature_images, free_for_others=0.25,
                                                         queue=2 * self.max_feature_images),
                   "feature_stream": AdmissionLimits.with_share(self.max_feature_streams, free_for_others=0.25),
                   "f2i": AdmissionLimits.with_share(self.max_f2i_calls, free_for_others=0.0)},
            max_held_calls=self.workers - self.reserved_workers,
            calls_per_key=self.max_calls_per_key,
            max_wait_s=self.max_queue_wait_s,
        )
