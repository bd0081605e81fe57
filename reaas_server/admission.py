"""Admission control: bounded pools per kind of work, per-key limits, and a drain switch.

gRPC Python runs every handler — health checks included — on one thread pool. A pool filled by slow F2I calls
or long feature streams would leave health checks queued until a load balancer declares the replica dead. So
each EncoderService call must win a slot in its *pool* (unary Feature, feature streams, F2I) and in its
caller's per-key allowance before it runs; the pools together hold fewer calls than there are handler
threads, which keeps threads free for health, GetEncoderInfo and prompt refusals. A call that finds no slot
is refused at once with RESOURCE_EXHAUSTED and a retry hint (in the message and in the standard
``grpc-retry-pushback-ms`` trailer), never left to spend its deadline in a queue. While draining, new calls
get UNAVAILABLE, which clients retry on another replica.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from reaas_client.retry import RETRY_PUSHBACK_HEADER
from reaas_server.interceptors import CURRENT_CALLER, api_key_of, replace_behavior, rpc_name

# Which pool each EncoderService RPC draws from; RPCs not listed (descriptions, vocabulary, usage) are always
# admitted. Embed is a table lookup that costs a query like Feature, and shares its pool.
POOL_OF_RPC = {
    "Feature": "feature",
    "Embed": "feature",
    "StreamFeatures": "feature_stream",
    "F2IPerturb": "f2i",
    "StreamF2IPerturb": "f2i",
}


@dataclass(frozen=True)
class AdmissionLimits:
    """Concurrent calls admitted per pool and per API key (a call holds its slots until it ends)."""

    pool_calls: dict[str, int]
    calls_per_key: int

    def __post_init__(self) -> None:
        for pool in set(POOL_OF_RPC.values()):
            if self.pool_calls.get(pool, 0) < 1:
                raise ValueError(f"pool {pool!r} needs at least one call slot")
        if self.calls_per_key < 1:
            raise ValueError("calls_per_key must be >= 1")

    @property
    def total_calls(self) -> int:
        return sum(self.pool_calls.values())


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class Admission:
    """The slot accounting behind the interceptor: thread-safe, never blocks."""

    # a slot frees, on average, after the pool's mean call duration divided by its slots (and no sooner than the
    # oldest running call's age divided by them, which matters before any call has finished); the hint stays in
    # [MIN, MAX] so that a first burst and a pathological call both give sensible advice
    MIN_RETRY_S = 0.05
    MAX_RETRY_S = 5.0

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._in_pool: dict[str, int] = defaultdict(int)
        self._started: dict[str, dict[int, float]] = defaultdict(dict)  # pool → call → monotonic start
        self._per_key: dict[str, int] = defaultdict(int)
        self._mean_duration_s: dict[str, float] = {}
        self._draining = False
        self.refusals: dict[str, int] = defaultdict(int)  # pool → calls refused (busy or draining)
        self._idle = threading.Condition(self._lock)

    def start_draining(self) -> None:
        with self._lock:
            self._draining = True

    @property
    def in_flight(self) -> int:
        with self._lock:
            return sum(self._in_pool.values())

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no admitted call is running (True) or `timeout_s` passes (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: sum(self._in_pool.values()) == 0, timeout=timeout_s)

    def admit(self, pool: str, key: str, key_limit: int | None = None) -> Callable[[], None]:
        """Take a slot in `pool` and one of `key`'s (at most `key_limit`, default the server's per-key limit), or
        raise _Refusal. Returns the (idempotent) release."""
        key_limit = key_limit or self.limits.calls_per_key
        with self._lock:
            if self._draining:
                self.refusals[pool] += 1
                raise _Refusal(grpc.StatusCode.UNAVAILABLE,
                               "this replica is shutting down; retry on another replica", None)
            capacity = self.limits.pool_calls[pool]
            if self._in_pool[pool] >= capacity:
                raise self._busy(pool, f"server busy: all {capacity} {pool} call slots are in use")
            if self._per_key[key] >= key_limit:
                raise self._busy(pool, f"this API key already has {key_limit} calls in flight (its concurrent-call "
                                       "limit); wait for one to finish")
            self._in_pool[pool] += 1
            self._per_key[key] += 1
            started = time.monotonic()
            call = object()
            self._started[pool][id(call)] = started
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                self._in_pool[pool] -= 1
                del self._started[pool][id(call)]
                self._per_key[key] -= 1
                if self._per_key[key] == 0:
                    del self._per_key[key]
                duration = time.monotonic() - started
                mean = self._mean_duration_s.get(pool)
                self._mean_duration_s[pool] = duration if mean is None else 0.8 * mean + 0.2 * duration
                self._idle.notify_all()

        return release

    def _busy(self, pool: str, why: str) -> _Refusal:
        """A RESOURCE_EXHAUSTED refusal saying `why` and when to come back (lock held)."""
        self.refusals[pool] += 1
        retry = self._retry_after_s(pool)
        return _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{why}; retry after {retry:.2f} s ({RETRY_PUSHBACK_HEADER} trailer)", retry)

    def _retry_after_s(self, pool: str) -> float:
        oldest_age = time.monotonic() - min(self._started[pool].values(), default=time.monotonic())
        expected = max(self._mean_duration_s.get(pool, 0.0), oldest_age) / self.limits.pool_calls[pool]
        return min(self.MAX_RETRY_S, max(self.MIN_RETRY_S, expected))


def _refuse(context: grpc.ServicerContext, refusal: _Refusal) -> None:
    if refusal.retry_after_s is not None:
        context.set_trailing_metadata(((RETRY_PUSHBACK_HEADER, str(round(refusal.retry_after_s * 1000))),))
    context.abort(refusal.code, refusal.message)


def _allowance_of(context: grpc.ServicerContext) -> tuple[str, int | None]:
    """Whose per-key allowance a call draws on, and that key's own limit (None: the server's default).

    The account interceptor (outside this one) has resolved the caller. In open access every caller is the one
    account "anonymous", and a shared allowance would let one busy client refuse everyone else's calls (measured:
    8 slow F2I callers left a light client 4 answered Feature calls out of 281); there each connection (peer)
    has its own allowance instead.
    """
    caller = CURRENT_CALLER.get()
    if caller is None:  # served without accounting (the benchmark baseline)
        return api_key_of(context.invocation_metadata()), None
    if caller.key is None:
        return f"{caller.name}@{context.peer()}", None
    return caller.name, caller.key.max_concurrent_calls


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Admits each pooled EncoderService call through `admission`, holding its slots until the call ends."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        pool = POOL_OF_RPC.get(rpc_name(handler_call_details.method) or "")
        if handler is None or pool is None:
            return handler
        admission = self._admission

        def admit(context: grpc.ServicerContext) -> Callable[[], None]:
            key, key_limit = _allowance_of(context)
            try:
                return admission.admit(pool, key, key_limit)
            except _Refusal as refusal:
                _refuse(context, refusal)
                raise AssertionError("unreachable: abort raises") from None

        def admitted_unary(behavior):
            def admitted(request, context):
                release = admit(context)
                try:
                    return behavior(request, context)
                finally:
                    release()

            return admitted

        def admitted_stream(behavior):
            def admitted(request_iterator, context) -> Iterator:
                release = admit(context)
                # gRPC may drop a cancelled stream's generator without closing it: the termination callback
                # frees the slots then (release is idempotent)
                context.add_callback(release)
                try:
                    yield from behavior(request_iterator, context)
                finally:
                    release()

            return admitted

        return replace_behavior(handler, admitted_unary, admitted_stream)
