"""What the client does when a replica is lost: re-send idempotent calls, resume streams where they stopped.

Every RPC the client makes is idempotent: GetEncoderInfo and GetUsage read, Feature and F2IPerturb are
deterministic functions of the request. So a call that failed with UNAVAILABLE (its replica killed, restarting
or unreachable) can be sent again unchanged, and round_robin sends it to a replica that is still up; the answer
is the one the lost replica would have given. gRPC's own retry policy cannot do this for the requests the client
sends: it keeps a copy only up to its retry buffer (256 KiB per call by default, 64 images of 1x28x28) and never
retries a stream after its first reply.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """At most ``max_attempts`` tries in a row that get no answer (UNAVAILABLE); a busy server's refusals with a
    retry hint (RESOURCE_EXHAUSTED + grpc-retry-pushback-ms) are retried until the call's deadline.

    Before try k + 1 the client waits a random time in [b/2, b], b = min(initial_backoff_s * multiplier^(k-1),
    max_backoff_s): gRPC's own schedule, with jitter so that many clients do not come back in step; after a
    busy refusal, the server's hint stretched by a random 0-25 % for the same reason.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    @staticmethod
    def retryable(error: grpc.RpcError) -> bool:
        """UNAVAILABLE: the call reached no live server, or lost it (or a draining one refused it); and
        RESOURCE_EXHAUSTED *with* a retry hint: the server was busy and said when to come back. Every other status
        (a RESOURCE_EXHAUSTED without a hint, e.g. a batch over the server's limit, included) is the answer."""
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            return True
        return error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_pushback_s(error) is not None

    def wait_s(self, error: grpc.RpcError, failures: int) -> float:
        """Seconds to wait before the next try: the server's retry hint when it gave one, else the backoff."""
        hint = retry_pushback_s(error)
        return hint * random.uniform(1.0, 1.25) if hint is not None else self.backoff_s(failures)

    def another_try(self, error: grpc.RpcError, failures: int, resend_by: float) -> bool:
        """Send again after the ``failures``-th failed try in a row? Only if retryable, and only if the next try
        can start (after its wait) by ``resend_by`` (time.monotonic(), before the deadline). UNAVAILABLE is tried at
        most ``max_attempts`` times; a busy server's refusal with a hint is not a failure of the replica, so it
        is retried for as long as the deadline allows."""
        if not self.retryable(error) or time.monotonic() >= resend_by:
            return False
        return error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED or failures < self.max_attempts

    def backoff_s(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed try in a row (``failures`` >= 1)."""
        ceiling = min(self.initial_backoff_s * self.multiplier ** (failures - 1), self.max_backoff_s)
        return random.uniform(ceiling / 2, ceiling)


RETRY_PUSHBACK_HEADER = "grpc-retry-pushback-ms"  # gRFC A6: the server's hint for when to retry


def retry_pushback_s(error: grpc.RpcError) -> float | None:
    """The server's retry hint in seconds (trailing metadata grpc-retry-pushback-ms), None when absent or
    negative (gRPC's convention for "do not retry")."""
    try:
        trailers = dict(error.trailing_metadata() or ())
    except Exception:  # an error raised before any server answered carries no trailers
        return None
    try:
        milliseconds = int(trailers.get(RETRY_PUSHBACK_HEADER, ""))
    except ValueError:
        return None
    return milliseconds / 1000 if milliseconds >= 0 else None


_MISSING = object()


class UnansweredRequests(Generic[T]):
    """The requests of a stream that were sent and not yet answered, kept so that a new call can re-send them.

    ``source`` is pulled lazily and once: each pass (one per call, ``resend_then_pull``) yields the unanswered
    requests first, in order, then new ones from ``source``. Only requests that gRPC's flow control let run ahead
    of the replies are held, never the whole source. Thread-safe: gRPC pulls a pass in its own thread, and the
    pass of a failed call may still be inside ``source`` when the next call's pass starts; a request pulled by
    either pass is kept at its place in the order, so none is lost or sent twice by the live call.
    """

    def __init__(self, source: Iterator[T]) -> None:
        self._source = source
        self._pending: collections.deque[T] = collections.deque()
        self._first = 0  # position in the stream of _pending[0]
        self._exhausted = False
        self.source_error: BaseException | None = None  # what ``source`` raised, if it did
        self._pass = 0  # the newest pass; older ones stop
        self._lock = threading.Lock()  # guards the fields above, held briefly
        self._pull_lock = threading.Lock()  # one pull from source at a time (a generator is not re-entrant)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def resend_then_pull(self) -> Iterator[T]:
        """A new pass for a new call: the unanswered requests, then the rest of the source."""
        with self._lock:
            self._pass += 1
            this_pass, position = self._pass, self._first
        while True:
            request = self._request_at(position, this_pass)
            if request is _MISSING:
                return
            position += 1
            yield request

    def answered(self) -> T:
        """The oldest unanswered request, which the reply just received answers; it is not kept any longer."""
        with self._lock:
            self._first += 1
            return self._pending.popleft()

    def _request_at(self, position: int, this_pass: int) -> T | object:
        while True:
            with self._lock:
                if this_pass != self._pass or position < self._first:
                    return _MISSING  # a newer call took over
                if position - self._first < len(self._pending):
                    return self._pending[position - self._first]
                if self.source_error is not None:
                    raise self.source_error
                if self._exhausted:
                    return _MISSING
            with self._pull_lock:
                with self._lock:  # another pass may have pulled it while this one waited
                    if self._first + len(self._pending) > position or self._exhausted or self.source_error:
                        continue
                try:
                    request = next(self._source)
                except StopIteration:
                    with self._lock:
                        self._exhausted = True
                    return _MISSING
                except Exception as error:
                    # kept for the consumer: gRPC reports it only as "Exception iterating requests!"
                    with self._lock:
                        self.source_error = error
                    raise
                with self._lock:
                    # first + len is unchanged by answers (popleft moves both), so this is `position`
                    self._pending.append(request)
