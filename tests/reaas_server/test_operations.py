"""Operations: health, reflection (a client with no generated code), deadlines, cancellation, SIGTERM drain."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import reaas_server.encoder_host as encoder_host
from reaas.v1 import encoder_service_pb2 as pb
from reaas.v1 import encoder_service_pb2_grpc as pb_grpc
from reaas_client import EncoderClient, ServiceError, encode_tensor
from reaas_server import ServerConfig, run_server


def test_health_reports_serving(reaas_address):
    with grpc.insecure_channel(reaas_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "reaas.v1.EncoderService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_client_built_from_reflection_alone_decodes_features(reaas_address, client, make_images):
    """What a client in another language does: descriptors from the server, raw little-endian bytes."""
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    images = make_images(3).numpy()
    with grpc.insecure_channel(reaas_address) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName("reaas.v1.EncoderService").methods_by_name["Feature"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        float32 = pool.FindEnumTypeByName("reaas.v1.DType").values_by_name["FLOAT32"].number
        request = request_class()
        request.images.dtype = float32
        request.images.shape.extend(images.shape)
        request.images.raw_data = images.astype("<f4").tobytes()
        call = channel.unary_unary(
            "/reaas.v1.EncoderService/Feature",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        reply = call(request, timeout=30)
    assert reply.features.dtype == float32
    decoded = np.frombuffer(reply.features.raw_data, "<f4").reshape(tuple(reply.features.shape))
    np.testing.assert_array_equal(decoded, client.features(images))


@pytest.fixture()
def slow_bounds(monkeypatch):
    """Each bound computation takes 0.2 s and is counted, so we can see when the server stops working."""
    calls = []
    real = encoder_host.bounds.f2i_radius

    def slow(*args, **kwargs):
        calls.append(time.monotonic())
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(encoder_host.bounds, "f2i_radius", slow)
    return calls


def test_deadline_stops_the_bound_computation(demo_encoder, make_images, slow_bounds):
    config = ServerConfig(port=0, f2i_chunk_size=1)
    with run_server(config, demo_encoder) as (_, port):
        with (
            EncoderClient(f"127.0.0.1:{port}", timeout_s=0.5) as client,
            pytest.raises(ServiceError) as raised,
        ):
            client.f2i_perturb(make_images(20), np.full(20, 0.5), bound="lipschitz")
        assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.6)
        assert len(slow_bounds) <= 5, "the server kept computing for a caller that had given up"


def test_cancelled_stream_stops_the_servers_work(reaas_address, make_images):
    pulled = []

    def endless_batches():
        while True:
            pulled.append(1)
            yield make_images(4), None

    with EncoderClient(reaas_address) as client:
        replies = client.stream_features(endless_batches())
        for _ in range(3):
            next(replies)
        replies.close()  # the consumer stops: the call is cancelled
        time.sleep(0.3)
        pulled_after_cancel = len(pulled)
        time.sleep(0.5)
        assert len(pulled) == pulled_after_cancel, "requests kept flowing after cancellation"


def test_sigterm_drains_in_flight_calls_then_exits(make_images):
    server = subprocess.Popen(
        [sys.executable, "-m", "reaas_server.cli", "--port", "0", "--grace", "20", "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = server.stdout.readline()
        assert "listening on" in line, line
        address = line.split("listening on ")[1].split()[0]
        outbox: queue.Queue = queue.Queue()

        def requests():
            while (item := outbox.get()) is not None:
                yield pb.FeatureRequest(images=encode_tensor(item))

        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.EncoderServiceStub(channel)
            replies = stub.StreamFeatures(requests(), timeout=60)
            outbox.put(make_images(2).numpy())
            assert next(replies).features.shape[0] == 2
            server.send_signal(signal.SIGTERM)
            # the drain, as load balancers and clients observe it: health flips to NOT_SERVING while the port is
            # still open, and new calls are refused as UNAVAILABLE (retried elsewhere by a client's policy)
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 30
            while health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
                health_pb2.HealthCheckResponse.SERVING
            ):
                assert time.monotonic() < deadline, "health still said SERVING 30 s after SIGTERM"
            with pytest.raises(grpc.RpcError) as refused:
                stub.Feature(pb.FeatureRequest(images=encode_tensor(make_images(1).numpy())), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            outbox.put(make_images(3).numpy())  # ... while the in-flight stream is still served
            assert next(replies).features.shape[0] == 3
            outbox.put(None)
            assert list(replies) == []
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
