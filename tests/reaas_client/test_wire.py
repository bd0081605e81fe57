"""The one tensor codec: lossless round trips, little-endian on the wire, precise errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reaas.v1 import encoder_service_pb2 as pb
from reaas_client.wire import TensorDecodeError, decode_tensor, encode_tensor


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8])
def test_round_trip_is_exact(dtype):
    values = (np.random.default_rng(0).random((2, 3, 4, 5)) * 200).astype(dtype)
    decoded = decode_tensor(encode_tensor(values))
    assert decoded.dtype == dtype and decoded.shape == values.shape
    np.testing.assert_array_equal(decoded, values)


def test_torch_tensors_and_float64_are_accepted():
    values = torch.rand(2, 3, dtype=torch.float64)
    decoded = decode_tensor(encode_tensor(values))
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, values.numpy(), rtol=1e-7)


def test_bytes_are_little_endian_whatever_the_input_order():
    big_endian = np.array([1.0, 2.0], dtype=">f4")
    tensor = encode_tensor(big_endian)
    assert tensor.raw_data == np.array([1.0, 2.0], dtype="<f4").tobytes()


def test_unsupported_dtype_is_refused_when_encoding():
    with pytest.raises(TypeError, match="float32, float16 or uint8"):
        encode_tensor(np.zeros(3, dtype=np.int64))


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (pb.Tensor(dtype=pb.FLOAT32, shape=[2, 2], raw_data=b"\0" * 15), "needs 16"),
        (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], raw_data=b"\0"), "not supported"),
        (pb.Tensor(dtype=pb.UINT8, shape=[-1, 2], raw_data=b""), "negative"),
    ],
)
def test_malformed_tensors_raise_decode_errors(tensor, message):
    with pytest.raises(TensorDecodeError, match=message):
        decode_tensor(tensor)
