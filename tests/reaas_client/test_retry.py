"""The client's retry pieces: the backoff schedule and the buffer of unanswered stream requests (no server), and
what a stream raises when its batch generator fails (an in-process server)."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from reaas_client import EncoderClient
from reaas_client.retry import RETRY_PUSHBACK_HEADER, RetryPolicy, UnansweredRequests
from reaas_server import ServerConfig, run_server


def counted(items, pulls: list[int]):
    for item in items:
        pulls.append(item)
        yield item


def test_backoff_doubles_within_jitter_and_is_capped():
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.5, multiplier=2.0)
    for failures, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)]:
        assert ceiling / 2 <= policy.backoff_s(failures) <= ceiling


class _Refused(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, trailers: tuple = ()) -> None:
        self._code, self._trailers = code, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def trailing_metadata(self) -> tuple:
        return self._trailers


def test_busy_refusals_are_retried_after_the_servers_hint_until_the_deadline_and_others_are_answers():
    policy = RetryPolicy(max_attempts=2)
    busy = _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, ((RETRY_PUSHBACK_HEADER, "300"),))
    too_large = _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED)  # a batch over the limit: no hint, no retry
    told_not_to = _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, ((RETRY_PUSHBACK_HEADER, "-1"),))
    lost = _Refused(grpc.StatusCode.UNAVAILABLE)
    later = time.monotonic() + 60
    assert 0.3 <= policy.wait_s(busy, failures=1) <= 0.375
    assert policy.another_try(busy, failures=50, resend_by=later)  # busy is not the replica failing
    assert not policy.another_try(busy, failures=1, resend_by=time.monotonic() - 1)  # but the deadline holds
    assert not policy.another_try(too_large, failures=1, resend_by=later)
    assert not policy.another_try(told_not_to, failures=1, resend_by=later)
    assert policy.another_try(lost, failures=1, resend_by=later)
    assert not policy.another_try(lost, failures=2, resend_by=later)
    assert not RetryPolicy.retryable(_Refused(grpc.StatusCode.INVALID_ARGUMENT))


def test_a_new_pass_resends_the_unanswered_then_pulls_on_and_the_source_is_pulled_once():
    pulls: list[int] = []
    unanswered = UnansweredRequests(counted(range(6), pulls))
    first = unanswered.resend_then_pull()
    assert [next(first) for _ in range(3)] == [0, 1, 2]
    assert unanswered.answered() == 0
    second = unanswered.resend_then_pull()
    assert list(second) == [1, 2, 3, 4, 5]
    assert list(first) == []  # the failed call's pass stops once a new one runs
    assert pulls == [0, 1, 2, 3, 4, 5]
    assert len(unanswered) == 5  # nothing answered is kept; the unanswered are


def test_a_request_pulled_by_a_failed_calls_pass_goes_out_with_the_new_call():
    """gRPC pulls each pass in its own thread: the old one may still be inside the source when the new starts."""
    inside, release = threading.Event(), threading.Event()

    def slow_source():
        yield "a"
        inside.set()
        assert release.wait(10)
        yield "b"
        yield "c"

    unanswered = UnansweredRequests(slow_source())
    old = unanswered.resend_then_pull()
    assert next(old) == "a"
    old_rest: list[str] = []
    old_thread = threading.Thread(target=lambda: old_rest.extend(old))
    old_thread.start()
    assert inside.wait(10)  # the old pass is blocked pulling "b"
    new = unanswered.resend_then_pull()
    new_items: list[str] = []
    new_thread = threading.Thread(target=lambda: new_items.extend(new))
    new_thread.start()
    release.set()
    old_thread.join(10)
    new_thread.join(10)
    assert old_rest == []
    assert new_items == ["a", "b", "c"]


def test_an_error_of_the_source_is_kept_and_raised_by_every_later_pass():
    def failing():
        yield 1
        raise OSError("disk gone")

    unanswered = UnansweredRequests(failing())
    with pytest.raises(OSError):
        list(unanswered.resend_then_pull())
    assert isinstance(unanswered.source_error, OSError)
    with pytest.raises(OSError):
        list(unanswered.resend_then_pull())


def test_a_stream_raises_what_its_batch_generator_raised_not_a_service_error():
    def batches():
        yield np.zeros((2, 1, 28, 28), np.float32), None
        raise OSError("disk gone")

    with (
        run_server(ServerConfig(port=0, bound_cost_budget_s=0)) as (_, port),
        EncoderClient(f"127.0.0.1:{port}") as client,
        pytest.raises(OSError, match="disk gone"),
    ):
        list(client.stream_features(batches()))
