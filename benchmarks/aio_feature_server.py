"""The Feature and StreamFeatures path alone on one grpc.aio event loop, with the real work per call and none of the
service around it: built to answer issue 22's question "would grpc.aio serve many small clients faster?" (it did, and
reaas-server now runs on grpc.aio); kept as a column of many_clients.md, so the cost of the real server's service
layers stays measured. Not a server to deploy.

On the loop, per call: the request's images decoded and validated (``reaas_server.validation.decode_images``, as the
real server does) and queued. One asyncio task gathers every queued request into a single forward pass of the
served encoder on one worker thread (one thread hand-off per pass, none per call), which also charges each request
of the pass to the project's own SQLite ledger (``reaas_server.ledger.UsageLedger.charge``, committed before the
replies leave); each call is then answered with its rows of the pass's features. A stream keeps two messages in work, as the real server does.
Left out: metrics, API keys and quotas, admission, deadlines and cancellation, error statuses (a bad request fails
the call with gRPC's UNKNOWN). Its rate is therefore what the real server could reach without those layers;
``benchmarks.many_clients`` puts it beside the bare and the real server.

Run as a child (``python -m benchmarks.aio_feature_server --demo-kind pca``): it prints "aio-feature-server
listening on 127.0.0.1:PORT" and serves until its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import torch

from benchmarks.bare_server import SERVICE, minimal_encoder_info, server_child
from reaas.v1 import encoder_service_pb2 as pb
from reaas_client.wire import encode_tensor
from reaas_server import ServedEncoder
from reaas_server.ledger import ANONYMOUS, SqlLedger, open_ledger
from reaas_server.memory import limit_heap_growth
from reaas_server.validation import ImageSpec, decode_images

PIPELINE_DEPTH = 2  # a stream's messages in work at once, as reaas_server.servicer's StreamFeatures


class PassBatcher:
    """Requests queued on the loop; one task runs all queued requests as one pass on the worker thread."""

    def __init__(self, encoder: ServedEncoder, ledger: SqlLedger, chunk_size: int = 256) -> None:
        self._encoder, self._ledger, self._chunk_size = encoder, ledger, chunk_size
        self._worker = concurrent.futures.ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,))
        self._queue: list[tuple[torch.Tensor, asyncio.Future, int]] = []
        self._wake = asyncio.Event()

    async def features(self, images: torch.Tensor, request_bytes: int) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((images, future, request_bytes))
        self._wake.set()
        return await future

    def _pass(self, images: torch.Tensor, charges: list[tuple[int, int]]) -> np.ndarray:
        """The pass's features; each request (images, request bytes) charged as the real server charges a call
        (response bytes: its features' raw bytes)."""
        features = self._encoder.features(images, chunk_size=self._chunk_size, still_wanted=lambda: True).numpy()
        row_bytes = features.itemsize * features.shape[1]
        for count, request_bytes in charges:
            self._ledger.charge(ANONYMOUS, "Feature", queries=count, request_bytes=request_bytes,
                                response_bytes=count * row_bytes)
        return features

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                jobs, self._queue = self._queue, []
                images = torch.cat([images for images, _, _ in jobs]) if len(jobs) > 1 else jobs[0][0]
                charges = [(len(images), size) for images, _, size in jobs]
                try:
                    features = await loop.run_in_executor(self._worker, self._pass, images, charges)
                except Exception as error:  # noqa: BLE001 - every caller of the pass learns it
                    for _, future, _ in jobs:
                        future.set_exception(error)
                    continue
                starts = itertools.accumulate((len(images) for images, _, _ in jobs), initial=0)
                for (images, future, _), start in zip(jobs, starts, strict=False):
                    future.set_result(features[start:start + len(images)])


def _sized(message_type):
    """A deserializer that keeps the wire size beside the message (the ledger row's request bytes, for free)."""
    return lambda data: (message_type.FromString(data), len(data))


def handler(batcher: PassBatcher, spec: ImageSpec, info: pb.EncoderInfo) -> grpc.GenericRpcHandler:
    async def feature(sized, context) -> pb.FeatureResponse:
        request, size = sized
        rows = await batcher.features(decode_images(request.images, spec), size)
        return pb.FeatureResponse(features=encode_tensor(rows))

    async def stream_features(requests: AsyncIterator, context) -> AsyncIterator[pb.FeatureResponse]:
        pending: collections.deque[asyncio.Task] = collections.deque()
        async for sized in requests:
            pending.append(asyncio.ensure_future(feature(sized, context)))
            while len(pending) >= PIPELINE_DEPTH or (pending and pending[0].done()):
                yield await pending.popleft()
        while pending:
            yield await pending.popleft()

    async def encoder_info(request, context) -> pb.EncoderInfo:
        return info

    serialize = pb.FeatureResponse.SerializeToString
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Feature": grpc.unary_unary_rpc_method_handler(feature, _sized(pb.FeatureRequest), serialize),
        "StreamFeatures": grpc.stream_stream_rpc_method_handler(stream_features, _sized(pb.FeatureRequest),
                                                                serialize),
        "GetEncoderInfo": grpc.unary_unary_rpc_method_handler(encoder_info, pb.EncoderInfoRequest.FromString,
                                                              pb.EncoderInfo.SerializeToString),
    })


async def _serve(demo_kind: str, ledger_path: Path) -> None:
    limit_heap_growth("lean")  # the real server's default policy
    encoder = ServedEncoder.load(None, "cpu", demo_kind=demo_kind)
    meta = encoder.metadata
    spec = ImageSpec(tuple(meta.input_shape), 0.0, 1.0, 4096)
    batcher = PassBatcher(encoder, open_ledger(ledger_path))
    message_bytes = 64 << 20
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", message_bytes),
                                      ("grpc.max_send_message_length", -1)])
    info = minimal_encoder_info(meta.feature_dim, spec.input_shape, spec.max_batch_size, message_bytes)
    server.add_generic_rpc_handlers((handler(batcher, spec, info),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    passes = asyncio.create_task(batcher.run())
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
    print(f"aio-feature-server listening on 127.0.0.1:{port} demo_kind={demo_kind}", flush=True)
    await stop.wait()
    passes.cancel()
    await server.stop(1)


@contextlib.contextmanager
def aio_feature_server_process(demo_kind: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """The prototype as a child on a free loopback port, its ledger in a temporary directory."""
    with tempfile.TemporaryDirectory() as directory, server_child(
            [sys.executable, "-m", "benchmarks.aio_feature_server", "--demo-kind", demo_kind,
             "--ledger", str(Path(directory) / "usage.db")]) as child:
        yield child


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-kind", default="pca", help="shipped encoder to serve (as reaas-server --demo-kind)")
    parser.add_argument("--ledger", type=Path, required=True, help="SQLite file for the usage rows")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.demo_kind, args.ledger))


if __name__ == "__main__":
    main()
