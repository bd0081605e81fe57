"""Contrastive augmentations as batched torch ops (run on whatever device the images are on).

Each image gets its own random resized crop + rotation (one ``affine_grid``/``grid_sample`` call for the
whole batch), brightness/contrast jitter and Gaussian pixel noise; the result stays in [0, 1]. No flips:
the defaults suit 28x28 digits, where a mirrored 2 is no longer a 2. All randomness comes from the
``torch.Generator`` passed in, so a seeded generator reproduces the views exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random view transform (uniform draws unless said otherwise)."""

    crop_scale: tuple[float, float] = (0.5, 1.0)  # area of the crop, as a fraction of the image
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio of the crop (log-uniform)
    max_rotation_deg: float = 15.0
    brightness: float = 0.2  # add b ~ U[-brightness, brightness]
    contrast: float = 0.3  # multiply by c ~ U[1 - contrast, 1 + contrast] around the image mean
    noise_std: float = 0.05  # Gaussian pixel noise; the encoder should not care about it


def random_view(images: torch.Tensor, generator: torch.Generator, config: AugmentConfig) -> torch.Tensor:
    """One random view of each image. images [batch, C, H, W] in [0, 1] -> same shape, in [0, 1]."""
    batch = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        draw = torch.rand(batch, generator=generator, device=images.device, dtype=images.dtype)
        return low + (high - low) * draw

    area = uniform(*config.crop_scale)
    ratio = torch.exp(uniform(math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])))
    # Half-sizes of the crop in normalised coordinates ([-1, 1] spans the image).
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    centre_x = uniform(-1.0, 1.0) * (1.0 - width)
    centre_y = uniform(-1.0, 1.0) * (1.0 - height)
    angle = uniform(-1.0, 1.0) * math.radians(config.max_rotation_deg)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta maps output coordinates to input coordinates: rotate, scale to the crop, move to its centre.
    theta = torch.stack(
        [
            torch.stack([width * cos, -height * sin, centre_x], dim=1),
            torch.stack([width * sin, height * cos, centre_y], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    shape = (batch, 1, 1, 1)
    contrast = uniform(1.0 - config.contrast, 1.0 + config.contrast).view(shape)
    brightness = uniform(-config.brightness, config.brightness).view(shape)
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    views = (views - mean) * contrast + mean + brightness
    noise = torch.randn(views.shape, generator=generator, device=images.device, dtype=images.dtype)
    return (views + config.noise_std * noise).clamp_(0.0, 1.0)
