"""Admission by work: pools in images or calls, a fair bounded queue, refusals with a reason and a retry hint only
when the queue is full, health never starved."""

from __future__ import annotations

import asyncio
import concurrent.futures
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
from reaas_server.admission import RETRY_PUSHBACK_HEADER, Admission, AdmissionLimits, PoolLimit, _Refusal

LIMITS = AdmissionLimits(
    pools={"feature": PoolLimit(capacity=100, key_share=75), "feature_stream": PoolLimit(1, 1),
           "f2i": PoolLimit(2, 2)},
    max_held_calls=6, calls_per_key=4, max_wait_s=30.0)


def _wait_until(condition, timeout_s: float = 30.0) -> None:
    """Poll observable state (never a fixed sleep standing in for it)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the expected state was never reached"
        time.sleep(0.005)


class _Caller:
    """admit_async() as a call on the loop: `result` is the release once admitted, or the _Refusal; ``give_up``
    cancels the call, as grpc.aio does when its client goes."""

    def __init__(self, loop, admission: Admission, *args, **kwargs) -> None:
        self.result = None
        self._future = asyncio.run_coroutine_threadsafe(self._run(admission, args, kwargs), loop)

    async def _run(self, admission, args, kwargs):
        try:
            self.result = await admission.admit_async(*args, **kwargs)
        except _Refusal as refusal:
            self.result = refusal
        return self.result

    def give_up(self) -> None:
        self._future.cancel()

    def outcome(self, timeout_s: float = 30.0):
        return self._future.result(timeout_s)


@pytest.fixture()
def admit(loop):
    """admit_async() from the test's thread, for a call that is admitted or refused at once: its release."""
    def admit_now(admission: Admission, *args, **kwargs):
        return asyncio.run_coroutine_threadsafe(admission.admit_async(*args, **kwargs), loop).result(30)

    return admit_now


@pytest.fixture()
def caller(loop):
    return lambda admission, *args, **kwargs: _Caller(loop, admission, *args, **kwargs)


def test_a_call_that_finds_no_room_waits_and_runs_when_room_frees(admit, caller):
    admission = Admission(LIMITS)
    first = admit(admission, "f2i", "alice")
    admit(admission, "f2i", "bob")
    waiting = caller(admission, "f2i", "carol")
    _wait_until(lambda: admission.waiting("f2i") == 1)
    assert waiting.result is None  # queued, neither refused nor admitted
    admit(admission, "feature", "carol", units=10)()  # another pool is unaffected
    first()
    first()  # idempotent: a second release must not free a slot someone else holds
    assert callable(waiting.outcome())
    assert admission.in_use("f2i") == 2 and admission.waiting("f2i") == 0 and admission.refusals["f2i"] == 0


def test_images_are_the_unit_of_the_feature_pool_and_one_key_leaves_a_quarter_to_others(admit, caller):
    admission = Admission(AdmissionLimits(LIMITS.pools, max_held_calls=100, calls_per_key=100))
    for _ in range(25):  # many small calls of one key run at once: 75 images, its share
        admit(admission, "feature", "heavy", units=3)
    assert admission.in_use("feature") == 75
    queued = caller(admission, "feature", "heavy", units=3)  # over its share: waits
    _wait_until(lambda: admission.waiting("feature") == 1)
    light = admit(admission, "feature", "light", units=4)  # another key is admitted at once beside it
    assert admission.in_use("feature") == 79
    light()
    assert queued.result is None


def test_an_image_pool_queues_at_most_its_queue_in_images_and_refuses_a_request_that_does_not_fit(admit, caller):
    """Every held request is in memory: a big one that can neither run nor queue is refused with a hint."""
    pools = {**LIMITS.pools, "feature": PoolLimit(capacity=100, key_share=75, queue=20)}
    admission = Admission(AdmissionLimits(pools, max_held_calls=100, calls_per_key=100))
    admit(admission, "feature", "heavy", units=75)
    admit(admission, "feature", "other", units=25)  # the pool is full
    small = caller(admission, "feature", "light", units=15)
    _wait_until(lambda: admission.waiting("feature") == 1)
    with pytest.raises(_Refusal) as refused:
        admit(admission, "feature", "light", units=10)  # 15 + 10 > the queue's 20 images
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue has no room" in refused.value.message
    assert refused.value.retry_after_s is not None and admission.in_flight == 3
    assert small.result is None


