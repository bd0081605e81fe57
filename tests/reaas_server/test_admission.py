"""Admission: bounded pools, per-key limits, prompt RESOURCE_EXHAUSTED with a retry hint, health never starved."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import reaas_server.encoder_host as encoder_host
from reaas.v1 import encoder_service_pb2 as pb
from reaas.v1 import encoder_service_pb2_grpc as pb_grpc
from reaas_client import EncoderClient, encode_tensor
from reaas_server import ServerConfig, start_server
from reaas_server.admission import RETRY_PUSHBACK_HEADER, Admission, AdmissionLimits, _Refusal

LIMITS = AdmissionLimits(pool_calls={"feature": 1, "feature_stream": 1, "f2i": 2}, calls_per_key=2)


def test_a_full_pool_refuses_with_a_retry_hint_and_a_release_frees_the_slot():
    admission = Admission(LIMITS)
    release = admission.admit("f2i", "alice")
    admission.admit("f2i", "bob")
    with pytest.raises(_Refusal) as refused:
        admission.admit("f2i", "carol")
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert Admission.MIN_RETRY_S <= refused.value.retry_after_s <= Admission.MAX_RETRY_S
    assert "retry after" in refused.value.message
    admission.admit("feature", "carol")  # another pool is unaffected
    release()
    release()  # idempotent: a second release must not free a slot someone else holds
    admission.admit("f2i", "carol")
    with pytest.raises(_Refusal):
        admission.admit("f2i", "dave")


def test_one_key_cannot_take_more_than_its_allowance():
    admission = Admission(LIMITS)
    admission.admit("f2i", "alice")
    admission.admit("feature", "alice")
    with pytest.raises(_Refusal) as refused:
        admission.admit("feature_stream", "alice")
    assert "concurrent-call limit" in refused.value.message
    admission.admit("feature_stream", "bob")


def test_draining_refuses_new_calls_as_unavailable_and_waits_for_the_running_ones():
    admission = Admission(LIMITS)
    release = admission.admit("feature", "alice")
    admission.start_draining()
    with pytest.raises(_Refusal) as refused:
        admission.admit("f2i", "bob")
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert not admission.wait_idle(timeout_s=0)
    release()
    assert admission.wait_idle(timeout_s=0)


@pytest.fixture()
def blocked_bounds(monkeypatch):
    """F2I bound computations wait until the test sets `proceed`; `entered` counts those that started."""
    proceed = threading.Event()
    entered: queue.Queue = queue.Queue()
    real = encoder_host.bounds.f2i_radius

    def held(*args, **kwargs):
        entered.put(1)
        assert proceed.wait(timeout=60), "the test never released the held bound computation"
        return real(*args, **kwargs)

    monkeypatch.setattr(encoder_host.bounds, "f2i_radius", held)
    yield proceed, entered
    proceed.set()


def _f2i_request(images: np.ndarray) -> pb.F2IPerturbRequest:
    return pb.F2IPerturbRequest(images=encode_tensor(images), feature_radii=[0.5] * len(images), bound="lipschitz")


def test_full_pools_refuse_promptly_while_health_and_other_pools_still_answer(demo_encoder, make_images,
                                                                              blocked_bounds):
    proceed, entered = blocked_bounds
    config = ServerConfig(port=0, workers=6, max_feature_calls=1, max_feature_streams=1, max_f2i_calls=1,
                          max_calls_per_key=4, reserved_workers=3)
    images = make_images(2).numpy()
    running = start_server(config, demo_encoder)
    never = threading.Event()

    def idle_requests():
        never.wait(60)
        yield from ()

    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        stub = pb_grpc.EncoderServiceStub(channel)
        held = stub.F2IPerturb.future(_f2i_request(images), timeout=60)
        entered.get(timeout=30)  # observable: the first call holds the only F2I slot
        # a stream that sends nothing holds the only stream slot without using the CPU
        idle_stream = stub.StreamFeatures(idle_requests(), timeout=60)
        _wait_until(lambda: running.admission.in_flight == 2)

        with pytest.raises(grpc.RpcError) as refused:
            stub.F2IPerturb(_f2i_request(images), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry after" in refused.value.details()
        trailers = dict(refused.value.trailing_metadata())
        assert int(trailers[RETRY_PUSHBACK_HEADER]) > 0
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.StreamFeatures(iter([pb.FeatureRequest(images=encode_tensor(images))]), timeout=30))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # unary Feature has its own pool and health its reserved threads
        assert stub.Feature(pb.FeatureRequest(images=encode_tensor(images)), timeout=30).features.shape[0] == 2
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        proceed.set()
        assert len(held.result(timeout=60).radii) == 2
        # the freed F2I slot admits the next call
        assert len(stub.F2IPerturb(_f2i_request(images), timeout=60).radii) == 2
        never.set()
        assert list(idle_stream) == []
        channel.close()
    finally:
        never.set()
        running.stop(grace_s=0)


def _wait_until(condition, timeout_s: float = 30.0) -> None:
    """Poll observable server state (never a fixed sleep standing in for it)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the server never reached the expected state"
        time.sleep(0.01)


def test_the_client_comes_back_after_the_servers_hint_and_is_answered(demo_encoder, make_images, blocked_bounds):
    proceed, entered = blocked_bounds
    config = ServerConfig(port=0, workers=7, max_feature_calls=1, max_feature_streams=1, max_f2i_calls=1,
                          reserved_workers=4)
    running = start_server(config, demo_encoder)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            held = pb_grpc.EncoderServiceStub(channel).F2IPerturb.future(_f2i_request(make_images(2).numpy()),
                                                                          timeout=60)
            entered.get(timeout=30)
            with EncoderClient(f"127.0.0.1:{running.port}", timeout_s=60) as client, ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(client.f2i_perturb, make_images(3), [0.5] * 3, bound="lipschitz")
                _wait_until(lambda: running.admission.refusals["f2i"] >= 1)  # it was told to come back later
                proceed.set()
                assert len(waiting.result(timeout=60).image_radius) == 3
            assert len(held.result(timeout=60).radii) == 2
    finally:
        proceed.set()
        running.stop(grace_s=0)


def test_in_open_access_each_connection_has_its_own_allowance(demo_encoder, make_images, blocked_bounds):
    """Everyone is the account 'anonymous' there: one busy client must not use up everybody's allowance."""
    proceed, entered = blocked_bounds
    config = ServerConfig(port=0, workers=9, max_feature_calls=2, max_feature_streams=1, max_f2i_calls=2,
                          max_calls_per_key=1, reserved_workers=4)
    images = make_images(2).numpy()
    feature = pb.FeatureRequest(images=encode_tensor(images))
    running = start_server(config, demo_encoder)
    try:
        # channels in one process share connections unless told otherwise; two clients would not
        own_connection = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(f"127.0.0.1:{running.port}", options=own_connection) as busy, \
                grpc.insecure_channel(f"127.0.0.1:{running.port}", options=own_connection) as light:
            busy_stub, light_stub = pb_grpc.EncoderServiceStub(busy), pb_grpc.EncoderServiceStub(light)
            held = busy_stub.F2IPerturb.future(_f2i_request(images), timeout=60)
            entered.get(timeout=30)
            with pytest.raises(grpc.RpcError) as refused:
                busy_stub.Feature(feature, timeout=30)  # the busy connection is at its limit of 1
            assert "concurrent-call limit" in refused.value.details()
            assert light_stub.Feature(feature, timeout=30).features.shape[0] == 2  # another connection is not
            proceed.set()
            held.result(timeout=60)
    finally:
        proceed.set()
        running.stop(grace_s=0)
