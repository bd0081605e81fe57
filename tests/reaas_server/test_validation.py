"""Bad input gets a precise status and a message a person can act on; the server stays up."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from reaas.v1 import encoder_service_pb2 as pb
from reaas_client import encode_tensor

SHAPE = (1, 28, 28)


def good_images(count: int = 2) -> np.ndarray:
    return np.full((count, *SHAPE), 0.5, dtype=np.float32)


def feature_request(**tensor_fields) -> pb.FeatureRequest:
    return pb.FeatureRequest(images=pb.Tensor(**tensor_fields))


@pytest.fixture(autouse=True)
def _demo_shape(demo_encoder):
    global SHAPE
    SHAPE = tuple(demo_encoder.metadata.input_shape)


def rejected(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(request, timeout=30)
    return raised.value


def with_pixel(value: float) -> np.ndarray:
    images = good_images()
    images[1, 0, 3, 4] = value
    return images


BAD_FEATURE_REQUESTS = {
    "rank 3": (lambda: pb.FeatureRequest(images=encode_tensor(good_images()[0])), "rank 4"),
    "wrong image shape": (
        lambda: pb.FeatureRequest(images=encode_tensor(np.zeros((2, 3, 8, 8), np.float32))),
        "shape",
    ),
    "byte length": (
        lambda: feature_request(dtype=pb.FLOAT32, shape=[2, *SHAPE], raw_data=b"\0" * 17),
        "needs",
    ),
    "unspecified dtype": (
        lambda: feature_request(dtype=pb.DTYPE_UNSPECIFIED, shape=[1, *SHAPE], raw_data=b""),
        "not supported",
    ),
    "unknown dtype": (lambda: feature_request(dtype=42, shape=[1, *SHAPE], raw_data=b""), "not supported"),
    "negative dimension": (lambda: feature_request(dtype=pb.FLOAT32, shape=[-1, *SHAPE]), "negative"),
    # [2**62, 4] wrapped to 0 bytes in an int64 product and reached numpy's reshape: INTERNAL before issue 10
    "shape overflowing int64": (lambda: feature_request(dtype=pb.FLOAT32, shape=[2**62, 4]), "more bytes"),
    "rank 65": (lambda: feature_request(dtype=pb.FLOAT32, shape=[1] * 65, raw_data=b"\0" * 4), "rank 65"),
    "rank 100000": (lambda: feature_request(dtype=pb.UINT8, shape=[2] * 100_000), "at most"),
    "empty batch": (lambda: pb.FeatureRequest(images=encode_tensor(good_images(0))), "empty"),
    "NaN pixel": (lambda: pb.FeatureRequest(images=encode_tensor(with_pixel(np.nan))), "images[1]"),
    "Inf pixel": (lambda: pb.FeatureRequest(images=encode_tensor(with_pixel(np.inf))), "NaN or Inf"),
    "pixel above range": (lambda: pb.FeatureRequest(images=encode_tensor(with_pixel(1.5))), "[0.0, 1.0]"),
    "pixel below range": (lambda: pb.FeatureRequest(images=encode_tensor(with_pixel(-0.1))), "[0.0, 1.0]"),
}


@pytest.mark.parametrize("case", sorted(BAD_FEATURE_REQUESTS))
def test_bad_feature_request_is_invalid_argument(raw_stub, case):
    build, hint = BAD_FEATURE_REQUESTS[case]
    error = rejected(raw_stub.Feature, build())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert hint in error.details()
    # the server is still up and serving
    reply = raw_stub.Feature(pb.FeatureRequest(images=encode_tensor(good_images(1))), timeout=30)
    assert reply.features.shape[0] == 1


def f2i_request(radii, count: int = 2, bound: str = "") -> pb.F2IPerturbRequest:
    return pb.F2IPerturbRequest(images=encode_tensor(good_images(count)), feature_radii=radii, bound=bound)


@pytest.mark.parametrize(
    ("radii", "hint"),
    [
        ([0.5, -0.1], "feature_radii[1]"),
        ([float("nan"), 0.5], "finite"),
        ([float("inf"), 0.5], "finite"),
        ([0.5], "one R_F per image"),
        ([0.5, 0.5, 0.5], "one R_F per image"),
    ],
)
def test_bad_feature_radius_is_invalid_argument(raw_stub, radii, hint):
    error = rejected(raw_stub.F2IPerturb, f2i_request(radii))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert hint in error.details()


def test_unknown_bound_lists_the_offered_ones(raw_stub):
    error = rejected(raw_stub.F2IPerturb, f2i_request([0.5, 0.5], bound="magic"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lipschitz" in error.details()


def test_batch_over_the_limit_is_resource_exhausted(raw_stub):
    error = rejected(raw_stub.Feature, pb.FeatureRequest(images=encode_tensor(good_images(65))))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_batch_size 64" in error.details()


def test_message_over_the_size_limit_is_resource_exhausted(demo_encoder):
    from reaas.v1 import encoder_service_pb2_grpc as pb_grpc
    from reaas_server import ServerConfig, run_server

    config = ServerConfig(port=0, max_message_bytes=64 * 1024)
    with run_server(config, demo_encoder) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.EncoderServiceStub(channel)
        error = rejected(stub.Feature, pb.FeatureRequest(images=encode_tensor(good_images(64))))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Feature(pb.FeatureRequest(images=encode_tensor(good_images(1))), timeout=30).features


def test_bad_message_in_a_stream_ends_that_stream_only(raw_stub):
    requests = [
        pb.FeatureRequest(images=encode_tensor(good_images(1))),
        pb.FeatureRequest(images=encode_tensor(with_pixel(2.0))),
    ]
    replies = raw_stub.StreamFeatures(iter(requests), timeout=30)
    assert next(replies).features.shape[0] == 1
    with pytest.raises(grpc.RpcError) as raised:
        list(replies)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raw_stub.Feature(requests[0], timeout=30).features


def test_long_unknown_bound_name_is_invalid_argument(raw_stub):
    """The message quotes a long name only in part: a 100 000-character echo would exceed the client's 16 KiB
    metadata limit and reach it as RESOURCE_EXHAUSTED 'Stream removed' instead."""
    error = rejected(raw_stub.F2IPerturb, f2i_request([0.5, 0.5], bound="x" * 100_000))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown bound" in error.details() and len(error.details()) < 1000


@pytest.mark.parametrize("rpc", ["Feature", "F2IPerturb"])
def test_a_missing_images_field_is_named_as_missing(raw_stub, rpc):
    request = pb.FeatureRequest() if rpc == "Feature" else pb.F2IPerturbRequest(feature_radii=[0.5])
    error = rejected(getattr(raw_stub, rpc), request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has no `images`" in error.details() and "DTYPE_UNSPECIFIED" not in error.details()
