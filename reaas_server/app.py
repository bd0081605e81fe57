"""Assemble a gRPC server: encoder servicer, interceptors, health and reflection services, on grpc.aio.

The server runs on the process's serving loop (serving_loop.py); starting and stopping it are ordinary blocking
calls, so the CLI, tests and embedding programs need no event loop of their own."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

import bounds
from reaas.v1 import encoder_service_pb2 as pb
from reaas.v1 import encoder_service_pb2_grpc as pb_grpc
from reaas_server.admission import Admission, AdmissionInterceptor
from reaas_server.batcher import ForwardBatcher, RadiusBatcher
from reaas_server.compute import BackgroundCompute
from reaas_server.config import ServerConfig
from reaas_server.decoding import RequestDecodingInterceptor
from reaas_server.encoder_host import ServedEncoder
from reaas_server.interceptors import AccountInterceptor
from reaas_server.ledger import SqlLedger, open_ledger
from reaas_server.metrics import ObservingInterceptor, ServerMetrics
from reaas_server.quotas import QuotaBook
from reaas_server.servicer import EncoderServicer
from reaas_server.serving_loop import run_on_loop
from reaas_server.tls import is_loopback

log = logging.getLogger(__name__)
IO_THREADS = 4  # concurrent database calls; the ledger's group commit gathers their rows into one transaction
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EncoderService"].full_name


@dataclass
class RunningServer:
    """A started server and the parts tests and the CLI look at."""

    server: grpc.aio.Server
    port: int
    encoder: ServedEncoder
    ledger: SqlLedger
    health: health.aio.HealthServicer
    admission: Admission
    compute: BackgroundCompute
    io: BackgroundCompute
    batcher: ForwardBatcher | None
    metrics: ServerMetrics
    radius_batcher: RadiusBatcher | None = None

    def stop(self, grace_s: float | None, drain_delay_s: float = 0.0) -> None:
        """Drain the gRPC way: health says NOT_SERVING and new calls get UNAVAILABLE (clients retry elsewhere)
        while the port stays open for at least ``drain_delay_s`` (so load balancers see it) and until the
        in-flight calls finish or ``grace_s`` passes; then the port closes and stragglers are cancelled."""
        started = time.monotonic()
        # admission first: a client that sees NOT_SERVING and sends its next call at once must be refused (health
        # first left a window, one loop round trip, in which 2 of 100 such calls were served under CPU hogs)
        self.admission.start_draining()
        self.enter_graceful_shutdown()
        grace = math.inf if grace_s is None else grace_s
        if drain_delay_s > 0:
            time.sleep(min(drain_delay_s, grace))  # the load balancer's turn: nothing in-process to wait on
        self.admission.wait_idle(timeout_s=max(0.0, grace - (time.monotonic() - started)))
        self.stop_now(max(0.0, grace - (time.monotonic() - started)) if grace_s is not None else None)
        self.compute.shutdown()
        self.io.shutdown()
        for batcher in (self.batcher, self.radius_batcher):
            if batcher is not None:
                batcher.close()
        self.ledger.close()
        self.metrics.close()

    def enter_graceful_shutdown(self) -> None:
        """Health says NOT_SERVING from now on (for every service name)."""
        run_on_loop(self.health.enter_graceful_shutdown())

    def stop_now(self, grace_s: float | None = 0) -> None:
        """Close the port; calls still running after `grace_s` are cancelled (None: wait for all of them)."""
        run_on_loop(self.server.stop(grace_s))


async def _configure_health(server: grpc.aio.Server) -> health.aio.HealthServicer:
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", SERVICE_NAME):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _enable_reflection(server: grpc.aio.Server) -> None:
    """Server reflection under both names clients use: grpc.reflection.v1 (current grpcurl, Postman, grpc-js
    tooling) and v1alpha (older tools). grpcio-reflection ships only v1alpha; v1 is the same protocol with the
    same messages under a new package, so the one servicer answers both."""
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, REFLECTION_V1,
             reflection.SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        ),
    }),))


class BindError(OSError):
    """The server could not open its port (the message says what to change)."""


def _bind(server: grpc.aio.Server, config: ServerConfig) -> int:
    """Open the one port every service shares: TLS when ``config.tls`` is set, else insecure (with a warning off
    loopback, since every client's x-api-key would cross the network readable)."""
    address = f"{config.host}:{config.port}"
    if config.tls is None:
        if not is_loopback(config.host):
            log.warning("serving without TLS on %s: API keys would travel in clear text; give --tls-cert and "
                        "--tls-key", address)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as error:  # gRPC says only "Failed to bind"
            raise BindError(f"could not bind {address}: check --host (an address of this machine) and --port "
                            f"(free, or 0 for any free one) ({error})") from None
    else:
        try:
            port = server.add_secure_port(address, config.tls.server_credentials())
        except RuntimeError as error:  # gRPC says only "Failed to bind"; a key that does not fit is the usual cause
            raise BindError(f"could not bind {address} with TLS: is the private key the certificate's, and the "
                            f"port free? ({error})") from None
    if port == 0:
        raise BindError(f"could not bind {address}")
    return port


def start_server(config: ServerConfig, encoder: ServedEncoder | None = None, *,
                 accounting: bool = True) -> RunningServer:
    """Load the encoder (unless given), bind, start. The caller stops it (see ``run_server``).

    ``accounting=False`` leaves out metrics, keys and the ledger: only for the baseline that bench-service
    measures their cost against; never a way to serve (every call is free and anonymous, GetUsage fails).
    """
    ledger = open_ledger(config.ledger_path)  # first: an unusable ledger is reported before a long encoder load
    encoder = encoder or ServedEncoder.load(config.checkpoint, config.device, demo_kind=config.demo_kind)
    quotas = QuotaBook(ledger)
    admission = Admission(config.admission_limits)
    # every thread made below that runs torch work gets the configured intra-op threads (compute.set_torch_threads)
    torch_threads = config.intra_op_threads
    metrics = ServerMetrics(admission)
    # database calls of the interceptors and GetUsage: threads at normal priority, off the serving loop
    io = BackgroundCompute(threads=IO_THREADS, niceness=0, name="reaas-io")
    # outermost first: observation sees every call and its final status; undecodable bytes are refused before
    # anything reads a request; then who pays (and is it allowed), then is there room; the ledger row is written
    # after the answer, inside all of them
    interceptors: list[grpc.aio.ServerInterceptor] = [
        ObservingInterceptor(metrics), RequestDecodingInterceptor(), AccountInterceptor(ledger, quotas, io),
        AdmissionInterceptor(admission),
    ] if accounting else [RequestDecodingInterceptor(), AdmissionInterceptor(admission)]
    bound_costs = ()
    if config.mode == "reaas":
        bound_costs = encoder.measure_bound_costs(bounds.BOUNDS_OFFERED, budget_s=config.bound_cost_budget_s)
    # one compute thread per call admission may hold (made as needed): an admitted call never queues for one
    compute = BackgroundCompute(threads=config.admission_limits.max_held_calls, torch_threads=torch_threads)
    # Feature handlers submit here themselves (servicer.py): the pass runs on the batcher's lowered worker, which
    # also charges each answered call, the pass's rows in one commit (interceptors.CHARGE_WHERE_COMPUTED)
    batcher = None if config.batch_max_images == 0 else ForwardBatcher(
        lambda images, wanted: encoder.features(images, chunk_size=config.forward_chunk_size, still_wanted=wanted),
        max_images=config.batch_max_images, max_delay_s=config.batch_max_delay_s, device=encoder.device,
        lone_pass_in_caller=False, torch_threads=torch_threads, pass_scope=ledger.deferred_commits)
    # F2I requests for one searched bound share searches of up to one F2I chunk (the search runs chunk by chunk
    # anyway: a larger merge would gain nothing and only delay the callers' cancellation checks)
    f2i_batching = encoder.device.type == "cuda" if config.f2i_batching is None else config.f2i_batching
    shares_searches = f2i_batching and config.batch_max_images > 0 and config.mode == "reaas"
    radius_batcher = None if not shares_searches else RadiusBatcher(
        lambda images, radii, bound, wanted: encoder.image_radii(
            images, radii, bound=bound, chunk_size=config.f2i_chunk_size,
            memory_budget_bytes=config.f2i_memory_budget_per_search, still_wanted=wanted),
        max_images=config.f2i_chunk_size, max_delay_s=config.batch_max_delay_s, device=encoder.device,
        torch_threads=torch_threads)
    servicer = EncoderServicer(encoder, config, ledger, quotas, compute, io, batcher, bound_costs, radius_batcher)

    async def serve() -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", -1),
                # a fixed window (config.stream_window_bytes): BDP probing would grow it per connection without
                # bound (bench-load's 50 streams: 5.1x idle RSS with it)
                ("grpc.http2.bdp_probe", 0),
                ("grpc.http2.lookahead_bytes", config.stream_window_bytes),
            ],
        )
        pb_grpc.add_EncoderServiceServicer_to_server(servicer, server)
        health_servicer = await _configure_health(server)
        _enable_reflection(server)
        port = _bind(server, config)
        await server.start()
        return server, health_servicer, port

    try:
        server, health_servicer, port = run_on_loop(serve())
    except BaseException:
        for pool in (compute, io):
            pool.shutdown()
        for part in (batcher, radius_batcher):
            if part is not None:
                part.close()
        raise
    if config.metrics_port is not None:
        metrics_host = config.metrics_host or config.host
        if not is_loopback(metrics_host):
            log.warning("metrics on %s without TLS or a key: anyone who reaches that port reads every key's name and "
                        "usage; bind --metrics-host 127.0.0.1 (a local scraper or sidecar) or keep the port private",
                        metrics_host)
        log.info("metrics on http://%s:%d/metrics", metrics_host, metrics.serve_http(metrics_host, config.metrics_port))
    log.info(
        "serving %s (%s mode) on %s:%d (%s), device %s",
        encoder.metadata.model_id,
        config.mode,
        config.host,
        port,
        "insecure" if config.tls is None else "mutual TLS" if config.tls.mutual else "TLS",
        encoder.device,
    )
    return RunningServer(server, port, encoder, ledger, health_servicer, admission, compute, io, batcher, metrics,
                         radius_batcher)


@contextlib.contextmanager
def run_server(
    config: ServerConfig, encoder: ServedEncoder | None = None
) -> Iterator[tuple[grpc.Server, int]]:
    """Serve for the duration of a ``with`` block; yields ``(server, port)`` and always stops it."""
    running = start_server(config, encoder)
    try:
        yield running.server, running.port
    finally:
        running.stop(grace_s=0)
