"""Admission control by work: bounded pools, a fair wait queue in front of them, and a drain switch.

An encoder service is used by many clients at once, each sending a few images. Counting *calls* refused the fifth
concurrent 4-image call while the dynamic batcher would have put all of them in one pass, and raw clients answered
the refusals by re-sending at once (half the server's CPU went to refusing). So each pool is measured in what
costs: unary Feature (and Embed) in **images** running, feature streams and F2I calls in **calls** running (an F2I
search is seconds of CPU whatever its size; a stream holds its pool for its life). A call that does not fit
**waits** in the pool's queue, as Triton queues requests for its dynamic batcher, and is admitted when work ends:

* **Fair between keys.** When room frees, the waiting call of the key that holds the least of that pool goes first
  (ties: the oldest), so a key beside a heavy one is admitted within one slot time; and one key may hold at most
  ``key_share`` of a pool (the image pool keeps a quarter free for other keys: a light key's 4 images are never
  queued behind one key's 4 096-image calls).
* **Bounded.** An image pool's queue is bounded in images (every held request is in memory). The calls held here —
  running or waiting — are capped (``--workers`` minus ``--reserved-workers``; a waiting call is a suspended
  coroutine on the serving loop, and a running one may hold a compute thread), a key may hold at most three quarters of them, and no call waits longer than ``max_wait_s`` or its deadline. Past
  that a call is refused with RESOURCE_EXHAUSTED, the reason, and a retry hint in the message and in the standard
  ``grpc-retry-pushback-ms`` trailer. A caller who gives up while waiting leaves the queue at once.
* **Per key.** A key's own limit on running calls (``reaas-keys add --max-concurrent-calls``, default
  ``--max-calls-per-key``) makes its further calls wait, never fail. In open access each connection counts as its
  own key (one account "anonymous" would let one busy client take everybody's share).

While draining, waiting and new calls get UNAVAILABLE, which clients retry on another replica.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from reaas_client.retry import RETRY_PUSHBACK_HEADER
from reaas_server.interceptors import (
    CURRENT_CALLER,
    PerMethodInterceptor,
    abort,
    api_key_of,
    image_count,
    peer_of,
    replace_behavior,
    rpc_name,
)

# Which pool each EncoderService RPC draws from; RPCs not listed (descriptions, vocabulary, usage) are always
# admitted. Embed is a table lookup that costs a query like Feature, and shares its pool.
POOL_OF_RPC = {
    "Feature": "feature",
    "Embed": "feature",
    "StreamFeatures": "feature_stream",
    "F2IPerturb": "f2i",
    "StreamF2IPerturb": "f2i",
}
#: pools whose unit is the images (or token sequences) of a request; the others count calls
IMAGE_POOLS = frozenset({"feature"})


@dataclass(frozen=True)
class PoolLimit:
    """How much of one pool may run at once (``capacity`` units: images or calls), how much of it one key may
    hold (``key_share``), and how much may wait for it (``queue`` units; None: as many calls as may be held). A
    call larger than the capacity or the share still runs when it is its key's only work in an idle pool.

    Every call held keeps its request in memory, so an image pool bounds its queue in images: the capacity and
    the queue together are the most image data the pool keeps (a 4 096-image request held is ~50 MB of buffers
    and copies, measured)."""

    capacity: int
    key_share: int
    queue: int | None = None

    def __post_init__(self) -> None:
        if self.capacity < 1 or not 1 <= self.key_share <= self.capacity:
            raise ValueError(f"a pool needs capacity >= 1 and 1 <= key share <= capacity, got {self}")
        if self.queue is not None and self.queue < 0:
            raise ValueError(f"a pool's queue must be >= 0 units, got {self.queue}")


@dataclass(frozen=True)
class AdmissionLimits:
    """The pools, the calls that may be held at once (running or waiting), and the per-key limits."""

    pools: dict[str, PoolLimit]
    max_held_calls: int  # running + waiting, all pools: each holds its request (and maybe a compute thread)
    calls_per_key: int  # running calls of one key (all pools) unless its ApiKey says otherwise; more wait
    max_wait_s: float = 30.0

    def __post_init__(self) -> None:
        for pool in set(POOL_OF_RPC.values()):
            if pool not in self.pools:
                raise ValueError(f"pool {pool!r} needs limits")
        if self.max_held_calls < 1 or self.calls_per_key < 1 or self.max_wait_s < 0:
            raise ValueError("held calls and calls per key must be >= 1 and the longest wait >= 0")

    @property
    def held_calls_per_key(self) -> int:
        """One key may hold three quarters of the held calls, so others always find room to queue."""
        return max(1, self.max_held_calls * 3 // 4)

    @staticmethod
    def with_share(capacity: int, free_for_others: float, queue: int | None = None) -> PoolLimit:
        return PoolLimit(capacity, max(1, capacity - int(capacity * free_for_others)), queue)


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class _Ticket:
    """One call held by admission: waiting until it is ``decided`` (granted, or refused by a drain), then running
    until released."""

    pool: str
    key: str
    units: int
    key_limit: int
    arrived: float
    decided: bool = False
    # a waiting call awaits this future on its loop until the decision resolves it (made only for calls that wait:
    # most are admitted at once)
    woken: asyncio.Future | None = None
    started: float = 0.0
    refusal: _Refusal | None = None  # set instead of a grant when draining empties the queue

    def decide(self) -> None:
        self.decided = True
        if self.woken is not None:  # decided on whatever thread released room: wake the waiter on its loop
            self.woken.get_loop().call_soon_threadsafe(_resolve, self.woken)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class _PoolState:
    def __init__(self, limit: PoolLimit) -> None:
        self.limit = limit
        self.in_use = 0
        self.running: set[_Ticket] = set()
        self.by_key: dict[str, int] = collections.defaultdict(int)  # units each key holds here
        self.waiting: dict[str, collections.deque[_Ticket]] = {}  # key → its waiting calls, oldest first
        self.waiting_units = 0
        self.mean_duration_s: float | None = None


class Admission:
    """The accounting behind the interceptor: thread-safe (releases and drains come from any thread);
    ``admit_async`` suspends its call only while it waits its turn."""

    # a slot frees, on average, after the pool's mean call duration divided by its capacity (and no sooner than the
    # oldest running call's age divided by it, which matters before any call has finished); the hint stays in
    # [MIN, MAX] so that a first burst and a pathological call both give sensible advice
    MIN_RETRY_S = 0.05
    MAX_RETRY_S = 5.0

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pools = {name: _PoolState(limit) for name, limit in limits.pools.items()}
        self._running_calls: dict[str, int] = collections.defaultdict(int)  # key → running calls, all pools
        self._held = 0
        self._held_by_key: dict[str, int] = collections.defaultdict(int)
        self._draining = False
        self.refusals: dict[str, int] = collections.defaultdict(int)  # pool → calls refused (busy or draining)
        self.waited: dict[str, int] = collections.defaultdict(int)  # pool → calls that queued before running

    # -- what tests, metrics and the drain look at --------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Calls held: running or waiting."""
        with self._lock:
            return self._held

    def waiting(self, pool: str) -> int:
        with self._lock:
            return sum(len(queue) for queue in self._pools[pool].waiting.values())

    def in_use(self, pool: str) -> int:
        """Units (images or calls) running in `pool`."""
        with self._lock:
            return self._pools[pool].in_use

    def start_draining(self) -> None:
        """New calls get UNAVAILABLE from now on, and so do the calls still waiting (they never ran)."""
        with self._lock:
            self._draining = True
            for state in self._pools.values():
                for queue in state.waiting.values():
                    for ticket in queue:
                        ticket.refusal = self._unavailable(ticket.pool)
                        self._unhold(ticket.key)
                        ticket.decide()
                state.waiting.clear()
                state.waiting_units = 0

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no call is held (True) or `timeout_s` passes (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._held == 0, timeout=timeout_s)

    # -- admission ----------------------------------------------------------------------------------------------
    async def admit_async(self, pool: str, key: str, units: int = 1, key_limit: int | None = None,
                          deadline: float | None = None) -> Callable[[], None]:
        """Hold `units` of `pool` for `key`, waiting for them if need be; returns the (idempotent) release. A call
        that waits is a suspended coroutine on the serving loop, and leaves the queue at once when it is cancelled
        (grpc.aio cancels a call whose client went away).

        Raises _Refusal when the call cannot even queue (draining, the held calls or the key's share of them used
        up), or when it waited ``max_wait_s`` or until `deadline` (a ``time.monotonic()`` instant).
        """
        loop = asyncio.get_running_loop()

        def make_future(ticket: _Ticket) -> None:
            ticket.woken = loop.create_future()

        ticket = self._enqueue(pool, key, units, key_limit, make_future)
        if not ticket.decided:
            until = self._wait_until(ticket, deadline)
            try:
                await asyncio.wait_for(asyncio.shield(ticket.woken), max(0.0, until - time.monotonic()))
            except asyncio.CancelledError:
                if not self._give_up(ticket) and ticket.refusal is None:  # granted meanwhile: give it back
                    self._release_of(ticket)()
                raise
            except TimeoutError:
                if self._give_up(ticket):
                    raise self._busy(ticket.pool, f"server busy: no room in the {ticket.pool} pool within "
                                                  f"{time.monotonic() - ticket.arrived:.1f} s of waiting") from None
            if ticket.refusal is not None:
                raise ticket.refusal
        return self._release_of(ticket)

    def _wait_until(self, ticket: _Ticket, deadline: float | None) -> float:
        limit = ticket.arrived + self.limits.max_wait_s
        return limit if deadline is None else min(deadline, limit)

    def _enqueue(self, pool: str, key: str, units: int, key_limit: int | None,
                 make_signal: Callable[[_Ticket], None]) -> _Ticket:
        """A ticket for the call, started at once or queued with the signal `make_signal` gives it; raises _Refusal
        when it can neither run nor queue."""
        ticket = _Ticket(pool, key, max(1, units), key_limit or self.limits.calls_per_key, time.monotonic())
        with self._lock:
            if self._draining:
                raise self._unavailable(pool)
            if self._held >= self.limits.max_held_calls:
                raise self._busy(pool, f"server busy: {self._held} calls are running or queued, its limit")
            if (holding := self._held_by_key.get(key, 0)) >= self.limits.held_calls_per_key:
                raise self._busy(pool, f"this API key has {holding} calls running or queued, its share of the "
                                       "queue; wait for some to finish")
            self._held += 1
            self._held_by_key[key] += 1
            state = self._pools[pool]
            fits = self._fits(state, ticket)
            if fits and not state.waiting:
                self._start(state, ticket)
            elif (not fits and state.limit.queue is not None
                  and state.waiting_units + ticket.units > state.limit.queue):  # (one that fits is dispatched now)
                self._unhold(key)
                raise self._busy(pool, f"server busy: the {pool} pool is full and its queue has no room for "
                                       f"{ticket.units} more (it holds at most {state.limit.queue})")
            else:
                state.waiting_units += ticket.units
                make_signal(ticket)
                state.waiting.setdefault(key, collections.deque()).append(ticket)
                self.waited[pool] += 1
                self._dispatch(state)
        return ticket

    def _give_up(self, ticket: _Ticket) -> bool:
        """Take a waiting ticket out of its queue (True); False if it was decided meanwhile (granted, or refused
        by a drain: then it is no longer queued either)."""
        with self._lock:
            if ticket.decided:
                return False
            self._pools[ticket.pool].waiting[ticket.key].remove(ticket)
            self._forget_waiting(ticket)
            self._unhold(ticket.key)
            return True

    def _release_of(self, ticket: _Ticket) -> Callable[[], None]:
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                state = self._pools[ticket.pool]
                state.in_use -= ticket.units
                state.running.discard(ticket)
                state.by_key[ticket.key] -= ticket.units
                if state.by_key[ticket.key] == 0:
                    del state.by_key[ticket.key]
                self._running_calls[ticket.key] -= 1
                if self._running_calls[ticket.key] == 0:
                    del self._running_calls[ticket.key]
                self._unhold(ticket.key)
                duration = time.monotonic() - ticket.started
                mean = state.mean_duration_s
                state.mean_duration_s = duration if mean is None else 0.8 * mean + 0.2 * duration
                for other in self._pools.values():  # the key's running-call limit spans the pools
                    if other.waiting:
                        self._dispatch(other)
                self._idle.notify_all()

        return release

    # -- under the lock -----------------------------------------------------------------------------------------
    def _fits(self, state: _PoolState, ticket: _Ticket) -> bool:
        if self._running_calls.get(ticket.key, 0) >= ticket.key_limit:
            return False
        holds = state.by_key.get(ticket.key, 0)
        if holds == 0:  # a key's first call needs only room in the pool (all of it when it is larger)
            return state.in_use == 0 or state.in_use + ticket.units <= state.limit.capacity
        return (state.in_use + ticket.units <= state.limit.capacity
                and holds + ticket.units <= state.limit.key_share)

    def _start(self, state: _PoolState, ticket: _Ticket) -> None:
        state.in_use += ticket.units
        state.running.add(ticket)
        state.by_key[ticket.key] += ticket.units
        self._running_calls[ticket.key] += 1
        ticket.started = time.monotonic()
        ticket.decide()

    def _dispatch(self, state: _PoolState) -> None:
        """Start waiting calls while any fits: each time the head of the key that holds least of the pool."""
        while state.waiting:
            heads = [queue[0] for queue in state.waiting.values()]
            fitting = [t for t in heads if self._fits(state, t)]
            if not fitting:
                return
            ticket = min(fitting, key=lambda t: (state.by_key.get(t.key, 0), t.arrived))
            state.waiting[ticket.key].popleft()
            self._forget_waiting(ticket)
            self._start(state, ticket)

    def _forget_waiting(self, ticket: _Ticket) -> None:
        state = self._pools[ticket.pool]
        state.waiting_units -= ticket.units
        if not state.waiting.get(ticket.key, True):
            del state.waiting[ticket.key]

    def _unhold(self, key: str) -> None:
        self._held -= 1
        self._held_by_key[key] -= 1
        if self._held_by_key[key] == 0:
            del self._held_by_key[key]
        if self._held == 0:
            self._idle.notify_all()

    def _unavailable(self, pool: str) -> _Refusal:
        self.refusals[pool] += 1
        return _Refusal(grpc.StatusCode.UNAVAILABLE, "this replica is shutting down; retry on another replica", None)

    def _busy(self, pool: str, why: str) -> _Refusal:
        """A RESOURCE_EXHAUSTED refusal saying `why` and when to come back."""
        self.refusals[pool] += 1
        retry = self._retry_after_s(pool)
        return _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{why}; retry after {retry:.2f} s ({RETRY_PUSHBACK_HEADER} trailer)", retry)

    def _retry_after_s(self, pool: str) -> float:
        state = self._pools[pool]
        now = time.monotonic()
        oldest_age = now - min((t.started for t in state.running), default=now)
        expected = max(state.mean_duration_s or 0.0, oldest_age) / state.limit.capacity
        return min(self.MAX_RETRY_S, max(self.MIN_RETRY_S, expected))


