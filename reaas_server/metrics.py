"""Observation: Prometheus metrics and one access-log line (access_log.py) for every call, answered or refused.

``ObservingInterceptor`` comes first in the server's interceptor list, so gRPC applies it outermost: it sees every
call — EncoderService, health and reflection — and the status its client gets, refusals by the inner
interceptors (UNAUTHENTICATED, RESOURCE_EXHAUSTED, UNAVAILABLE while draining) included. grpc.aio decides that
status thus: a behaviour that returns (a response stream that ends) gives OK; one that aborts gives the aborted
code (recorded on the way through, ``_ObservedContext``); any other exception UNKNOWN; and a call whose client went
away — cancelled, or past its deadline — is cancelled as a task (its behaviour sees CancelledError): the client saw
CANCELLED, or DEADLINE_EXCEEDED once the deadline passed, and that is recorded. One race this cannot see: a client
that cancels a request stream while the behaviour waits for its next message may reach the behaviour as the end of
the stream (grpc.aio's read gives EOF for both, and exposes neither the client's half-close nor the cancellation)
before the task is cancelled; the behaviour then ends normally and the call counts OK (1 in 10 runs beside two CPU
hogs of a test that cancelled there; tests/reaas_server/test_metrics.py now pins the case that is decidable).
Calls to methods the server does not serve are answered UNIMPLEMENTED by gRPC before any interceptor can wrap
them, and are not counted (their names are the caller's to choose: a label per name would let any client grow the
registry).

Each server owns a ``CollectorRegistry`` (not prometheus_client's global one), so servers in one process —
tests — keep separate counts; ``serve_http`` exposes it on ``--metrics-port``.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator

import grpc
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from reaas.v1 import encoder_service_pb2 as pb
from reaas_server.access_log import ACCESS_LOG, access_line, key_label
from reaas_server.admission import POOL_OF_RPC, Admission
from reaas_server.interceptors import (
    CALLER_NAMED,
    PerMethodInterceptor,
    image_count,
    message_size,
    peer_of,
    rpc_name,
)

log = logging.getLogger(__name__)

# 1 ms (a refusal, GetEncoderInfo) to 60 s (a 4 096-image F2I search), about 2.5x apart
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)
# the F2I binary search stops after bounds.f2i's max_steps (30); 0 is a closed-form answer
SEARCH_STEP_BUCKETS = (0, 1, 2, 4, 6, 8, 12, 16, 20, 25, 30, 40)


class _AdmissionState:
    """reaas_admission_refusals_total{pool}, reaas_admission_waiting{pool} (calls in each pool's queue) and
    reaas_admission_in_use{pool} (images or calls running): read from the Admission itself when scraped."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        pools = sorted(set(POOL_OF_RPC.values()))
        refused = CounterMetricFamily("reaas_admission_refusals",
                                      "Calls admission refused (queue full, a key's share used, waited too long, "
                                      "draining), by pool", labels=["pool"])
        waiting = GaugeMetricFamily("reaas_admission_waiting", "Calls waiting in each pool's queue", labels=["pool"])
        in_use = GaugeMetricFamily("reaas_admission_in_use",
                                   "Units running in each pool: images (feature), calls (feature_stream, f2i)",
                                   labels=["pool"])
        refusals = dict(self._admission.refusals)
        for pool in pools:
            refused.add_metric([pool], refusals.get(pool, 0))
            waiting.add_metric([pool], self._admission.waiting(pool))
            in_use.add_metric([pool], self._admission.in_use(pool))
        yield from (refused, waiting, in_use)


class _RpcSeries:
    """One RPC's label children, looked up once rather than on every message."""

    def __init__(self, metrics: ServerMetrics, rpc: str) -> None:
        self.queries = metrics.queries.labels(rpc)
        self.request_bytes = metrics.request_bytes.labels(rpc)
        self.response_bytes = metrics.response_bytes.labels(rpc)
        self.received = metrics.received.labels(rpc)
        self.sent = metrics.sent.labels(rpc)
        self.latency = metrics.latency.labels(rpc)
        self.in_flight = metrics.in_flight.labels(rpc)


class ServerMetrics:
    """The server's metric families, in a registry of its own, and the HTTP exporter when one is asked for."""

    def __init__(self, admission: Admission | None = None) -> None:
        self.registry = r = CollectorRegistry()
        # registered first, so a scrape reads it before every other family: a call ends by recording its counts and
        # then leaving in_flight, so a scrape that sees it gone sees all it recorded (registered later, a scrape
        # could read calls_total before the call's end and in_flight after it: seen once under 2 OpenMP threads)
        self.in_flight = Gauge("reaas_rpc_in_flight", "Calls being handled now", ["rpc"], registry=r)
        self.calls = Counter("reaas_rpc_calls", "Calls ended, by RPC and the status code the client got",
                             ["rpc", "code"], registry=r)
        self.queries = Counter("reaas_rpc_queries",
                               "Images or token sequences in the requests the server answered (the paper's queries; "
                               "what GetUsage bills)",
                               ["rpc"], registry=r)
        self.request_bytes = Counter("reaas_rpc_request_bytes", "Serialized bytes of the request messages received",
                                     ["rpc"], registry=r)
        self.response_bytes = Counter("reaas_rpc_response_bytes", "Serialized bytes of the response messages sent",
                                      ["rpc"], registry=r)
        self.received = Counter("reaas_rpc_msg_received", "Request messages received (each batch of a stream)",
                                ["rpc"], registry=r)
        self.sent = Counter("reaas_rpc_msg_sent", "Response messages sent (each batch of a stream)",
                            ["rpc"], registry=r)
        self.latency = Histogram("reaas_rpc_latency_seconds",
                                 "Seconds from the handler's start to the call's status (a stream: its whole life)",
                                 ["rpc"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.search_steps = Histogram("reaas_f2i_search_steps",
                                      "F2I binary-search steps per answered image, by the bound that decided it",
                                      ["bound"], buckets=SEARCH_STEP_BUCKETS, registry=r)
        if admission is not None:
            r.register(_AdmissionState(admission))
        self._series: dict[str, _RpcSeries] = {}
        self._series_lock = threading.Lock()
        self._http = None
        # EncoderService series exist from the start at 0, so rate() and absent-series alerts work before a call
        for method in pb.DESCRIPTOR.services_by_name["EncoderService"].methods:
            self.series(method.name)
            self.calls.labels(method.name, grpc.StatusCode.OK.name)

    def series(self, rpc: str) -> _RpcSeries:
        series = self._series.get(rpc)
        if series is None:
            with self._series_lock:
                series = self._series.setdefault(rpc, _RpcSeries(self, rpc))
        return series

    def serve_http(self, host: str, port: int) -> int:
        """Start prometheus_client's exporter on ``host:port`` (0: a free port); returns the bound port."""
        self._http, _thread = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        return self.http_port

    @property
    def http_port(self) -> int | None:
        return None if self._http is None else self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _Call:
    """One call while it runs: counts each message as it passes, and ends exactly once (the first end wins)."""

    def __init__(self, metrics: ServerMetrics, rpc: str, context: grpc.aio.ServicerContext) -> None:
        self._metrics = metrics
        self._series = metrics.series(rpc)
        self._rpc = rpc
        self._context = context  # its metadata names a caller refused before the account was resolved
        self.caller: str | None = None  # the account's name, once the account interceptor has resolved it
        self._peer = peer_of(context)
        self._lock = threading.Lock()
        self._ended = False
        self._unanswered: collections.deque[int] = collections.deque()  # images of each unanswered request
        self.images = self.answered = self.request_bytes = self.response_bytes = 0
        self._started = time.perf_counter()
        self._series.in_flight.inc()

    def name_caller(self, name: str) -> None:
        self.caller = name

    def received(self, request: Message) -> None:
        images, size = image_count(request), message_size(request)
        self._unanswered.append(images)
        self.images += images
        self.request_bytes += size
        self._series.received.inc()
        self._series.request_bytes.inc(size)

    async def tap(self, requests: AsyncIterable[Message]) -> AsyncIterator[Message]:
        async for request in requests:
            self.received(request)
            yield request

    def sent(self, response: Message) -> None:
        """A response answers the oldest unanswered request (one each, in order, for every EncoderService RPC)."""
        images = self._unanswered.popleft() if self._unanswered else 0
        size = message_size(response)
        self.answered += images
        self.response_bytes += size
        series = self._series
        series.sent.inc()
        series.response_bytes.inc(size)
        if images:
            series.queries.inc(images)
        for radius in getattr(response, "radii", ()):
            self._metrics.search_steps.labels(radius.bound).observe(radius.search_steps)

    def end(self, code: grpc.StatusCode) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        seconds = time.perf_counter() - self._started
        series = self._series
        series.latency.observe(seconds)
        self._metrics.calls.labels(self._rpc, code.name).inc()
        if ACCESS_LOG.isEnabledFor(logging.INFO):
            ACCESS_LOG.info(access_line(
                rpc=self._rpc, key=self.caller or key_label(self._context.invocation_metadata()), code=code.name, ms=f"{seconds * 1000:.2f}",
                images=self.images, answered=self.answered, request_bytes=self.request_bytes,
                response_bytes=self.response_bytes, peer=self._peer,
            ))
        series.in_flight.dec()  # last: a scrape that sees the call gone sees everything it recorded


# a call the servicer ended because its client was gone (servicer._answered): the client saw its own deadline or
# cancel, and the metric says which, as for a call whose task was cancelled
_GAVE_UP = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)


def final_code(context: _ObservedContext, error: BaseException | None) -> grpc.StatusCode:
    """The status the client got, given how the behaviour ended (`error`: None for a normal end, else what it
    raised); see the module docstring for the rules."""
    if isinstance(error, asyncio.CancelledError) or (error is None and context.cancelled()):
        return _client_gone_code(context)
    if context.aborted in _GAVE_UP:  # the work stopped because the client went or its deadline passed: which one
        return _client_gone_code(context)
    if context.aborted is not None:
        return context.aborted
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


class ObservingInterceptor(PerMethodInterceptor):
    """Counts, times and logs every served call (all four call shapes); changes nothing about it."""

    def __init__(self, metrics: ServerMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        rpc = rpc_name(method) or method.lstrip("/")
        metrics = self._metrics
        streaming_in = handler.request_streaming

        def started(request_or_requests, raw_context) -> tuple[_Call, _ObservedContext, object]:
            context = _ObservedContext(raw_context)
            call = context.call = _Call(metrics, rpc, context)
            CALLER_NAMED.set(call.name_caller)
            if streaming_in:
                request_or_requests = call.tap(request_or_requests)
            else:
                call.received(request_or_requests)
            return call, context, request_or_requests

        def observe_unary(behavior: Callable) -> Callable:
            async def observed(request_or_requests, raw_context):
                call, context, request_or_requests = started(request_or_requests, raw_context)
                try:
                    response = await behavior(request_or_requests, context)
                except BaseException as error:
                    call.end(final_code(context, error))
                    raise
                if response is not None:  # None: a writer (its writes were counted) or the servicer's bug
                    call.sent(response)
                call.end(final_code(context, None))
                return response

            return observed

        def observe_stream(behavior: Callable) -> Callable:
            async def observed(request_or_requests, raw_context):
                call, context, request_or_requests = started(request_or_requests, raw_context)
                try:
                    async for response in behavior(request_or_requests, context):
                        call.sent(response)
                        yield response
                except BaseException as error:  # a cancelled call's task is cancelled here: CancelledError
                    call.end(final_code(context, error))
                    raise
                call.end(final_code(context, None))

            return observed

        def observe(behavior: Callable) -> Callable:
            # a response stream is an async generator, or a coroutine that writes with context.write (grpc.aio's
            # reader-writer style: health's Watch), whose writes the observed context counts
            streams = handler.response_streaming and not inspect.iscoroutinefunction(behavior)
            return observe_stream(behavior) if streams else observe_unary(behavior)

        return _with_behavior(handler, observe)


class _ObservedContext:
    """The call's context as the behaviours inside observation see it: the same, except that an ``abort`` leaves
    its code behind (grpc.aio sends an aborted status without recording it where ``code()`` would read it)."""

    __slots__ = ("_context", "aborted", "call")

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self.aborted: grpc.StatusCode | None = None
        self.call: _Call | None = None  # set once the call is observed: counts what a writer sends

    async def write(self, message: Message) -> None:
        if self.call is not None:
            self.call.sent(message)
        await self._context.write(message)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: tuple = ()) -> None:
        if self.aborted is None:
            self.aborted = code
        await self._context.abort(code, details, trailing_metadata)

    def __getattr__(self, name: str):
        return getattr(self._context, name)


# A client whose deadline fires cancels the call itself, and the cancel can reach the server before the server's
# copy of the deadline passes (that copy starts when the request's headers arrive, later than the client's under
# load): 1 of 4 expired calls was counted CANCELLED with remaining <= 0, and 1 of 4 again under CPU hogs with a
# 0.1 s slack. A client that cancels on purpose within 0.5 s of its deadline is counted DEADLINE_EXCEEDED: rare,
# and the lesser error.
_DEADLINE_SLACK_S = 0.5


def _client_gone_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= _DEADLINE_SLACK_S
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


def _with_behavior(handler: grpc.RpcMethodHandler, wrap: Callable[[Callable], Callable]) -> grpc.RpcMethodHandler:
    """The same handler, whatever its shape, with its behaviour wrapped."""
    make, behavior = {
        (False, False): (grpc.unary_unary_rpc_method_handler, handler.unary_unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
        (True, False): (grpc.stream_unary_rpc_method_handler, handler.stream_unary),
        (True, True): (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
    }[(handler.request_streaming, handler.response_streaming)]
    return make(wrap(behavior), handler.request_deserializer, handler.response_serializer)
