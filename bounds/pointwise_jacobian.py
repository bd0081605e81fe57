"""A lower bound of ||J(x)||_2, the norm of the Jacobian of f at the image itself, by batched power iteration.

For any nonzero u, ||J^T u|| / ||u|| <= ||J^T||_2 = ||J||_2, so every power-iteration step gives a value that the
exact norm can only exceed (up to float32 rounding, ~1e-6 relative). F2I uses it to *decide*, never to certify:
every bound of the form K·r with K valid on a ball around x has K >= ||J(x)||, so a large enough lower bound proves
that such a bound cannot beat the global Lipschitz radius (bounds.f2i). Works on any differentiable model
(autograd through `model` itself, no bound graph needed), with no Python loop over images.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

# torch's forward-mode AD levels are process-global, not per thread: two threads inside torch.func.jvp at once
# corrupt each other's level ("Trying to access a forward AD level with an invalid index"). The server runs
# concurrent F2I searches in threads, so every forward-mode pass goes through this lock.
_FORWARD_AD = threading.Lock()


def _unit(v: torch.Tensor) -> torch.Tensor:
    norms = v.flatten(1).norm(dim=1).clamp(min=1e-30)
    return v / norms.reshape((-1,) + (1,) * (v.dim() - 1))


def jacobian_norm_lower(
    model: nn.Module,
    images: torch.Tensor,
    *,
    target: torch.Tensor | float = float("inf"),
    max_iterations: int = 6,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[batch] float64 lower bounds of ||J_f(x)||_2 for `images` [batch, *shape] (J an autograd Jacobian, a Clarke
    Jacobian of f at x for ReLU / MaxMin nets).

    Power iteration on J^T J from a seeded random start: each step is one forward-mode (J v) and one reverse-mode
    (J^T u) pass on the still-active images. An image stops iterating once its value reaches `target` [batch]
    (the caller only needs to know that), or once a step raised it by less than 1e-4 relative (the iteration has
    converged as far as this decision cares).
    """
    batch = images.shape[0]
    target = torch.as_tensor(target, dtype=torch.float64).expand(batch).to(images.device)
    lower = torch.zeros(batch, dtype=torch.float64, device=images.device)
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype).to(images.device)
    direction = _unit(noise)
    active = torch.arange(batch, device=images.device)
    for _ in range(max_iterations):
        if active.numel() == 0:
            break
        points = images[active]
        with _FORWARD_AD:
            _, forward = torch.func.jvp(model, (points,), (direction,))  # J v, in the output's shape
        _, pullback = torch.func.vjp(model, points)
        (back,) = pullback(forward)  # J^T J v
        forward = forward.reshape(active.numel(), -1)
        value = back.reshape(active.numel(), -1).norm(dim=1).double() / forward.norm(dim=1).double().clamp(min=1e-300)
        previous = lower[active]
        lower[active] = torch.maximum(previous, value)
        still = (lower[active] < target[active]) & (value > previous * (1 + 1e-4))
        active, direction = active[still], _unit(back[still])
    return lower
