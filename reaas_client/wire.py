"""The one tensor codec of REaaS: numpy / torch arrays ⇄ ``reaas.v1.Tensor`` (raw little-endian bytes).

Server and client both use this module, so the two sides cannot disagree about byte order, dtype names or
shapes. Decoding validates everything a remote peer could get wrong and raises :class:`TensorDecodeError`
with a message a person can act on; the server turns that into ``INVALID_ARGUMENT``. It needs numpy only: a
torch tensor is recognised when its caller has imported torch, so a light client (no torch) shares the codec.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Collection
from typing import TYPE_CHECKING

import numpy as np

from reaas.v1 import encoder_service_pb2 as pb

if TYPE_CHECKING:
    import torch

# Wire dtype -> numpy dtype, always little-endian on the wire whatever the host's byte order.
NUMPY_DTYPES: dict[int, np.dtype] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.UINT8: np.dtype("u1"),
    pb.INT32: np.dtype("<i4"),
}
_WIRE_DTYPES: dict[np.dtype, int] = {
    np.dtype(np.float32): pb.FLOAT32,
    np.dtype(np.float16): pb.FLOAT16,
    np.dtype(np.uint8): pb.UINT8,
    np.dtype(np.int32): pb.INT32,
}
#: the dtypes an image (or a text encoder's embedding matrix) may travel in (EncoderInfo.accepted_dtypes)
IMAGE_DTYPES: tuple[int, ...] = (pb.FLOAT32, pb.FLOAT16, pb.UINT8)
#: the one dtype token ids travel in
TOKEN_ID_DTYPES: tuple[int, ...] = (pb.INT32,)


# The most dimensions a decoded tensor may have: numpy 1.x's own limit (numpy 2 allows 64), far above any rank
# REaaS serves; callers check the rank they expect. Checked before the shape is printed or multiplied.
MAX_RANK = 32
# Largest byte extent numpy can address; numpy refuses a shape beyond it even when another dimension is 0.
_MAX_EXTENT_BYTES = int(np.iinfo(np.intp).max)


class TensorDecodeError(ValueError):
    """A ``reaas.v1.Tensor`` whose bytes, shape or dtype do not describe a valid array."""


def dtype_name(wire_dtype: int) -> str:
    return pb.DType.Name(wire_dtype) if wire_dtype in pb.DType.values() else f"<unknown dtype {wire_dtype}>"


def is_torch_tensor(value: object) -> bool:
    """Whether ``value`` is a torch tensor, without importing torch: a process that has not imported torch holds
    none."""
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(value, torch_module.Tensor)


def as_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """A C-ordered numpy view of a numpy array or a (CPU or CUDA) torch tensor."""
    if is_torch_tensor(array):
        array = array.detach().cpu().numpy()
    return np.ascontiguousarray(array)


def encode_tensor(array: np.ndarray | torch.Tensor) -> pb.Tensor:
    """Encode a float32 / float16 / uint8 / int32 array as raw little-endian bytes; float64 is sent as float32.

    int64 is refused rather than narrowed: token ids are cast to int32 by the caller, who knows they fit."""
    values = as_numpy(array)
    if values.dtype == np.float64:
        values = values.astype(np.float32)
    native = values.dtype.newbyteorder("=")
    if native not in _WIRE_DTYPES:
        raise TypeError(f"cannot send dtype {values.dtype}; use float32, float16 or uint8 (images), int32 (token ids)")
    wire_dtype = _WIRE_DTYPES[native]
    little_endian = values.astype(NUMPY_DTYPES[wire_dtype], copy=False)
    return pb.Tensor(dtype=wire_dtype, shape=list(values.shape), raw_data=little_endian.tobytes())


def decode_tensor(tensor: pb.Tensor, *, name: str = "tensor", dtypes: Collection[int] | None = None,
                  writable: bool = True) -> np.ndarray:
    """Decode a ``reaas.v1.Tensor`` into a numpy array of its own dtype (native byte order).

    ``writable=False`` returns a read-only view of the bytes read out of the message where no byte swap is needed
    (every little-endian host): one copy of the payload fewer, for a caller that only reads it (the server's
    decode of a 4 096-image request holds 12.8 MB less while it is computed).

    Raises TensorDecodeError, and nothing else, whatever the peer sent: the dtype is unknown or not one of
    ``dtypes`` (default: every dtype of the codec), the rank exceeds MAX_RANK, a dimension is negative, the shape's
    extent overflows what numpy can address, or the byte length is not ``prod(shape) * itemsize``. The element
    count is an exact Python integer compared with ``len(raw_data)`` before numpy sees the shape, so no shape can
    overflow into a match.
    """
    allowed = NUMPY_DTYPES if dtypes is None else [d for d in NUMPY_DTYPES if d in dtypes]
    if tensor.dtype not in allowed:
        accepted = ", ".join(pb.DType.Name(d) for d in allowed)
        raise TensorDecodeError(
            f"{name}: dtype {dtype_name(tensor.dtype)} is not supported; send one of {accepted}"
        )
    if len(tensor.shape) > MAX_RANK:
        raise TensorDecodeError(f"{name}: shape has rank {len(tensor.shape)}; at most {MAX_RANK} dimensions")
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorDecodeError(f"{name}: shape {list(shape)} has a negative dimension")
    dtype = NUMPY_DTYPES[tensor.dtype]
    if math.prod(d for d in shape if d) * dtype.itemsize > _MAX_EXTENT_BYTES:
        raise TensorDecodeError(f"{name}: shape {list(shape)} describes more bytes than any array can hold")
    expected = math.prod(shape) * dtype.itemsize
    raw = tensor.raw_data  # each read of a bytes field copies it out of the message: read it once
    if len(raw) != expected:
        raise TensorDecodeError(
            f"{name}: raw_data has {len(raw)} bytes but shape {list(shape)} of {dtype_name(tensor.dtype)} needs "
            f"{expected}"
        )
    view = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if not writable and view.dtype.isnative:
        return view
    # astype copies: the array owns writable memory in native byte order (frombuffer's view is read-only)
    return view.astype(dtype.newbyteorder("="))
