"""Message sizes counted once and for free where the bytes were parsed (reaas_server.interceptors)."""

from __future__ import annotations

import contextvars
import threading

import numpy as np

from reaas.v1 import encoder_service_pb2 as pb
from reaas_server.interceptors import _ParsedSizes, message_size, remember_size


def _request(images: int) -> pb.FeatureRequest:
    pixels = np.zeros((images, 1, 28, 28), np.float32)
    return pb.FeatureRequest(images=pb.Tensor(dtype=pb.FLOAT32, shape=list(pixels.shape), raw_data=pixels.tobytes()))


def test_a_size_remembered_on_another_thread_is_found_without_serialising():
    """StreamFeatures reads its stream in a task of its own (grpc.aio parses there); the ledger counts the bytes in
    the call's task, and must still find the size."""
    request = _request(4)
    wire = request.SerializeToString()
    parsed = pb.FeatureRequest.FromString(wire)
    # a size no serialisation could give: proves the remembered one is used, not ByteSize()
    parser = threading.Thread(target=remember_size, args=(parsed, len(wire) + 1000))
    parser.start()
    parser.join()

    def counted_twice() -> tuple[int, int]:  # in a fresh context, as a call's task has
        return message_size(parsed), message_size(parsed)  # asked again in the call: its recent sizes

    assert contextvars.Context().run(counted_twice) == (len(wire) + 1000, len(wire) + 1000)


def test_an_unremembered_message_is_measured():
    request = _request(3)
    assert contextvars.Context().run(message_size, request) == len(request.SerializeToString())


def test_parsed_sizes_pin_their_message_and_stay_within_budget():
    sizes = _ParsedSizes(budget_bytes=2 * (400 + _ParsedSizes.ENTRY_BYTES))
    messages = [_request(1) for _ in range(4)]
    for message in messages:
        sizes.put(message, 400)
    assert len(sizes) == 2  # the two oldest went: 4 entries of 400 bytes exceed the budget
    assert sizes.take(messages[0]) is None
    assert sizes.take(messages[3]) == 400
    assert sizes.take(messages[3]) is None  # taken once
    sizes.put(messages[0], 5000)  # larger than the whole budget: not kept
    assert sizes.take(messages[0]) is None


def test_a_message_never_remembered_is_not_found_and_disturbs_nothing():
    sizes = _ParsedSizes(budget_bytes=1 << 20)
    kept = _request(1)
    sizes.put(kept, 123)
    stranger = _request(1)
    assert sizes.take(stranger) is None
    assert sizes.take(kept) == 123


def test_messages_never_asked_for_cannot_pile_up_even_when_empty():
    """Where no interceptor counts bytes (a service outside EncoderService, a stream cancelled after a parse), the
    entries are never taken: empty messages must still be bounded by the budget."""
    sizes = _ParsedSizes(budget_bytes=64 * _ParsedSizes.ENTRY_BYTES)
    kept = [pb.FeatureRequest() for _ in range(1000)]
    for message in kept:
        sizes.put(message, 0)
    assert len(sizes) == 64
