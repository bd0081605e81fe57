"""Undecodable request bytes → INVALID_ARGUMENT with one warning line, instead of gRPC's INTERNAL and traceback.

gRPC Python parses a request with the handler's ``request_deserializer`` before any handler or interceptor
behaviour runs; when parsing raises, gRPC logs the traceback and answers INTERNAL (grpc.aio: UNKNOWN), though the contract says a malformed request is INVALID_ARGUMENT. So the deserializer is wrapped to
return an :class:`UndecodableRequest` marker instead of raising, and the behaviour is wrapped to turn the marker
into the status: at once for a unary request, and for a request stream by ending the stream the servicer sees
at the marker (the servicer finishes the requests before it normally) and then rejecting the call.

Install this interceptor outside every interceptor that reads requests (accounting): the marker never reaches
them. An interceptor outside it (observation) sees the marker, which answers ``ByteSize()`` and counts no images.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from reaas_server.interceptors import PerMethodInterceptor, abort, remember_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UndecodableRequest:
    """Stands in for a request whose bytes are not a valid ``message_type``; ``error`` is the parser's reason."""

    message_type: str
    error: str
    size: int  # bytes received

    def ByteSize(self) -> int:  # noqa: N802 - the protobuf Message name, so byte counters can read it
        return self.size


def _tolerant(deserializer: Callable[[bytes], object], message_type: str) -> Callable[[bytes], object]:
    def deserialize(serialized: bytes) -> object:
        try:
            message = deserializer(serialized)
        except DecodeError as error:
            return UndecodableRequest(message_type, str(error), len(serialized))
        remember_size(message, len(serialized))  # the byte counters ask for it later (interceptors.message_size)
        return message

    return deserialize


async def _reject(request: UndecodableRequest, method: str, context: grpc.aio.ServicerContext) -> None:
    log.warning("%s from %s: undecodable %s: %s", method, context.peer(), request.message_type, request.error)
    await abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                f"request is not a valid {request.message_type}: {request.error}")


def _guard_unary_unary(behavior: Callable, method: str) -> Callable:
    """A marker is rejected before the behaviour runs."""

    async def guarded(request, context):
        if isinstance(request, UndecodableRequest):
            await _reject(request, method, context)
        return await behavior(request, context)

    return guarded


def _guard_unary_stream(behavior: Callable, method: str) -> Callable:
    if inspect.iscoroutinefunction(behavior):  # the reader-writer style (health's Watch writes with context.write)
        return _guard_unary_unary(behavior, method)

    async def guarded(request, context):
        if isinstance(request, UndecodableRequest):
            await _reject(request, method, context)
        async for response in behavior(request, context):
            yield response

    return guarded


async def _decoded_prefix(requests: AsyncIterator, undecodable: list[UndecodableRequest]) -> AsyncIterator:
    """The requests before the first marker; the marker, if any, is put in ``undecodable``."""
    async for request in requests:
        if isinstance(request, UndecodableRequest):
            undecodable.append(request)
            return
        yield request


def _guard_stream_stream(behavior: Callable, method: str) -> Callable:
    if inspect.iscoroutinefunction(behavior):  # the reader-writer style: responses go out by context.write
        return _guard_stream_unary(behavior, method)

    async def guarded(request_iterator, context):
        undecodable: list[UndecodableRequest] = []
        async for response in behavior(_decoded_prefix(request_iterator, undecodable), context):
            yield response
        if undecodable:
            await _reject(undecodable[0], method, context)

    return guarded


def _guard_stream_unary(behavior: Callable, method: str) -> Callable:
    async def guarded(request_iterator, context):
        undecodable: list[UndecodableRequest] = []
        response = await behavior(_decoded_prefix(request_iterator, undecodable), context)
        if undecodable:
            await _reject(undecodable[0], method, context)
        return response

    return guarded


def _message_name(deserializer: Callable[[bytes], object]) -> str:
    """"reaas.v1.FeatureRequest" for a generated ``FeatureRequest.FromString`` (any service's), else "request"."""
    message_class = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    return descriptor.full_name if descriptor is not None else "request"


class RequestDecodingInterceptor(PerMethodInterceptor):
    """Requests that do not parse — to the EncoderService, health or reflection — are answered INVALID_ARGUMENT
    with one WARNING log line, instead of gRPC's INTERNAL and traceback."""

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.request_deserializer is None:
            return handler
        deserializer = _tolerant(handler.request_deserializer, _message_name(handler.request_deserializer))
        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            behavior = _guard_unary_unary(handler.unary_unary, method)
            return grpc.unary_unary_rpc_method_handler(behavior, deserializer, serializer)
        if handler.unary_stream is not None:
            behavior = _guard_unary_stream(handler.unary_stream, method)
            return grpc.unary_stream_rpc_method_handler(behavior, deserializer, serializer)
        if handler.stream_unary is not None:
            behavior = _guard_stream_unary(handler.stream_unary, method)
            return grpc.stream_unary_rpc_method_handler(behavior, deserializer, serializer)
        behavior = _guard_stream_stream(handler.stream_stream, method)
        return grpc.stream_stream_rpc_method_handler(behavior, deserializer, serializer)