async def _refuse(context: grpc.aio.ServicerContext, refusal: _Refusal) -> None:
    if refusal.retry_after_s is not None:
        context.set_trailing_metadata(((RETRY_PUSHBACK_HEADER, str(round(refusal.retry_after_s * 1000))),))
    await abort(context, refusal.code, refusal.message)


def _allowance_of(context: grpc.aio.ServicerContext) -> tuple[str, int | None]:
    """Whose allowance a call draws on, and that key's own running-call limit (None: the server's default).

    The account interceptor (outside this one) has resolved the caller. In open access every caller is the one
    account "anonymous", and a shared allowance would let one busy client take everyone's share (measured: 8 slow
    F2I callers left a light client 4 answered Feature calls out of 281); there each connection (peer) has its own
    allowance instead.
    """
    caller = CURRENT_CALLER.get()
    if caller is None:  # served without accounting (the benchmark baseline)
        return api_key_of(context.invocation_metadata()), None
    if caller.key is None:
        return f"{caller.name}@{peer_of(context)}", None
    return caller.name, caller.key.max_concurrent_calls


def _deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class AdmissionInterceptor(PerMethodInterceptor):
    """Admits each pooled EncoderService call through `admission`, holding its share until the call ends."""

    def __init__(self, admission: Admission) -> None:
        super().__init__()
        self._admission = admission

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        pool = POOL_OF_RPC.get(rpc_name(method) or "")
        if pool is None:
            return handler
        admission = self._admission
        counts_images = pool in IMAGE_POOLS

        async def admit(context: grpc.aio.ServicerContext, units: int) -> Callable[[], None]:
            key, key_limit = _allowance_of(context)
            try:
                return await admission.admit_async(pool, key, units, key_limit, _deadline_of(context))
            except _Refusal as refusal:
                await _refuse(context, refusal)
                raise AssertionError("unreachable: abort raises") from None

        def admitted_unary(behavior):
            async def admitted(request, context):
                release = await admit(context, image_count(request) if counts_images else 1)
                try:
                    return await behavior(request, context)
                finally:
                    release()

            return admitted

        def admitted_stream(behavior):
            async def admitted(request_iterator, context) -> AsyncIterator:
                release = await admit(context, 1)
                try:  # a cancelled stream's task is cancelled: this finally runs then too
                    async for response in behavior(request_iterator, context):
                        yield response
                finally:
                    release()

            return admitted

        return replace_behavior(handler, admitted_unary, admitted_stream)
