"""A finished call leaves no reference cycle holding its messages.

On the event loop a call's messages die by reference counting as soon as the call ends, unless something puts them in
a cycle: an exception kept by a task holds the frames it passed through, and a frame holds its messages. Such a cycle
waits for the cyclic collector, and 4 096-image streams (12.8 MB a message) then drove the server's peak RSS to 4x
idle in bench-load. So every call shape is run and the collector is asked what it found.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import types
from pathlib import Path

import grpc
import pytest

import reaas_server
from reaas.v1 import encoder_service_pb2 as pb
from reaas.v1 import encoder_service_pb2_grpc as pb_grpc
from reaas_client import encode_tensor
from reaas_server import ServerConfig, start_server
from reaas_server.serving_loop import run_on_loop

SERVER_CODE = str(Path(reaas_server.__file__).parent) + os.sep


@pytest.fixture(scope="module")
def running(demo_encoder):
    """A server that takes a message of more than one pass (256 images: it runs on a compute thread, not the
    batcher)."""
    running = start_server(ServerConfig(port=0, bound_cost_budget_s=0.0), demo_encoder)
    yield running
    running.stop(grace_s=0)


@pytest.fixture()
def stub(running):
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield pb_grpc.EncoderServiceStub(channel)


def _settled(running) -> None:
    """Wait until the server has finished with every call: the client has its answer a moment before the server's
    coroutines end."""
    deadline = time.monotonic() + 30
    while running.admission.in_flight and time.monotonic() < deadline:
        run_on_loop(asyncio.sleep(0.01))
    for _ in range(3):  # and let the loop run what the calls' ends scheduled
        run_on_loop(asyncio.sleep(0))


def _garbage_messages(running, run) -> list[str]:
    """What only the cyclic collector would free after `run()` and could hold a call's messages: protobuf messages
    (by type) and the server's frames (by function)."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        run()
        _settled(running)
        gc.collect()
        messages = {type(o).__name__ for o in gc.garbage if type(o).__name__.endswith(("Request", "Response"))}
        frames = {o.f_code.co_name for o in gc.garbage
                  if isinstance(o, types.FrameType) and o.f_code.co_filename.startswith(SERVER_CODE)}
        return sorted(messages | frames)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def _request(make_images, count: int) -> pb.FeatureRequest:
    return pb.FeatureRequest(images=encode_tensor(make_images(count).numpy()))


def test_unary_and_stream_calls_leave_no_message_in_a_cycle(running, stub, make_images):
    def calls() -> None:
        stub.Feature(_request(make_images, 4), timeout=30)
        list(stub.StreamFeatures(iter([_request(make_images, n) for n in (3, 300, 2)]), timeout=30))

    assert _garbage_messages(running, calls) == []


def test_a_stream_ended_by_an_error_leaves_no_message_in_a_cycle(running, stub, make_images):
    bad = pb.FeatureRequest(images=pb.Tensor(dtype=pb.FLOAT32, shape=[1, 1, 28, 28], raw_data=b"\0" * 3))

    def calls() -> None:
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.StreamFeatures(iter([_request(make_images, 2), bad]), timeout=30))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    assert _garbage_messages(running, calls) == []
