"""``reaas-server``: serve one encoder over gRPC until SIGTERM / Ctrl-C, then drain in-flight calls."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

import bounds
from reaas_client.command_line import (
    CommandLineParser,
    UsageError,
    add_standard_flags,
    available_device,
    checkpoint_argument,
    reported_errors,
)
from reaas_server.app import BindError, start_server
from reaas_server.config import MODES, ServerConfig
from reaas_server.keys_cli import LEDGER_ENVIRONMENT, ledger_argument
from reaas_server.ledger import (
    MEMORY_LEDGER,
    LedgerOpenError,
    LedgerUnavailable,
    default_ledger_path,
    is_postgres,
)
from reaas_server.memory import freeze_startup_heap, limit_heap_growth
from reaas_server.parent_watch import exit_with_parent
from reaas_server.tls import ServerTls
from robust_pretrain.checkpoint import CheckpointError
from robust_pretrain.demo import DEFAULT_DEMO_KIND, DEMO_KINDS, TEXT_DEMO_KINDS


def build_parser() -> argparse.ArgumentParser:
    defaults = ServerConfig()
    parser = CommandLineParser(
        prog="reaas-server",
        environment=LEDGER_ENVIRONMENT,
        description="Serve a pre-trained encoder over gRPC (reaas.v1.EncoderService). In 'reaas' mode the "
        "server also answers F2IPerturb: it turns each client's feature-space certified radius into an "
        "image-space one. Health (grpc.health.v1) and server reflection are always on.",
    )
    parser.add_argument("--host", default=defaults.host, help="address to bind (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=defaults.port, help="port; 0 picks a free one (default: %(default)s)"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free port, logged); default: none",
    )
    parser.add_argument(
        "--metrics-host", default=None,
        help="address the metrics exporter binds (default: --host); 127.0.0.1 keeps it to this machine (it has no "
        "TLS and no key, and says so when bound elsewhere)",
    )
    parser.add_argument(
        "--checkpoint",
        type=checkpoint_argument,
        default=None,
        help="encoder checkpoint written by reaas-pretrain (PATH.safetensors + PATH.json); "
        "default: the demo encoder --demo-kind shipped with robust_pretrain",
    )
    parser.add_argument(
        "--demo-kind",
        choices=DEMO_KINDS + TEXT_DEMO_KINDS,
        default=None,
        help="shipped demo encoder to serve when no --checkpoint is given (default: "
        f"{DEFAULT_DEMO_KIND}); a kind whose asset is absent is served as its labelled seeded-init stand-in. "
        "text-* kinds are text encoders (token ids or embedding matrices in; README, 'Text')",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=defaults.mode,
        help="reaas: Feature + F2IPerturb; seaas: a standard encoder service, Feature only (default: %(default)s)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=defaults.max_batch_size,
        help="images per request; larger requests get RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    parser.add_argument(
        "--max-message-mb",
        type=float,
        default=defaults.max_message_bytes / 2**20,
        help="largest request in MiB (default: %(default)s)",
    )
    parser.add_argument(
        "--stream-window-kib",
        type=int,
        default=defaults.stream_window_bytes // 1024,
        help="HTTP/2 receive window per call in KiB: what a client may send ahead of what the server has read. "
             "Every held call may buffer this much; a window that holds a whole message speeds a lone stream "
             "(1024 KiB: one 256-image stream +4 to +15%%) at that memory cost per held call (default: %(default)s)",
    )
    parser.add_argument(
        "--ledger",
        type=ledger_argument,
        default=str(default_ledger_path()),
        help="API keys (hashed), the usage ledger and the quota counts, kept across restarts: a SQLite file, or a "
        "postgresql://USER:PASSWORD@HOST:PORT/DB URL that every replica shares (quotas then hold across them); "
        "manage keys with reaas-keys. With no active key every caller is billed as 'anonymous' (open access). "
        "':memory:' keeps it in memory, lost at exit (default: $REAAS_LEDGER, else %(default)s)",
    )
    tls = parser.add_argument_group(
        "TLS",
        "Without --tls-cert/--tls-key the port is insecure (fine on loopback; elsewhere API keys would travel in "
        "clear text, and the server says so). Health and reflection share the port, so they are TLS too. The "
        "files are read once at start.",
    )
    tls.add_argument("--tls-cert", type=Path, default=None,
                     help="PEM certificate chain the server presents (leaf first); needs --tls-key")
    tls.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    tls.add_argument("--tls-client-ca", type=Path, default=None,
                     help="PEM CA bundle for mutual TLS: every client must present a certificate it issued")
    parser.add_argument(
        "--default-bound",
        choices=bounds.BOUNDS_OFFERED,
        default=None,
        help=f"bound F2IPerturb uses when a request names none (default: {bounds.DEFAULT_BOUND}: the "
        "closed form where local bounds cannot beat it, best_ibp elsewhere)",
    )
    parser.add_argument(
        "--bound-cost-budget",
        type=float,
        default=defaults.bound_cost_budget_s,
        help="seconds at start-up for measuring what one evaluation of each bound costs per image "
        "(EncoderInfo.bound_costs; bounds left when it runs out are reported unmeasured) (default: %(default)s)",
    )
    parser.add_argument(
        "--f2i-memory-budget-mb",
        type=float,
        default=defaults.f2i_memory_budget_bytes / 2**20,
        help="working-set cap of the bound computations in MiB, shared by the --max-f2i-calls admitted F2I "
        "calls; larger batches are chunked (default: %(default)s)",
    )
    parser.add_argument(
        "--heap", choices=("lean", "fast"), default=defaults.heap,
        help="glibc heap policy: 'lean' reuses blocks under 4 MiB (a 256-image chunk's activations) and gives larger "
        "ones back at once (peak RSS <= 2x idle under load), 'fast' keeps blocks up to 32 MiB for the next pass (a "
        "bigger encoder's chunks too; concurrent F2I searches peaked at 2.35x idle); reaas_server/memory.py has the "
        "numbers (default: %(default)s)",
    )
    parser.add_argument(
        "--forward-chunk-size",
        type=int,
        default=defaults.forward_chunk_size,
        help="images per forward pass; larger requests are split so their activations stay bounded "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--batch-max-images",
        type=int,
        default=defaults.batch_max_images,
        help="concurrent Feature/StreamFeatures requests share forward passes of up to this many images (and, "
        "with --f2i-batching, F2IPerturb requests share bound searches); 0 runs each request alone "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--f2i-batching",
        choices=("auto", "on", "off"),
        default="auto",
        help=f"concurrent F2IPerturb requests for one searched bound share searches of up to "
        f"{defaults.f2i_chunk_size} images; auto: on CUDA only (on 2 CPU cores separate concurrent searches were "
        "faster, benchmarks/results/batching.md) (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-max-delay-ms",
        type=float,
        default=defaults.batch_max_delay_s * 1000,
        help="how long a request may wait for others to share its pass; 0 never waits, so batches form only "
        "while a pass runs (default: %(default)s)",
    )
    admission = parser.add_argument_group(
        "admission",
        "Work is admitted by what it costs: unary Feature by images running, streams and F2I by calls. A call that "
        "finds no room waits in a fair queue (the key holding least goes first) and runs when room frees; it is "
        "refused with RESOURCE_EXHAUSTED and a retry hint (grpc-retry-pushback-ms) only when the queue is full, "
        "its key's share of it is used, or it waited --max-queue-wait. At most --workers minus --reserved-workers calls "
        "are held (running or queued) at once: each holds its request in memory and may take a compute thread.",
    )
    admission.add_argument(
        "--workers", type=int, default=defaults.workers,
        help="calls held at once (running or queued) are at most workers - reserved-workers; the server runs on one "
             "event loop (grpc.aio), so a held call costs memory and at most a compute thread, not a handler "
             "thread (default: %(default)s)"
    )
    admission.add_argument("--max-feature-images", type=int, default=defaults.max_feature_images,
                           help="images of unary Feature/Embed calls running at once, one key at most 3/4; "
                                "twice as many may wait (default: %(default)s)")
    admission.add_argument("--max-feature-streams", type=int, default=defaults.max_feature_streams,
                           help="concurrent StreamFeatures calls; one key may hold 3/4 (default: %(default)s)")
    admission.add_argument("--max-f2i-calls", type=int, default=defaults.max_f2i_calls,
                           help="concurrent F2IPerturb + StreamF2IPerturb calls (default: %(default)s)")
    admission.add_argument("--max-calls-per-key", type=int, default=defaults.max_calls_per_key,
                           help="running calls of one API key, all pools together; more wait their turn "
                                "(default: %(default)s)")
    admission.add_argument("--reserved-workers", type=int, default=defaults.reserved_workers,
                           help="taken off --workers for the held-call cap: room kept for calls beyond the "
                                "limits, refused at once (default: %(default)s)")
    admission.add_argument("--max-queue-wait", type=float, default=defaults.max_queue_wait_s,
                           help="seconds a call may wait for room before it is refused (never past its deadline) "
                                "(default: %(default)s)")
    parser.add_argument(
        "--grace",
        type=float,
        default=defaults.grace_s,
        help="seconds in-flight calls get to finish after SIGTERM (default: %(default)s)",
    )
    parser.add_argument(
        "--drain-delay",
        type=float,
        default=defaults.drain_delay_s,
        help="after SIGTERM, seconds health reports NOT_SERVING (new calls get UNAVAILABLE) before the port "
        "closes, so load balancers stop routing here first; counted within --grace (default: %(default)s)",
    )
    parser.add_argument(
        "--device", type=available_device, default=None,
        help="torch device, e.g. cpu or cuda:0 (default: cuda if available)"
    )
    parser.add_argument(
        "--torch-threads", type=int, default=None,
        help="torch intra-op threads (default: the cores this process may use divided by --max-f2i-calls, at "
             "least 1: concurrent calls fill the cores better than one pass's threads)"
    )
    parser.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO",
                        help="logging level (default: %(default)s)")
    add_standard_flags(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    """The ServerConfig the flags describe; any mistake is one line and exit 2, before anything is loaded."""
    return config_from(build_parser(), argv)[0]


def config_from(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[ServerConfig, argparse.Namespace]:
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    server_tls = _server_tls(parser, args)
    try:
        config = ServerConfig(
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            heap=args.heap,
            mode=args.mode,
            checkpoint=args.checkpoint,
            demo_kind=args.demo_kind,
            max_batch_size=args.max_batch_size,
            max_message_bytes=int(args.max_message_mb * 2**20),
            stream_window_bytes=args.stream_window_kib * 1024,
            ledger_path=(None if args.ledger == MEMORY_LEDGER
                         else args.ledger if is_postgres(args.ledger) else Path(args.ledger)),
            default_bound=args.default_bound,
            f2i_memory_budget_bytes=int(args.f2i_memory_budget_mb * 2**20),
            forward_chunk_size=args.forward_chunk_size,
            batch_max_images=args.batch_max_images,
            batch_max_delay_s=args.batch_max_delay_ms / 1000,
            f2i_batching={"auto": None, "on": True, "off": False}[args.f2i_batching],
            bound_cost_budget_s=args.bound_cost_budget,
            workers=args.workers,
            max_feature_images=args.max_feature_images,
            max_feature_streams=args.max_feature_streams,
            max_f2i_calls=args.max_f2i_calls,
            max_calls_per_key=args.max_calls_per_key,
            reserved_workers=args.reserved_workers,
            max_queue_wait_s=args.max_queue_wait,
            grace_s=args.grace,
            drain_delay_s=args.drain_delay,
            device=args.device,
            torch_threads=args.torch_threads,
            tls=server_tls,
        )
    except ValueError as error:
        parser.error(str(error))
    return config, args


def _server_tls(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ServerTls | None:
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together: give both, or neither for an insecure port")
    if args.tls_cert is None:
        if args.tls_client_ca is not None:
            parser.error("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        return None
    try:
        return ServerTls.from_files(args.tls_cert, args.tls_key, args.tls_client_ca)
    except ValueError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, drain, return (tests call this in-process)."""
    exit_with_parent()  # a helper child of the demo, a benchmark or a test ends with its parent
    parser = build_parser()
    config, args = config_from(parser, argv)
    with reported_errors(parser.prog, debug=args.debug, usage_errors=(BindError, LedgerOpenError, LedgerUnavailable)):
        try:
            _serve(config)
        except CheckpointError as error:
            raise UsageError(f"{error}; write the checkpoint again with reaas-pretrain, or leave --checkpoint out "
                             "to serve a shipped --demo-kind") from error


