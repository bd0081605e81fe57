"""The SEaaS baseline's noise in image space: noisy copies sent through a standard encoder service.

A standard encoder service (SEaaS) only returns f(x); without F2IPerturb the client must smooth h(f(.)) in
*image* space, paying one query per noisy image: 25 per training input (Gaussian data augmentation through
the API) and N0 + N per test input, streamed through StreamFeatures in batches.

The base classifier the client smooths is b(z) = h(f(q(clip(z)))):

* clip: the service rejects pixels outside [value_min, value_max], so noisy images are clipped to that range;
* q: the wire rounding (`WireRounding`) of the sample stream: identity for FLOAT32 (the default), round to
  nearest FLOAT16, or UINT8 v = round((z - lo) / (hi - lo) * 255), which the server maps back to
  lo + v / 255 * (hi - lo). FLOAT16 halves the bytes sent per noisy image, UINT8 quarters them.

Both run on the client, after the noise, and are deterministic functions of z. Cohen et al.'s guarantee holds
for any deterministic base classifier, so the certified radius stays sound: the noise is still added to the
unrounded image x, and the rounding is only a part of b, like the clipping or h itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from reaas_client import EncoderClient

WIRE_DTYPES: tuple[str, ...] = ("float32", "float16", "uint8")
"""How SEaaS-SC's noisy images may travel (reaas.v1 FLOAT32, FLOAT16, UINT8); bytes per pixel 4, 2, 1."""


def noisy_copies(images: torch.Tensor, sigma: float, generator: torch.Generator,
                 value_range: tuple[float, float]) -> torch.Tensor:
    """clip(x + e), e ~ N(0, sigma^2 I): images [B, C, H, W] -> [B, C, H, W] float32 in `value_range`.

    One draw of torch.randn for the whole batch: no Python loop over images.
    """
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float32)
    return (images.to(torch.float32) + sigma * noise).clamp_(*value_range)


@dataclass(frozen=True)
class WireRounding:
    """q, the rounding of clipped images [B, C, H, W] to the wire dtype `dtype` (one of WIRE_DTYPES).

    `encode` gives the tensor that is sent, `decode` what the server decodes from it (the reaas.v1 mapping:
    floats as they are, UINT8 v -> value_min + v / 255 * (value_max - value_min) in float32, computed with the
    same float32 operations as the server), and `q = decode(encode(.))`. Every step is a deterministic
    elementwise tensor op (IEEE round-to-nearest-even for FLOAT16, torch.round for UINT8), so q is a fixed
    function of its input, whatever the batch. FLOAT16 values are kept inside the declared range: a bound that
    float16 cannot represent is replaced by the nearest float16 inside the range, so the server never
    rejects a rounded pixel.
    """

    dtype: str = "float32"
    value_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.dtype not in WIRE_DTYPES:
            raise ValueError(f"unknown wire dtype {self.dtype!r}; choose one of {', '.join(WIRE_DTYPES)}")
        low, high = self.value_range
        if not low < high:
            raise ValueError(f"value range must have value_min < value_max, got {self.value_range}")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The tensor sent for images [B, C, H, W] already clipped to `value_range`, in the wire dtype."""
        low, high = self.value_range
        if self.dtype == "float32":
            return images.to(torch.float32)
        if self.dtype == "float16":
            inside_low, inside_high = _float16_inside(low, high)
            return images.to(torch.float16).clamp_(inside_low, inside_high)
        levels = (images.to(torch.float32) - low).div_(high - low).mul_(255.0)
        return levels.round_().clamp_(0.0, 255.0).to(torch.uint8)

    def decode(self, sent: torch.Tensor) -> torch.Tensor:
        """What the server decodes from `sent` [B, C, H, W]: float32 images."""
        if sent.dtype == torch.uint8:
            low, high = self.value_range
            return sent.to(torch.float32).mul_((high - low) / 255.0).add_(low)
        return sent.to(torch.float32)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """q(images): the float32 images the encoder sees for clipped images [B, C, H, W]."""
        return self.decode(self.encode(images))

    @property
    def bytes_per_pixel(self) -> int:
        return int(np.dtype(self.dtype).itemsize)


def _float16_inside(low: float, high: float) -> tuple[float, float]:
    """The smallest float16 >= low and the largest float16 <= high (both exact in float32 and float64)."""
    inside_low, inside_high = np.float16(low), np.float16(high)
    # Compared as Python floats: numpy would compare a float16 with a Python float in float16 (NEP 50).
    if float(inside_low) < low:
        inside_low = np.nextafter(inside_low, np.float16(np.inf))
    if float(inside_high) > high:
        inside_high = np.nextafter(inside_high, np.float16(-np.inf))
    return float(inside_low), float(inside_high)


@dataclass(frozen=True)
class StreamedImageSamples:
    """SEaaS-SC sample source: features of q(clip(x + e)) for one test image, via StreamFeatures.

    `image` [C, H, W]; every noisy copy is recorded in the client's ledger under `input_id`, so the ledger
    shows exactly n0 + n queries per certified input, and the bytes they took. Each request's noise is one
    [batch, C, H, W] draw; the clipped copies travel as `wire_dtype` (WireRounding, applied here on the
    client after the noise). A lean stream (`wire_dtype` other than float32) also asks for float16 features,
    halving the replies too; that rounding, done by the server, is a deterministic function of the image and so
    part of the base classifier as well. Yields features [batch, feature_dim] float32.
    """

    client: EncoderClient
    image: torch.Tensor
    input_id: str
    sigma: float
    batch_size: int
    value_range: tuple[float, float] = (0.0, 1.0)
    wire_dtype: str = "float32"

    def __call__(self, num: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        rounding = WireRounding(self.wire_dtype, self.value_range)

        def batches() -> Iterator[tuple[torch.Tensor, list[str]]]:
            center = self.image.detach().cpu().unsqueeze(0)
            for start in range(0, num, self.batch_size):
                size = min(self.batch_size, num - start)
                noisy = noisy_copies(center.expand(size, *center.shape[1:]), self.sigma, generator,
                                     self.value_range)
                yield rounding.encode(noisy), [self.input_id] * size

        features_as = "float32" if self.wire_dtype == "float32" else "float16"
        for features in self.client.stream_features(batches(), feature_dtype=features_as):
            yield torch.from_numpy(features)
