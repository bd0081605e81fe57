"""Server interceptors, one concern each: API-key authentication and usage accounting.

Both apply to the EncoderService only; health and reflection stay open and free.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator

import grpc
from google.protobuf.message import Message

from reaas_server.usage import UsageBook

SERVICE_PREFIX = "/reaas.v1.EncoderService/"
API_KEY_HEADER = "x-api-key"
ANONYMOUS = "anonymous"


def api_key_of(metadata: tuple | None) -> str:
    for key, value in metadata or ():
        if key == API_KEY_HEADER and value:
            return value
    return ANONYMOUS


def rpc_name(method: str) -> str | None:
    return method[len(SERVICE_PREFIX) :] if method.startswith(SERVICE_PREFIX) else None


def replace_behavior(handler: grpc.RpcMethodHandler, unary: Callable | None, stream: Callable | None):
    """The same handler with its unary-unary or stream-stream behaviour replaced (those are all we serve)."""
    if handler.unary_unary is not None and unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_stream is not None and stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer
        )
    return handler


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Rejects EncoderService calls whose ``x-api-key`` is missing or unknown with UNAUTHENTICATED."""

    def __init__(self, api_keys: frozenset[str]) -> None:
        self._api_keys = api_keys

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or rpc_name(handler_call_details.method) is None:
            return handler
        key = api_key_of(handler_call_details.invocation_metadata)
        if key in self._api_keys:
            return handler
        message = (
            f"missing API key: send gRPC metadata '{API_KEY_HEADER}'"
            if key == ANONYMOUS
            else f"unknown API key {key[:4]}…; ask the provider for a valid '{API_KEY_HEADER}'"
        )

        def reject_unary(_behavior):
            return lambda request, context: context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        def reject_stream(_behavior):
            def behavior(request_iterator, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
                yield  # pragma: no cover - abort raises

            return behavior

        return replace_behavior(handler, reject_unary, reject_stream)


def _image_count(request: Message) -> int:
    """Queries a request costs: its number of images (the paper's unit); 0 for requests without images."""
    if "images" not in request.DESCRIPTOR.fields_by_name or not request.HasField("images"):
        return 0
    shape = request.images.shape
    return int(shape[0]) if shape else 0


class UsageInterceptor(grpc.ServerInterceptor):
    """Charges each *answered* request to its API key: images as queries, serialized bytes both ways.

    A request that is rejected or never answered (invalid, cancelled) costs nothing.
    """

    def __init__(self, book: UsageBook) -> None:
        self._book = book

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        rpc = rpc_name(handler_call_details.method)
        if handler is None or rpc is None:
            return handler
        key = api_key_of(handler_call_details.invocation_metadata)
        book = self._book

        def charge(request: Message, response: Message) -> None:
            book.charge(
                key,
                rpc,
                queries=_image_count(request),
                request_bytes=request.ByteSize(),
                response_bytes=response.ByteSize(),
            )

        def count_unary(behavior):
            def counted(request, context):
                response = behavior(request, context)
                charge(request, response)
                return response

            return counted

        def count_stream(behavior):
            def counted(request_iterator: Iterator[Message], context) -> Iterator[Message]:
                pending: collections.deque[Message] = collections.deque()

                def tapped() -> Iterator[Message]:
                    for request in request_iterator:
                        pending.append(request)
                        yield request

                for response in behavior(tapped(), context):
                    charge(pending.popleft(), response)
                    yield response

            return counted

        return replace_behavior(handler, count_unary, count_stream)
