"""ServedEncoder: the loaded checkpoint on its device, with the two computations the service sells.

Loading goes through robust_pretrain's checkpoint format (safetensors + JSON sidecar with a sound Lipschitz
bound); the bound math is bounds' — this module only places tensors on the right device and chunks work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import bounds
from robust_pretrain import CheckpointMetadata, LoadedEncoder, load_checkpoint, load_demo_encoder


def pick_device(requested: str | None) -> torch.device:
    """CUDA when present (or as requested), CPU otherwise."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ImageRadii:
    """F2IPerturb's answer for a batch: certified radius, deciding bound and search steps per image."""

    image_radius: torch.Tensor  # [batch] float64
    bound: tuple[str, ...]
    search_steps: torch.Tensor  # [batch] int64


class ServedEncoder:
    """One encoder, read-only after construction, safe to call from many gRPC threads."""

    def __init__(self, loaded: LoadedEncoder, device: torch.device) -> None:
        self.metadata: CheckpointMetadata = loaded.metadata
        self.device = device
        self.model = loaded.model.to(device).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @classmethod
    def load(cls, checkpoint: Path | None, device: str | None = None) -> ServedEncoder:
        loaded = load_demo_encoder() if checkpoint is None else load_checkpoint(checkpoint)
        return cls(loaded, pick_device(device))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """f(images): [batch, C, H, W] float32 → [batch, feature_dim] float32 on the CPU."""
        with torch.inference_mode():
            return self.model(images.to(self.device, non_blocking=True)).float().cpu()

    def image_radii(
        self,
        images: torch.Tensor,
        feature_radii: torch.Tensor,
        *,
        bound: str,
        chunk_size: int,
        memory_budget_bytes: int,
        still_wanted: Callable[[], bool] = lambda: True,
    ) -> ImageRadii | None:
        """Certified image-space radii, computed ``chunk_size`` images at a time.

        Returns None as soon as ``still_wanted()`` turns false between chunks (the caller gave up), so a
        cancelled or expired call stops spending compute.
        """
        radii, bound_names, steps = [], [], []
        for start in range(0, images.shape[0], chunk_size):
            if not still_wanted():
                return None
            result = bounds.f2i_radius(
                self.model,
                images[start : start + chunk_size].to(self.device),
                feature_radii[start : start + chunk_size].to(self.device),
                bound=bound,
                lipschitz_upper=self.metadata.lipschitz_upper,
                memory_budget_bytes=memory_budget_bytes,
            )
            radii.append(result.image_radius.detach().double().cpu())
            bound_names.extend(result.bound)
            steps.append(result.search_steps.detach().long().cpu())
        return ImageRadii(torch.cat(radii), tuple(bound_names), torch.cat(steps))
