"""Property: whatever a client sends, a real server answers it or refuses it with INVALID_ARGUMENT or
RESOURCE_EXHAUSTED — never INTERNAL or UNKNOWN — logs no traceback, and keeps serving.

Requests are generated with hypothesis (derandomized: the same examples on every run and in CI) from the
fields a client controls: dtype enum values (known and arbitrary int32), shapes of rank 0..100 with zero,
negative and int64-extreme dimensions, raw_data of the right and wrong lengths, pixels with NaN / ±Inf /
out-of-range values, feature radii over all doubles, bound names, and raw bytes that may not parse at all.
An oracle says which requests are valid: those must be answered, with one well-formed reply per image.
"""

from __future__ import annotations

import logging
import math

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from reaas.v1 import encoder_service_pb2 as pb
from reaas.v1 import encoder_service_pb2_grpc as pb_grpc

MAX_BATCH = 64  # the reaas_address fixture's max_batch_size
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
WIRE_DTYPES = {pb.FLOAT32: np.dtype("<f4"), pb.FLOAT16: np.dtype("<f2"), pb.UINT8: np.dtype("u1")}
INT64 = st.integers(-(2**63), 2**63 - 1)
SERVICE = "/reaas.v1.EncoderService/"

FUZZ = settings(
    derandomize=True,  # a fixed sequence of examples: reproducible in CI, no example database needed
    database=None,
    deadline=None,  # a busy 2-core runner must not turn a slow F2I search into a flaky failure
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def channel(reaas_address):
    with grpc.insecure_channel(reaas_address) as module_channel:
        yield module_channel


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.EncoderServiceStub(channel)


@pytest.fixture(scope="module")
def spec(stub):
    return stub.GetEncoderInfo(pb.EncoderInfoRequest(), timeout=30)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module", autouse=True)
def server_log():
    """Everything logged while this module runs: no tracebacks allowed, only one-line warnings."""
    handler = _Records()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(previous)


@pytest.fixture(autouse=True)
def _server_stays_healthy(channel, stub, spec, server_log):
    """After each fuzz test: the server still answers health and a valid request, and nothing was logged
    with a traceback or above WARNING."""
    server_log.records.clear()
    yield
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    images = np.full((1, *spec.input_shape), spec.value_min, dtype="<f4")
    request = pb.FeatureRequest(images=pb.Tensor(dtype=pb.FLOAT32, shape=images.shape, raw_data=images.tobytes()))
    assert stub.Feature(request, timeout=30).features.shape[0] == 1
    loud = [r for r in server_log.records if r.levelno > logging.WARNING or r.exc_info is not None]
    assert not loud, [r.getMessage() for r in loud]


# -- generating requests ---------------------------------------------------------------------------------------


FLAWS = ["none"] * 4 + ["dtype", "shape", "length", "pixel", "batch"]  # about half the examples are valid


@st.composite
def images_tensor(draw, spec: pb.EncoderInfo) -> tuple[pb.Tensor, bool]:
    """An images Tensor with at most one deliberate flaw, and whether the server must accept it (the oracle,
    computed from what was drawn, not from the flaw's name: a random shape may well be a valid one)."""
    input_shape = list(spec.input_shape)
    flaw = draw(st.sampled_from(FLAWS))
    known = st.sampled_from(sorted(WIRE_DTYPES))
    dtype = draw(st.integers(-(2**31), 2**31 - 1) if flaw == "dtype" else known)
    if flaw == "shape":  # any rank 0..100, dimensions anywhere in int64
        dimension = st.one_of(st.integers(-3, 40), INT64, st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1]))
        shape = draw(st.lists(dimension, max_size=100))
    else:  # [batch, C, H, W] as served; the batch empty or over the limit when that is the flaw
        batch = draw(st.sampled_from([0, MAX_BATCH + 1]) if flaw == "batch" else st.integers(1, 3))
        shape = [batch, *input_shape]
    valid = dtype in WIRE_DTYPES and len(shape) == 4 and shape[1:] == input_shape and 1 <= shape[0] <= MAX_BATCH
    if dtype not in WIRE_DTYPES or not all(0 <= d <= 10**6 for d in shape) or math.prod(shape) > 200_000:
        return pb.Tensor(dtype=dtype, shape=shape, raw_data=draw(st.binary(max_size=64))), False
    values = _pixels(draw, shape, WIRE_DTYPES[dtype], poke=flaw == "pixel")
    if dtype != pb.UINT8:  # uint8 pixels always lie in range: 0..255 is mapped onto it
        as_float = values.astype(np.float64)
        valid = valid and bool(np.all(np.isfinite(as_float)))
        valid = valid and bool(np.all((as_float >= spec.value_min) & (as_float <= spec.value_max)))
    raw_data = values.tobytes()
    if flaw == "length":
        cut = draw(st.sampled_from([-1, 1, len(raw_data) // 2 + 1, len(raw_data)]))
        raw_data = raw_data[:-cut] if cut > 0 else raw_data + b"\0"
        valid = valid and cut == 0
    return pb.Tensor(dtype=dtype, shape=shape, raw_data=raw_data), valid


def _pixels(draw, shape: list[int], dtype: np.dtype, *, poke: bool) -> np.ndarray:
    """In-range pixels; with ``poke``, one of them replaced by any value (NaN, ±Inf, negative, above range)."""
    if dtype == np.uint8:
        values = np.full(shape, draw(st.integers(0, 255)), dtype=dtype)
    else:
        values = np.full(shape, draw(st.floats(0.0, 1.0, width=32)), dtype=dtype)
    if values.size and poke:
        value = draw(st.integers(0, 255)) if dtype == np.uint8 else draw(st.floats(width=8 * dtype.itemsize))
        values.reshape(-1)[draw(st.integers(0, values.size - 1))] = value
    return values


RADII = st.lists(st.floats(), max_size=5)
BOUND_NAMES = st.text(st.characters(exclude_categories=["Cs"]), max_size=16)  # surrogates cannot be sent


def _answered_or_refused(call, request) -> object | None:
    """The reply, or None after checking the refusal's status code."""
    try:
        reply = call(request, timeout=60)
    except grpc.RpcError as error:
        event(f"refused {error.code().name}")  # --hypothesis-show-statistics shows the mix
        assert error.code() in REFUSALS, (error.code(), error.details())
        assert len(error.details()) < 2000, error.details()[:200]
        return None
    event("answered")
    return reply


# -- the properties ----------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=500)
@given(data=st.data())
def test_feature_requests_are_answered_or_refused(stub, spec, data):
    images, valid = data.draw(images_tensor(spec))
    reply = _answered_or_refused(stub.Feature, pb.FeatureRequest(images=images))
    assert (reply is not None) == valid, (list(images.shape)[:8], images.dtype, len(images.raw_data))
    if reply is not None:
        assert list(reply.features.shape) == [images.shape[0], spec.feature_dim]


@settings(FUZZ, max_examples=400)
@given(data=st.data())
def test_f2i_requests_are_answered_or_refused(stub, spec, data):
    images, valid = data.draw(images_tensor(spec))
    count = images.shape[0] if len(images.shape) and 0 <= images.shape[0] <= MAX_BATCH + 1 else 1
    if data.draw(st.sampled_from([True, True, True, False])):  # mostly well-formed, to reach the search
        radii = data.draw(st.lists(st.floats(0, 1e308) | st.floats(0, 2 * spec.max_feature_radius),
                                   min_size=count, max_size=count))
    else:
        radii = data.draw(RADII)
    offered = st.sampled_from([*spec.bounds_offered, ""])
    bound = data.draw(offered if data.draw(st.sampled_from([True, True, True, False])) else BOUND_NAMES)
    valid = (
        valid
        and len(radii) == images.shape[0]
        and all(math.isfinite(r) and 0 <= r <= spec.max_feature_radius for r in radii)
        and bound in (*spec.bounds_offered, "")
    )
    request = pb.F2IPerturbRequest(images=images, feature_radii=radii, bound=bound)
    reply = _answered_or_refused(stub.F2IPerturb, request)
    assert (reply is not None) == valid, (list(images.shape)[:8], radii, bound)
    if reply is not None:
        assert len(reply.radii) == len(radii)
        assert all(r.image_radius >= 0 and r.bound for r in reply.radii)  # NaN fails >= 0


@st.composite
def request_bytes(draw, valid_bytes: bytes) -> bytes:
    """Arbitrary bytes, or a valid serialized request truncated, spliced or with bytes flipped."""
    kind = draw(st.sampled_from(["arbitrary", "truncated", "flipped", "spliced"]))
    if kind == "arbitrary":
        return draw(st.binary(max_size=300))
    if kind == "truncated":
        return valid_bytes[: draw(st.integers(0, len(valid_bytes)))]
    if kind == "flipped":
        mutated = bytearray(valid_bytes)
        for _ in range(draw(st.integers(1, 4))):
            mutated[draw(st.integers(0, min(len(mutated), 64) - 1))] ^= draw(st.integers(1, 255))
        return bytes(mutated)
    return valid_bytes[: draw(st.integers(0, 40))] + draw(st.binary(min_size=1, max_size=40))


def _serialized_valid(spec, rpc: str) -> bytes:
    images = np.full((1, *spec.input_shape), 0.5, dtype="<f4")
    tensor = pb.Tensor(dtype=pb.FLOAT32, shape=images.shape, raw_data=images.tobytes())
    if rpc.endswith("F2IPerturb"):
        return pb.F2IPerturbRequest(images=tensor, feature_radii=[0.5], bound="lipschitz").SerializeToString()
    return pb.FeatureRequest(images=tensor).SerializeToString()


@settings(FUZZ, max_examples=600)
@given(data=st.data())
def test_raw_request_bytes_are_answered_or_refused(channel, spec, data):
    rpc = data.draw(st.sampled_from(["Feature", "F2IPerturb", "GetEncoderInfo", "GetUsage"]))
    payload = data.draw(request_bytes(_serialized_valid(spec, rpc)))
    call = channel.unary_unary(SERVICE + rpc)  # no serializers: the bytes go out as they are
    _answered_or_refused(call, payload)


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_raw_request_streams_are_answered_or_refused(channel, spec, data):
    rpc = data.draw(st.sampled_from(["StreamFeatures", "StreamF2IPerturb"]))
    valid_bytes = _serialized_valid(spec, rpc)
    payloads = data.draw(st.lists(st.one_of(st.just(valid_bytes), request_bytes(valid_bytes)), max_size=4))
    replies = channel.stream_stream(SERVICE + rpc)(iter(payloads), timeout=60)
    answered = 0
    try:
        for _ in replies:
            answered += 1
    except grpc.RpcError as error:
        assert error.code() in REFUSALS, (error.code(), error.details())
    finally:
        replies.cancel()  # a failing example must not leave a call open for the server's stop to wait on
    leading_valid = next((i for i, p in enumerate(payloads) if p != valid_bytes), len(payloads))
    assert leading_valid <= answered <= len(payloads)  # the good messages before a bad one are all answered
