"""Client-side augmentation of training images: K shifted, elastically deformed copies of each input (issue 21).

A REaaS client sees its encoder only through Feature, so a copy of a training image is one more query: the client
buys training signal with queries (`fetch_features(augment=K)` sends 1 + K per training input, and the ledger
counts them against that input). The test side is untouched: a certificate still costs 2 queries.

One copy = one `grid_sample` of the image through (a) a translation uniform in [-max_shift, max_shift] pixels on
each axis and (b) Simard et al.'s (2003) elastic field: per-pixel displacements uniform in [-1, 1], smoothed by a
Gaussian of std `smoothness` pixels and scaled by `strength` (their digits setting: 34 and 4, about 1-2 pixels of
local displacement). Bilinear, zeros outside the frame (the digits' background), clamped to the value range. No
rotation or flip beyond what the field does: a mirrored 2 is no longer a 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ElasticShift:
    """Ranges of one augmented copy, in pixels: translation, elastic strength (alpha) and smoothness (sigma)."""

    max_shift: float = 1.5
    strength: float = 34.0
    smoothness: float = 4.0

    def __post_init__(self) -> None:
        if self.max_shift < 0 or self.strength < 0 or self.smoothness <= 0:
            raise ValueError(f"need max_shift >= 0, strength >= 0 and smoothness > 0, got {self}")


def _gaussian_blur(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of `field` [B, C, H, W] (zero padding), kernel truncated at 3 sigma."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=field.dtype, device=field.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = field.shape[1]
    across = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    down = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    field = F.conv2d(field, across, padding=(0, radius), groups=channels)
    return F.conv2d(field, down, padding=(radius, 0), groups=channels)


def augmented_copies(images: torch.Tensor, copies: int, generator: torch.Generator, *,
                     spec: ElasticShift = ElasticShift(), value_range: tuple[float, float] = (0.0, 1.0)
                     ) -> torch.Tensor:
    """`copies` random copies of each image [N, C, H, W] -> [N * copies, C, H, W], input-major (rows i * copies
    ... (i + 1) * copies - 1 are copies of image i), every value inside `value_range`. All randomness from
    `generator`, so a seeded generator gives the same copies."""
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"augmentation takes float images [N, C, H, W], got {tuple(images.shape)} {images.dtype}")
    batch = images.repeat_interleave(copies, dim=0)
    count, _, height, width = batch.shape
    draw = {"generator": generator, "dtype": batch.dtype}
    field = torch.rand(count, 2, height, width, **draw) * 2 - 1
    field = _gaussian_blur(field, spec.smoothness) * spec.strength  # pixels, [count, (dx, dy), H, W]
    field = field + (torch.rand(count, 2, 1, 1, **draw) * 2 - 1) * spec.max_shift
    # grid_sample reads the input at normalised coordinates in [-1, 1]: one pixel is 2 / size
    base_y, base_x = torch.meshgrid(torch.linspace(-1 + 1 / height, 1 - 1 / height, height, dtype=batch.dtype),
                                    torch.linspace(-1 + 1 / width, 1 - 1 / width, width, dtype=batch.dtype),
                                    indexing="ij")
    grid = torch.stack([base_x + field[:, 0] * 2 / width, base_y + field[:, 1] * 2 / height], dim=-1)
    moved = F.grid_sample(batch, grid.to(batch.device), mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved.clamp_(*value_range)
