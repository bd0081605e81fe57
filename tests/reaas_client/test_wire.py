"""The one tensor codec: lossless round trips, little-endian on the wire, precise errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reaas.v1 import encoder_service_pb2 as pb
from reaas_client.wire import MAX_RANK, TensorDecodeError, decode_tensor, encode_tensor


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8])
def test_round_trip_is_exact(dtype):
    values = (np.random.default_rng(0).random((2, 3, 4, 5)) * 200).astype(dtype)
    decoded = decode_tensor(encode_tensor(values))
    assert decoded.dtype == dtype and decoded.shape == values.shape
    np.testing.assert_array_equal(decoded, values)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8])
def test_a_read_only_decode_is_the_same_array_and_the_default_stays_writable(dtype):
    values = (np.random.default_rng(0).random((2, 3, 4)) * 200).astype(dtype)
    tensor = encode_tensor(values)
    view, copy = decode_tensor(tensor, writable=False), decode_tensor(tensor)
    np.testing.assert_array_equal(view, values)
    assert view.dtype.isnative and copy.flags.writeable
    # a little-endian host needs no byte swap: the view is the bytes read out of the message, not a copy of them
    assert view.flags.writeable is (np.dtype(dtype).byteorder == ">")


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


@pytest.mark.parametrize(
    ("shape", "raw_data", "message"),
    [
        ([2**62, 4], b"", "more bytes than any array can hold"),  # int64 product wraps to 0 bytes
        ([2**61, 2**61, 0], b"", "more bytes than any array can hold"),  # empty, but numpy refuses it
        ([2**63 - 1, 2**63 - 1], b"\0" * 4, "more bytes than any array can hold"),
        ([1] * (MAX_RANK + 1), b"\0" * 4, f"rank {MAX_RANK + 1}"),
        ([1] * 65, b"\0" * 4, "rank 65"),
        ([1] * 100_000, b"\0" * 4, "rank 100000"),
    ],
)
def test_overflowing_shapes_and_absurd_ranks_raise_decode_errors(shape, raw_data, message):
    with pytest.raises(TensorDecodeError, match=message) as raised:
        decode_tensor(pb.Tensor(dtype=pb.FLOAT32, shape=shape, raw_data=raw_data))
    assert len(str(raised.value)) < 200  # never echoes an absurd shape back at full length


def test_extreme_but_valid_shapes_decode():
    assert decode_tensor(pb.Tensor(dtype=pb.UINT8, shape=[0, 2**63 - 1])).shape == (0, 2**63 - 1)
    assert decode_tensor(pb.Tensor(dtype=pb.FLOAT32, shape=[], raw_data=b"\0" * 4)).shape == ()
    assert decode_tensor(pb.Tensor(dtype=pb.FLOAT16, shape=[1] * MAX_RANK, raw_data=b"\0" * 2)).ndim == MAX_RANK