def run() -> None:
    """The `reaas-server` process: ``main``, then exit at once once drained. Calls still in work past --grace were
    cancelled by the drain (unanswered, unbilled), but a thread in the middle of a bound evaluation notices only at
    its next check, and the interpreter's exit joins every thread: 1.3 s past the drain under two CPU hogs. The
    ledger is closed and the logs flushed before the exit; nothing answered is lost."""
    main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve(config: ServerConfig) -> None:
    limit_heap_growth(config.heap)
    # The serving loop answering a health check waits for the GIL behind the threads decoding and forwarding
    # requests; Python hands the GIL over every switch interval (5 ms by default). 1 ms keeps that wait short
    # under load at a negligible cost to throughput.
    sys.setswitchinterval(0.001)
    torch.set_num_threads(config.intra_op_threads)  # this thread's (compute.set_torch_threads); start_server's own
    log = logging.getLogger(__name__)
    stopping = threading.Event()
    running = None

    def request_stop(signum, _frame) -> None:
        if stopping.is_set() and running is not None:
            log.warning("signal %d again: stopping now, cancelling in-flight calls", signum)
            running.stop_now(0)
            return
        log.info("signal %d: draining in-flight calls (grace %.1f s)", signum, config.grace_s)
        stopping.set()

    # Handlers go in before the port is announced: a SIGTERM right after "listening on" must drain, not kill. They
    # are put back on the way out, so a caller running main() in-process (tests) keeps its own.
    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        running = start_server(config)
        freeze_startup_heap()  # full GC passes over the start-up heap stalled health checks (reaas_server.memory)
        # The port line is the machine-readable handshake scripts wait for (with --port 0 it is the only way).
        print(
            f"reaas-server listening on {config.host}:{running.port} mode={config.mode} "
            f"model={running.encoder.metadata.model_id} device={running.encoder.device}",
            flush=True,
        )
        # Python runs signal handlers in the main thread between bytecodes: wake it regularly rather than block in
        # one untimed wait.
        while not stopping.wait(timeout=0.2):
            pass
        draining_since = time.monotonic()
        running.stop(config.grace_s, drain_delay_s=config.drain_delay_s)
        log.info("drained in %.2f s", time.monotonic() - draining_since)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    run()
