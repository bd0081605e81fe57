"""Request validation: everything a client can get wrong is rejected before any compute, with a message a
person can act on. Raises RequestError; the servicer turns it into the gRPC status it carries."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from reaas.v1 import encoder_service_pb2 as pb
from reaas_client.wire import IMAGE_DTYPES, TOKEN_ID_DTYPES, TensorDecodeError, decode_tensor, dtype_name

# decode_images hands torch a read-only view of the request's pixels (the bytes it read out of the message, which
# nothing else holds); torch's warning that its tensors cannot be read-only is about exactly that, from here only
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning,
                        module=__name__)


class RequestError(Exception):
    """A request the server refuses; ``code`` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ImageSpec:
    """What the served encoder accepts: [channels, height, width] and the declared pixel range."""

    input_shape: tuple[int, int, int]
    value_min: float
    value_max: float
    max_batch_size: int


def require_field(request, name: str, what: str) -> None:
    """INVALID_ARGUMENT naming a missing message field (proto3 would otherwise read it as an empty default, and
    the error would be about its parts, e.g. "dtype DTYPE_UNSPECIFIED")."""
    if not request.HasField(name):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{type(request).DESCRIPTOR.full_name} has no `{name}`: send {what}")


@dataclass(frozen=True)
class TokenSpec:
    """What a text encoder accepts as token ids: ids in [0, vocab_size), at most max_length per sequence."""

    vocab_size: int
    max_length: int
    pad_id: int
    max_batch_size: int


IMAGES_FIELD = "a reaas.v1.Tensor with dtype, shape [batch, C, H, W] and raw_data"
TOKEN_IDS_FIELD = "a reaas.v1.Tensor of INT32 token ids, shape [batch, length], and raw_data"


def _check_batch_size(batch: int, max_batch_size: int, *, field: str, unit: str) -> None:
    """An empty batch is INVALID_ARGUMENT; one over max_batch_size RESOURCE_EXHAUSTED (too large: no retry hint)."""
    if batch == 0:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{field} is an empty batch; send at least one {unit}"
        )
    if batch > max_batch_size:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"batch of {batch} {unit}s exceeds this server's max_batch_size {max_batch_size}; "
            "split it into smaller requests (EncoderInfo.max_batch_size)",
        )


def input_field(request, *, text: bool) -> str:
    """Which field carries a FeatureRequest's / F2IPerturbRequest's inputs: "images" or "token_ids".

    Exactly one may be set; token ids only for a text encoder (``text``). An image encoder's request without
    images gets the same message as before token ids existed."""
    has_images, has_tokens = request.HasField("images"), request.HasField("token_ids")
    if has_tokens and not text:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "this encoder reads images (EncoderInfo.modality \"image\"), not token ids: send `images` "
            "[batch, C, H, W] and leave `token_ids` unset",
        )
    if has_images and has_tokens:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{type(request).DESCRIPTOR.full_name} has both `images` and `token_ids`: send exactly one (token ids, "
            "or embedding matrices [batch, embed_dim, 1, max_length] in images)",
        )
    if text and not has_images and not has_tokens:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{type(request).DESCRIPTOR.full_name} has neither `token_ids` nor `images`: send {TOKEN_IDS_FIELD} "
            "(or embedding matrices [batch, embed_dim, 1, max_length] in images)",
        )
    if not has_tokens:
        require_field(request, "images", IMAGES_FIELD)
        return "images"
    return "token_ids"


def decode_token_ids(tensor: pb.Tensor, spec: TokenSpec) -> torch.Tensor:
    """Validated token ids as int64 [batch, max_length] on the CPU: each sequence of ``length`` <= max_length ids
    padded with pad_id at the end, exactly as ``Vocabulary.encode`` pads a text of ``length`` tokens."""
    if tensor.dtype not in TOKEN_ID_DTYPES:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"token_ids: dtype {dtype_name(tensor.dtype)} is not supported; token ids travel as INT32 "
            "(little-endian int32) [batch, length]",
        )
    try:
        array = decode_tensor(tensor, name="token_ids", dtypes=TOKEN_ID_DTYPES)
    except TensorDecodeError as error:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
    if array.ndim != 2:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"token_ids must have shape [batch, length] (rank 2), got {list(array.shape)}",
        )
    batch, length = array.shape
    _check_batch_size(batch, spec.max_batch_size, field="token_ids", unit="sequence")
    if not 1 <= length <= spec.max_length:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"token_ids has sequences of length {length}; send 1 to {spec.max_length} ids per sequence "
            "(TextInputInfo.max_length; the server pads shorter ones with pad_id)",
        )
    ids = torch.from_numpy(array).to(torch.int64)
    outside = (ids < 0) | (ids >= spec.vocab_size)
    if bool(outside.any()):
        row, column = (int(i) for i in outside.nonzero()[0])
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"token_ids[{row}, {column}] = {int(ids[row, column])} is not a token id: ids lie in "
            f"[0, {spec.vocab_size}) (TextInputInfo.vocab_size; unknown words are unk_id)",
        )
    if length == spec.max_length:
        return ids
    padded = torch.full((batch, spec.max_length), spec.pad_id, dtype=torch.int64)
    padded[:, :length] = ids
    return padded


