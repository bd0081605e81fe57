"""The transport's ceiling (issue 22): a bare gRPC Python server answering ``reaas.v1.EncoderService`` Feature and
StreamFeatures with no encoder, no interceptors, no admission, no ledger.

It parses each FeatureRequest (as the real server must) and returns a FeatureResponse of the real one's size:
features [batch, feature_dim] float32 zeros. GetEncoderInfo answers the few fields ``EncoderClient`` reads, so the
typed client can call it too. Every throughput row of ``make bench-service`` has this server's rate beside it, in
the same run, under the same load: what gRPC Python itself allows on this machine.

Run as a child (``python -m benchmarks.bare_server --feature-dim 64``): it prints the handshake line
"bare-server listening on 127.0.0.1:PORT" and serves until SIGTERM or until its stdin closes (the parent died or
was done), so a killed benchmark leaves no server behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent import futures

import grpc

from reaas.v1 import encoder_service_pb2 as pb

SERVICE = "reaas.v1.EncoderService"
_MIB = 1024 * 1024


def zero_features(request: pb.FeatureRequest, feature_dim: int) -> pb.FeatureResponse:
    """A reply of the real one's size: [batch, feature_dim] float32 zeros, batch read from the request's shape."""
    tensor = request.images if request.HasField("images") else request.token_ids
    batch = int(tensor.shape[0]) if tensor.shape else 0
    return pb.FeatureResponse(features=pb.Tensor(dtype=pb.FLOAT32, shape=[batch, feature_dim],
                                                 raw_data=bytes(4 * batch * feature_dim)))


def minimal_encoder_info(feature_dim: int, input_shape: tuple[int, int, int], max_batch_size: int,
                  max_message_bytes: int) -> pb.EncoderInfo:
    """The few fields ``EncoderClient`` reads."""
    return pb.EncoderInfo(input_shape=list(input_shape), accepted_dtypes=[pb.FLOAT32], value_min=0.0, value_max=1.0,
                          feature_dim=feature_dim, model_id="bare (no encoder)", mode="seaas",
                          max_batch_size=max_batch_size, max_message_bytes=max_message_bytes, open_access=True,
                          modality="image")


def _generic_handler(feature, stream_features, encoder_info) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Feature": grpc.unary_unary_rpc_method_handler(
            feature, request_deserializer=pb.FeatureRequest.FromString,
            response_serializer=pb.FeatureResponse.SerializeToString),
        "StreamFeatures": grpc.stream_stream_rpc_method_handler(
            stream_features, request_deserializer=pb.FeatureRequest.FromString,
            response_serializer=pb.FeatureResponse.SerializeToString),
        "GetEncoderInfo": grpc.unary_unary_rpc_method_handler(
            encoder_info, request_deserializer=pb.EncoderInfoRequest.FromString,
            response_serializer=pb.EncoderInfo.SerializeToString),
    })


def bare_handler(feature_dim: int, input_shape: tuple[int, int, int], max_batch_size: int,
                 max_message_bytes: int) -> grpc.GenericRpcHandler:
    """A generic handler for Feature, StreamFeatures and GetEncoderInfo; no validation, no encoder."""
    info = minimal_encoder_info(feature_dim, input_shape, max_batch_size, max_message_bytes)

    def feature(request: pb.FeatureRequest, context: grpc.ServicerContext) -> pb.FeatureResponse:
        return zero_features(request, feature_dim)

    def stream_features(requests: Iterable[pb.FeatureRequest], context: grpc.ServicerContext
                        ) -> Iterator[pb.FeatureResponse]:
        for request in requests:
            yield zero_features(request, feature_dim)

    def encoder_info(request: pb.EncoderInfoRequest, context: grpc.ServicerContext) -> pb.EncoderInfo:
        return info

    return _generic_handler(feature, stream_features, encoder_info)


def bare_aio_handler(feature_dim: int, input_shape: tuple[int, int, int], max_batch_size: int,
                     max_message_bytes: int) -> grpc.GenericRpcHandler:
    """The same service for ``grpc.aio`` (one event loop, no handler threads), the transport reaas-server runs on."""
    info = minimal_encoder_info(feature_dim, input_shape, max_batch_size, max_message_bytes)

    async def feature(request: pb.FeatureRequest, context) -> pb.FeatureResponse:
        return zero_features(request, feature_dim)

    async def stream_features(requests, context):
        async for request in requests:
            yield zero_features(request, feature_dim)

    async def encoder_info(request: pb.EncoderInfoRequest, context) -> pb.EncoderInfo:
        return info

    return _generic_handler(feature, stream_features, encoder_info)


@contextlib.contextmanager
def server_child(command: list[str]) -> Iterator[tuple[subprocess.Popen, str]]:
    """A benchmark server child that prints "... listening on HOST:PORT ..." and serves until its stdin closes;
    yields (process, "HOST:PORT") and stops it on exit."""
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        if "listening on " not in line:
            raise RuntimeError(f"{' '.join(command)} did not start: {line!r}")
        yield process, line.split("listening on ")[1].split()[0]
    finally:
        process.stdin.close()  # the child's signal to stop
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


def bare_server_process(feature_dim: int, input_shape: tuple[int, int, int] = (1, 28, 28), workers: int = 128,
                        aio: bool = False) -> contextlib.AbstractContextManager[tuple[subprocess.Popen, str]]:
    """A bare server child on a free loopback port; yields (process, "127.0.0.1:PORT") and stops it on exit.
    ``aio``: served by grpc.aio (an event loop) instead of gRPC's thread-pool server."""
    return server_child([sys.executable, "-m", "benchmarks.bare_server", "--feature-dim", str(feature_dim),
                         "--input-shape", ",".join(map(str, input_shape)), "--workers", str(workers),
                         *(["--aio"] if aio else [])])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--feature-dim", type=int, required=True, help="features per image in each reply")
    parser.add_argument("--input-shape", default="1,28,28", help="C,H,W reported by GetEncoderInfo")
    parser.add_argument("--workers", type=int, default=128, help="handler threads (the earlier thread-pool server's default)")
    parser.add_argument("--max-message-mb", type=float, default=64.0)
    parser.add_argument("--aio", action="store_true", help="serve with grpc.aio (an event loop, no handler threads)")
    args = parser.parse_args(argv)
    shape = tuple(int(n) for n in args.input_shape.split(","))
    if len(shape) != 3 or args.feature_dim < 1:
        parser.error("--input-shape needs C,H,W and --feature-dim must be >= 1")
    message_bytes = int(args.max_message_mb * _MIB)
    if args.aio:
        asyncio.run(_serve_aio(args.feature_dim, shape, message_bytes))
        return
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers), options=[
        ("grpc.max_receive_message_length", message_bytes), ("grpc.max_send_message_length", -1)])
    server.add_generic_rpc_handlers((bare_handler(args.feature_dim, shape, 4096, message_bytes),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print(f"bare-server listening on 127.0.0.1:{port} feature_dim={args.feature_dim}", flush=True)
    stop.wait()
    server.stop(grace=1).wait()


async def _serve_aio(feature_dim: int, shape: tuple[int, int, int], message_bytes: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", message_bytes),
                                      ("grpc.max_send_message_length", -1)])
    server.add_generic_rpc_handlers((bare_aio_handler(feature_dim, shape, 4096, message_bytes),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
    print(f"bare-server listening on 127.0.0.1:{port} feature_dim={feature_dim} aio", flush=True)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    main()
