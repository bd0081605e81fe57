"""Assemble a gRPC server: encoder servicer, interceptors, health and reflection services."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import bounds
from reaas.v1 import encoder_service_pb2 as pb
from reaas.v1 import encoder_service_pb2_grpc as pb_grpc
from reaas_server.config import ServerConfig
from reaas_server.decoding import RequestDecodingInterceptor
from reaas_server.encoder_host import ServedEncoder
from reaas_server.interceptors import ApiKeyInterceptor, UsageInterceptor
from reaas_server.servicer import EncoderServicer
from reaas_server.usage import UsageBook

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EncoderService"].full_name


@dataclass
class RunningServer:
    """A started server and the parts tests and the CLI look at."""

    server: grpc.Server
    port: int
    encoder: ServedEncoder
    usage: UsageBook
    health: health.HealthServicer

    def stop(self, grace_s: float | None) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let in-flight calls finish for ``grace_s`` seconds."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()


def _configure_health(server: grpc.Server) -> health.HealthServicer:
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", SERVICE_NAME):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def start_server(config: ServerConfig, encoder: ServedEncoder | None = None) -> RunningServer:
    """Load the encoder (unless given), bind, start. The caller stops it (see ``run_server``)."""
    encoder = encoder or ServedEncoder.load(config.checkpoint, config.device, demo_kind=config.demo_kind)
    usage = UsageBook()
    interceptors: list[grpc.ServerInterceptor] = []
    if config.api_keys is not None:
        interceptors.append(ApiKeyInterceptor(config.api_keys))
    # The first in the list is the outermost: keys are checked before bytes are judged, and undecodable
    # requests are rejected before usage accounting (which reads requests) could see them.
    interceptors.append(RequestDecodingInterceptor())
    interceptors.append(UsageInterceptor(usage))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="reaas"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", -1),
        ],
    )
    bound_costs = ()
    if config.mode == "reaas":
        bound_costs = encoder.measure_bound_costs(bounds.BOUNDS_OFFERED, budget_s=config.bound_cost_budget_s)
    pb_grpc.add_EncoderServiceServicer_to_server(EncoderServicer(encoder, config, usage, bound_costs), server)
    health_servicer = _configure_health(server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"could not bind {config.host}:{config.port}")
    server.start()
    log.info(
        "serving %s (%s mode) on %s:%d, device %s",
        encoder.metadata.model_id,
        config.mode,
        config.host,
        port,
        encoder.device,
    )
    return RunningServer(server, port, encoder, usage, health_servicer)


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
