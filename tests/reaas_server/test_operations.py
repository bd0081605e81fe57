"""Operations: health, reflection (a client with no generated code), deadlines, cancellation, SIGTERM drain."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import bounds.f2i
from reaas.v1 import encoder_service_pb2 as pb
from reaas.v1 import encoder_service_pb2_grpc as pb_grpc
from reaas_client import EncoderClient, encode_tensor
from reaas_server import ServerConfig, start_server


def test_health_reports_serving(reaas_address):
    with grpc.insecure_channel(reaas_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "reaas.v1.EncoderService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_watch_streams_serving_then_not_serving_when_the_server_drains(demo_encoder):
    """The health protocol's Watch (load balancers such as Envoy subscribe to it): its updates go out through the
    server's interceptors like any call's."""
    running = start_server(ServerConfig(port=0, bound_cost_budget_s=0.0), demo_encoder)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            running.enter_graceful_shutdown()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
    finally:
        running.stop(grace_s=0)


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


def _wait_until(condition, timeout_s: float) -> bool:
    """Poll an observable condition until it holds or `timeout_s` passes (generous: the CPUs may be busy)."""
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def _watch_the_search(encoder, monkeypatch) -> SimpleNamespace:
    """Instrument the F2I search on `encoder`: when each bound evaluation starts, and what image_radii returned.

    The first evaluation is held until the client has given up *and* the server sees the call as no longer wanted,
    so the deadline always falls mid-search, however slow the machine. Install it after the server has started
    (its start-up cost measurement evaluates bounds too).
    """
    watch = SimpleNamespace(started=[], outcome=[], returned=threading.Event(), client_gave_up=threading.Event(),
                            still_wanted=None)
    real_image_radii = encoder.image_radii
    real_evaluation = bounds.f2i.feature_distance_upper

    def image_radii(*args, still_wanted, **kwargs):
        watch.still_wanted = still_wanted
        try:
            watch.outcome.append(real_image_radii(*args, still_wanted=still_wanted, **kwargs))
        except Exception as error:
            watch.outcome.append(error)
            raise
        finally:
            watch.returned.set()
        return watch.outcome[-1]

    def evaluation(*args, **kwargs):
        watch.started.append(time.monotonic())
        if len(watch.started) == 1:
            watch.client_gave_up.wait(60)
            _wait_until(lambda: not watch.still_wanted(), 60)
        return real_evaluation(*args, **kwargs)

    monkeypatch.setattr(encoder, "image_radii", image_radii)
    monkeypatch.setattr(bounds.f2i, "feature_distance_upper", evaluation)
    return watch


def _f2i_past_its_deadline(port: int, images, watch, *, api_key: str = "anonymous") -> grpc.StatusCode:
    """A CROWN F2I call (a search of many bound evaluations) with a 2 s deadline; its status code."""
    request = pb.F2IPerturbRequest(images=encode_tensor(images.numpy()), feature_radii=[0.5] * len(images),
                                   bound="crown")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            pb_grpc.EncoderServiceStub(channel).F2IPerturb(request, timeout=2.0, metadata=(("x-api-key", api_key),))
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
    watch.client_gave_up.set()
    return code


def test_deadline_stops_the_bound_computation(demo_encoder, make_images, monkeypatch):
    """Within one bound evaluation of the deadline the server stops: no evaluation starts after it, and the search
    is abandoned (image_radii returns None) instead of running to its end."""
    running = start_server(ServerConfig(port=0), demo_encoder)
    try:
        watch = _watch_the_search(demo_encoder, monkeypatch)
        assert _f2i_past_its_deadline(running.port, make_images(8), watch) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert watch.returned.wait(120), "the search was still running 120 s after the deadline"
        # the server stopped the search itself (the deadline passed) before the client's cancel arrived: still
        # counted as what the client saw
        assert _wait_until(lambda: _calls_counted(running, "F2IPerturb") == 1, 60)
        assert _calls_counted(running, "F2IPerturb", "DEADLINE_EXCEEDED") == 1
    finally:
        running.stop(grace_s=0)
    assert watch.outcome == [None], f"the search ran on for a caller that had given up: {watch.outcome}"
    assert len(watch.started) == 1, f"{len(watch.started) - 1} bound evaluations started after the deadline"


def _calls_counted(running, rpc: str, code: str | None = None) -> int:
    """reaas_rpc_calls_total of `rpc` (with status `code`, or all)."""
    return sum(int(sample.value) for metric in running.metrics.calls.collect() for sample in metric.samples
               if sample.name.endswith("_total") and sample.labels["rpc"] == rpc
               and code in (None, sample.labels["code"]))


def test_a_cancelled_f2i_call_stops_its_search(demo_encoder, make_images, monkeypatch):
    """A client that cancels (no deadline) stops the search too: grpc.aio's context.done() and cancelled() stay
    False after a cancel, and a search that asked them ran on for seconds (bench-load: 7.3 s)."""
    running = start_server(ServerConfig(port=0), demo_encoder)
    try:
        watch = _watch_the_search(demo_encoder, monkeypatch)
        request = pb.F2IPerturbRequest(images=encode_tensor(make_images(8).numpy()), feature_radii=[0.5] * 8,
                                       bound="crown")
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            call = pb_grpc.EncoderServiceStub(channel).F2IPerturb.future(request, timeout=300)
            assert _wait_until(lambda: watch.started, 60), "the search never started"
            call.cancel()
            watch.client_gave_up.set()
            assert watch.returned.wait(120), "the search was still running 120 s after the cancel"
    finally:
        running.stop(grace_s=0)
    assert watch.outcome == [None], f"the search ran on for a caller that had cancelled: {watch.outcome}"
    assert len(watch.started) == 1, f"{len(watch.started) - 1} bound evaluations started after the cancel"


def test_an_expired_f2i_call_is_not_billed(demo_encoder, make_images, monkeypatch):
    running = start_server(ServerConfig(port=0), demo_encoder)
    try:
        watch = _watch_the_search(demo_encoder, monkeypatch)
        code = _f2i_past_its_deadline(running.port, make_images(8), watch, api_key="carol")
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert watch.returned.wait(120) and watch.outcome == [None]
        # the call's slot is released only after its handler and the usage interceptor around it returned, so
        # once nothing is in flight a wrong charge could no longer land after the report
        deadline = time.monotonic() + 60
        while running.admission.in_flight:
            assert time.monotonic() < deadline, "the expired call never left the server"
            time.sleep(0.01)
        with EncoderClient(f"127.0.0.1:{running.port}", api_key="carol", timeout_s=60) as carol:
            carol.f2i_perturb(make_images(2), [0.5, 0.5], bound="lipschitz")  # answered: billed
            usage = carol.usage()
    finally:
        running.stop(grace_s=0)
    assert usage.rpcs["F2IPerturb"].calls == 1 and usage.rpcs["F2IPerturb"].queries == 2
    assert usage.total_queries == 2


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
        [sys.executable, "-m", "reaas_server.cli", "--port", "0", "--grace", "20", "--log-level", "WARNING",
         "--ledger", ":memory:"],
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


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_answers_under_both_protocol_versions(reaas_address, version):
    """Current tools (grpcurl, grpc-js) speak grpc.reflection.v1, older ones v1alpha: both list and describe."""
    from grpc_reflection.v1alpha import reflection_pb2

    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="reaas.v1.EncoderService")]
    with grpc.insecure_channel(reaas_address) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        listed, described = list(call(iter(requests), timeout=30))
    names = {s.name for s in listed.list_services_response.service}
    assert {"reaas.v1.EncoderService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= names
    assert described.file_descriptor_response.file_descriptor_proto