def test_when_room_frees_the_key_holding_least_goes_first(admit, caller):
    """A key beside one running many slow calls is admitted within one slot time, before the heavy key's queue."""
    admission = Admission(LIMITS)
    heavy = [admit(admission, "f2i", "heavy"), admit(admission, "f2i", "heavy")]
    heavy_queued = caller(admission, "f2i", "heavy")
    _wait_until(lambda: admission.waiting("f2i") == 1)
    light = caller(admission, "f2i", "light")
    _wait_until(lambda: admission.waiting("f2i") == 2)
    heavy[0]()
    assert callable(light.outcome())  # light arrived later but holds nothing: it goes first
    assert heavy_queued.result is None and admission.waiting("f2i") == 1
    heavy[1]()
    assert callable(heavy_queued.outcome())


def test_a_keys_running_call_limit_queues_its_calls_instead_of_failing_them(admit, caller):
    admission = Admission(LIMITS)
    releases = [admit(admission, "feature", "alice", units=1, key_limit=2) for _ in range(2)]
    third = caller(admission, "feature", "alice", units=1, key_limit=2)
    _wait_until(lambda: admission.waiting("feature") == 1)
    admit(admission, "feature", "bob", units=1)()  # another key is not held up
    releases[0]()
    assert callable(third.outcome())


def test_the_queue_is_bounded_and_a_refusal_carries_the_reason_and_a_retry_hint(admit, caller):
    admission = Admission(LIMITS)  # 6 calls held at most, a key 4 of them
    for _ in range(2):
        admit(admission, "f2i", "alice")
    waiters = [caller(admission, "f2i", "alice") for _ in range(2)]
    _wait_until(lambda: admission.waiting("f2i") == 2)
    with pytest.raises(_Refusal) as refused:
        admit(admission, "f2i", "alice")  # alice holds 4 of the 6: her share of the queue
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "share of the queue" in refused.value.message and "retry after" in refused.value.message
    assert Admission.MIN_RETRY_S <= refused.value.retry_after_s <= Admission.MAX_RETRY_S
    waiters += [caller(admission, "f2i", "bob") for _ in range(2)]
    _wait_until(lambda: admission.in_flight == 6)
    with pytest.raises(_Refusal) as refused:
        admit(admission, "feature", "carol", units=1)  # nothing more may be held, whatever the pool
    assert "server busy" in refused.value.message and refused.value.retry_after_s is not None
    assert all(w.result is None for w in waiters)
    assert "carol" not in admission._held_by_key  # noqa: SLF001 - a refused caller leaves no trace (open access
    # makes a key of every connection: remembering refused ones would grow without bound)


def test_a_waiting_call_leaves_the_queue_when_its_client_gives_up_or_its_wait_runs_out(admit, caller):
    admission = Admission(AdmissionLimits(LIMITS.pools, max_held_calls=6, calls_per_key=4, max_wait_s=0.2))
    admit(admission, "f2i", "alice")
    admit(admission, "f2i", "alice")
    gives_up = caller(admission, "f2i", "bob")
    _wait_until(lambda: admission.waiting("f2i") == 1)
    gives_up.give_up()  # its client went away: grpc.aio cancels the call
    _wait_until(lambda: admission.waiting("f2i") == 0)
    with pytest.raises(concurrent.futures.CancelledError):
        gives_up.outcome()
    times_out = caller(admission, "f2i", "bob")  # max_wait_s 0.2
    refusal = times_out.outcome()
    assert refusal.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "waiting" in refusal.message
    past_deadline = caller(admission, "f2i", "bob", deadline=time.monotonic())
    assert past_deadline.outcome().code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert admission.waiting("f2i") == 0 and admission.in_flight == 2  # nothing of them is left held


def test_draining_refuses_new_and_waiting_calls_as_unavailable_and_waits_for_the_running_ones(admit, caller):
    admission = Admission(LIMITS)
    release = admit(admission, "f2i", "alice")
    admit(admission, "f2i", "alice")()
    admit(admission, "f2i", "alice")
    waiting = caller(admission, "f2i", "bob")
    _wait_until(lambda: admission.waiting("f2i") == 1)
    admission.start_draining()
    assert waiting.outcome().code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(_Refusal) as refused:
        admit(admission, "feature", "bob")
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert admission.in_flight == 2 and not admission.wait_idle(timeout_s=0)
    release()


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


OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # channels in one process would share one otherwise


