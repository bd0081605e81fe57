"""The SEaaS baseline's noise in image space: noisy copies sent through a standard encoder service.

A standard encoder service (SEaaS) only returns f(x); without F2IPerturb the client must smooth h(f(.)) in
*image* space, paying one query per noisy image: 25 per training input (Gaussian data augmentation through
the API) and N0 + N per test input, streamed through StreamFeatures in batches.

Clipping: the service rejects pixels outside [value_min, value_max], so noisy images are clipped to that
range before they are sent. Clipping is part of the base classifier b(z) = h(f(clip(z))), and Cohen et
al.'s guarantee holds for any base classifier, so the certified radius stays sound.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from reaas_client import EncoderClient


def noisy_copies(images: torch.Tensor, sigma: float, generator: torch.Generator,
                 value_range: tuple[float, float]) -> torch.Tensor:
    """clip(x + e), e ~ N(0, sigma^2 I): images [B, C, H, W] -> [B, C, H, W] float32 in `value_range`."""
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float32)
    return (images.to(torch.float32) + sigma * noise).clamp_(*value_range)


@dataclass(frozen=True)
class StreamedImageSamples:
    """SEaaS-SC sample source: features of clip(x + e) for one test image, via StreamFeatures.

    `image` [C, H, W]; every noisy copy is recorded in the client's ledger under `input_id`, so the ledger
    shows exactly n0 + n queries per certified input. Yields features [batch, feature_dim] float32.
    """

    client: EncoderClient
    image: torch.Tensor
    input_id: str
    sigma: float
    batch_size: int
    value_range: tuple[float, float] = (0.0, 1.0)

    def __call__(self, num: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        def batches() -> Iterator[tuple[torch.Tensor, list[str]]]:
            center = self.image.detach().cpu().unsqueeze(0)
            for start in range(0, num, self.batch_size):
                size = min(self.batch_size, num - start)
                noisy = noisy_copies(center.expand(size, *center.shape[1:]), self.sigma, generator,
                                     self.value_range)
                yield noisy, [self.input_id] * size

        for features in self.client.stream_features(batches()):
            yield torch.from_numpy(features)