def decode_images(tensor: pb.Tensor, spec: ImageSpec) -> torch.Tensor:
    """A validated float32 batch [batch, channels, height, width] on the CPU (float32 pixels: a view of the bytes
    read out of the request, no copy; the caller's forward pass reads them, nothing writes them).

    UINT8 pixels v are mapped to value_min + v / 255 * (value_max - value_min); float pixels must already lie
    in [value_min, value_max] and be finite.
    """
    if tensor.dtype == pb.INT32:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "images: dtype INT32 is for token ids, which travel in `token_ids` (text encoders); send images as "
            "FLOAT32, FLOAT16 or UINT8",
        )
    try:
        array = decode_tensor(tensor, name="images", dtypes=IMAGE_DTYPES, writable=False)
    except TensorDecodeError as error:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
    expected = list(spec.input_shape)
    if array.ndim != 4 or list(array.shape[1:]) != expected:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"images must have shape [batch, {', '.join(map(str, expected))}] (rank 4), got {list(array.shape)}",
        )
    _check_batch_size(array.shape[0], spec.max_batch_size, field="images", unit="image")
    if array.dtype == np.uint8:
        scale = (spec.value_max - spec.value_min) / 255.0
        return torch.from_numpy(array.astype(np.float32)).mul_(scale).add_(spec.value_min)
    # numpy, not torch, on the hot path: a 256-image request decoded in 76 µs against 112 (the batcher's one worker
    # decodes every waiting request in turn). min/max propagate NaN and expose ±Inf; the culprit is located only on
    # error.
    array = array.astype(np.float32, copy=False)
    low, high = float(array.min(initial=math.inf)), float(array.max(initial=-math.inf))
    if array.size and not (math.isfinite(low) and math.isfinite(high)):
        first = int(np.flatnonzero(~np.isfinite(array).reshape(array.shape[0], -1).all(axis=1))[0])
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"images[{first}] contains NaN or Inf")
    # float32 pixels against the bounds as float32 represents them (EncoderInfo.value_min/max are float32 on the
    # wire too): a client that clips to the declared bound in float32 lands exactly on it, never outside
    if low < float(np.float32(spec.value_min)) or high > float(np.float32(spec.value_max)):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"pixel values must lie in [{spec.value_min}, {spec.value_max}] (EncoderInfo.value_min/max); "
            f"got values in [{low:.6g}, {high:.6g}]",
        )
    # float32 pixels stay a read-only view of the request's bytes (no copy, see decode_tensor); torch warns that it
    # cannot mark a tensor read-only, which is harmless here: nothing else holds those bytes (filter at the top)
    return torch.from_numpy(array)


def feature_dtype(requested: int) -> np.dtype:
    """The numpy dtype of the features a FeatureRequest asked for (FLOAT32 when unset)."""
    if requested in (pb.DTYPE_UNSPECIFIED, pb.FLOAT32):
        return np.dtype(np.float32)
    if requested == pb.FLOAT16:
        return np.dtype(np.float16)
    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"feature_dtype {dtype_name(requested)} is not offered; ask for FLOAT32 (default) or FLOAT16")


def decode_feature_radii(values: Sequence[float], batch: int, max_radius: float) -> torch.Tensor:
    """Feature-space radii R_F, one per image, finite and in [0, max_radius], as float64 [batch]."""
    if len(values) != batch:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"feature_radii has {len(values)} values for {batch} images; send exactly one R_F per image",
        )
    for index, value in enumerate(values):
        if not (math.isfinite(value) and 0 <= value <= max_radius):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"feature_radii[{index}] = {value} is outside [0, {max_radius:.6g}]: R_F must be finite, >= 0 and at "
                f"most EncoderInfo.max_feature_radius = {max_radius:.6g} (lipschitz_upper x the diameter of the "
                "input box: a larger R_F certifies nothing more); send min(R_F, max_feature_radius)",
            )
    return torch.tensor(list(values), dtype=torch.float64)
