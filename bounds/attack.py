"""PGD lower bounds of the feature distance: what no sound upper bound may ever undercut.

`pgd_feature_distance` maximises ||f(x + d) - f(x)||_2 over ||d||_2 <= r by projected, normalised gradient
ascent with random restarts; the value it returns is achieved by an actual d in the ball, so it is a lower bound
of the true maximum. Used by the soundness tests and the benchmark's attack limit R_atk.
"""

from __future__ import annotations

import torch
from torch import nn


def _project(delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    norms = delta.reshape(delta.shape[0], -1).norm(dim=1).clamp(min=1e-30)
    scale = torch.clamp(radius / norms, max=1.0)
    return delta * scale.reshape((-1,) + (1,) * (delta.dim() - 1))


def pgd_feature_distance(
    model: nn.Module,
    images: torch.Tensor,
    radius: torch.Tensor,
    *,
    steps: int = 50,
    restarts: int = 3,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(distance [batch], delta [batch, *shape])`: the largest ||f(x + d) - f(x)||_2 found with ||d||_2 <= r[b]."""
    radius = radius.to(images.dtype).to(images.device)
    with torch.no_grad():
        clean = model(images).reshape(images.shape[0], -1)
    best = torch.full((images.shape[0],), -1.0, dtype=torch.float64, device=images.device)
    best_delta = torch.zeros_like(images)
    view = (-1,) + (1,) * (images.dim() - 1)
    for _ in range(restarts):
        noise = torch.randn(images.shape, generator=generator, dtype=images.dtype).to(images.device)
        norms = noise.reshape(noise.shape[0], -1).norm(dim=1).clamp(min=1e-30)
        delta = noise * (radius / norms).reshape(view)
        for step in range(steps + 1):
            delta = delta.detach().requires_grad_(True)
            distance = (model(images + delta).reshape(images.shape[0], -1) - clean).norm(dim=1)
            with torch.no_grad():
                improved = distance.to(torch.float64) > best
                best = torch.where(improved, distance.to(torch.float64), best)
                best_delta[improved] = delta[improved].detach()
            if step == steps:
                break
            (gradient,) = torch.autograd.grad(distance.sum(), delta)
            with torch.no_grad():
                size = 0.5 * radius * (1 - step / steps) + 0.02 * radius
                unit = gradient / gradient.reshape(gradient.shape[0], -1).norm(dim=1).clamp(min=1e-30).reshape(view)
                delta = _project(delta + size.reshape(view) * unit, radius)
    return best, best_delta