def test_full_pools_queue_while_health_and_other_pools_answer_and_a_full_queue_refuses_with_a_hint(
        demo_encoder, make_images, blocked_bounds):
    proceed, entered = blocked_bounds
    # 5 calls held at most (8 handler threads, 3 kept for health and refusals), 1 F2I and 1 stream running
    config = ServerConfig(port=0, workers=8, reserved_workers=3, max_f2i_calls=1, max_feature_streams=1)
    images = make_images(2).numpy()
    feature = pb.FeatureRequest(images=encode_tensor(images))
    running = start_server(config, demo_encoder)
    never = threading.Event()

    def idle_requests():
        never.wait(60)
        yield from ()

    address = f"127.0.0.1:{running.port}"
    channels = [grpc.insecure_channel(address, options=OWN_CONNECTION) for _ in range(4)]
    a, b, c, d = (pb_grpc.EncoderServiceStub(channel) for channel in channels)
    try:
        held = a.F2IPerturb.future(_f2i_request(images), timeout=60)
        entered.get(timeout=30)  # observable: the first call holds the only F2I slot
        queued = [a.F2IPerturb.future(_f2i_request(images), timeout=60)]
        _wait_until(lambda: running.admission.waiting("f2i") == 1)
        idle_stream = b.StreamFeatures(idle_requests(), timeout=60)  # holds the only stream slot, no CPU
        _wait_until(lambda: running.admission.in_flight == 3)

        # unary Feature has its own pool and health its reserved threads
        assert c.Feature(feature, timeout=30).features.shape[0] == 2
        reply = health_pb2_grpc.HealthStub(channels[2]).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        queued += [c.F2IPerturb.future(_f2i_request(images), timeout=60) for _ in range(2)]
        _wait_until(lambda: running.admission.in_flight == 5)
        with pytest.raises(grpc.RpcError) as refused:  # nothing more may be held: refused, with a hint
            d.Feature(feature, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "server busy" in refused.value.details() and "retry after" in refused.value.details()
        assert int(dict(refused.value.trailing_metadata())[RETRY_PUSHBACK_HEADER]) > 0
        assert all(not call.done() for call in queued)

        proceed.set()  # the held call ends; the queued ones run one after another and are all answered
        for call in (held, *queued):
            assert len(call.result(timeout=60).radii) == 2
        never.set()
        assert list(idle_stream) == []
    finally:
        never.set()
        proceed.set()
        for channel in channels:
            channel.close()
        running.stop(grace_s=0)


def test_the_client_comes_back_after_the_servers_hint_and_is_answered(demo_encoder, make_images, blocked_bounds):
    proceed, entered = blocked_bounds
    config = ServerConfig(port=0, workers=4, reserved_workers=2, max_f2i_calls=1)  # 2 calls held at most
    running = start_server(config, demo_encoder)
    address = f"127.0.0.1:{running.port}"
    try:
        with grpc.insecure_channel(address, options=OWN_CONNECTION) as first, \
                grpc.insecure_channel(address, options=OWN_CONNECTION) as second:
            held = pb_grpc.EncoderServiceStub(first).F2IPerturb.future(_f2i_request(make_images(2).numpy()),
                                                                        timeout=60)
            entered.get(timeout=30)
            queued = pb_grpc.EncoderServiceStub(second).F2IPerturb.future(_f2i_request(make_images(2).numpy()),
                                                                           timeout=60)
            _wait_until(lambda: running.admission.in_flight == 2)
            with EncoderClient(address, timeout_s=60) as client, ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(client.f2i_perturb, make_images(3), [0.5] * 3, bound="lipschitz")
                _wait_until(lambda: running.admission.refusals["f2i"] >= 1)  # it was told to come back later
                proceed.set()
                assert len(waiting.result(timeout=60).image_radius) == 3
            assert len(held.result(timeout=60).radii) == 2 and len(queued.result(timeout=60).radii) == 2
    finally:
        proceed.set()
        running.stop(grace_s=0)


def test_in_open_access_each_connection_has_its_own_allowance(demo_encoder, make_images, blocked_bounds):
    """Everyone is the account 'anonymous' there: one busy client must not use up everybody's allowance."""
    proceed, entered = blocked_bounds
    config = ServerConfig(port=0, max_calls_per_key=1)
    images = make_images(2).numpy()
    feature = pb.FeatureRequest(images=encode_tensor(images))
    running = start_server(config, demo_encoder)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}", options=OWN_CONNECTION) as busy, \
                grpc.insecure_channel(f"127.0.0.1:{running.port}", options=OWN_CONNECTION) as light:
            busy_stub, light_stub = pb_grpc.EncoderServiceStub(busy), pb_grpc.EncoderServiceStub(light)
            held = busy_stub.F2IPerturb.future(_f2i_request(images), timeout=60)
            entered.get(timeout=30)
            waits = busy_stub.Feature.future(feature, timeout=60)  # the busy connection is at its limit of 1
            _wait_until(lambda: running.admission.waiting("feature") == 1)
            assert light_stub.Feature(feature, timeout=30).features.shape[0] == 2  # another connection is not
            assert not waits.done()
            proceed.set()
            held.result(timeout=60)
            assert waits.result(timeout=60).features.shape[0] == 2  # queued, never refused
    finally:
        proceed.set()
        running.stop(grace_s=0)
