"""PGD attacks: lower bounds of the feature distance (what no sound upper bound may ever undercut), and
label changes of a classifier inside an l2 ball (what no certified radius may allow).

`pgd_feature_distance` maximises ||f(x + d) - f(x)||_2 over ||d||_2 <= r by projected, normalised gradient
ascent with random restarts (run as one batch); the value it returns is achieved by an actual d in the ball, so it is a lower bound
of the true maximum. Used by the soundness tests and the benchmark's attack limit R_atk. `pgd_margin_attack`
minimises a classifier's margin the same way; a negative margin it returns is a real label change.
"""

from __future__ import annotations

from collections.abc import Callable

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
    if restarts < 1:
        return torch.full((images.shape[0],), -1.0, dtype=torch.float64, device=images.device), torch.zeros_like(images)
    images, radius, delta = _random_starts(images, radius, restarts, generator)
    clean = clean.repeat(restarts, 1)

    def distance(delta: torch.Tensor) -> torch.Tensor:
        return (model(images + delta).reshape(images.shape[0], -1) - clean).norm(dim=1)

    best, best_delta = _ascend(distance, delta, radius, steps, maximize=True)
    return _best_restart(best, best_delta, restarts, largest=True)


def pgd_margin_attack(
    classifier: nn.Module,
    features: torch.Tensor,
    prediction: torch.Tensor,
    radius: torch.Tensor,
    *,
    steps: int = 100,
    restarts: int = 5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """l2 PGD on a classifier's margin: `(margin [batch], delta [batch, dim])`, the smallest
    h_y(z + d) - max_{j != y} h_j(z + d) found with ||d||_2 <= radius[b], y = `prediction`.

    The returned margin is achieved by the returned d, so a negative value is a real label change inside the ball:
    what no certified radius may allow. `features` [batch, dim], `prediction` [batch] int64, `radius` [batch].
    """
    if restarts < 1:
        return torch.full((features.shape[0],), float("inf"), dtype=torch.float64, device=features.device), \
            torch.zeros_like(features)
    radius = radius.to(features.dtype).to(features.device)
    features, radius, delta = _random_starts(features, radius, restarts, generator)
    prediction = prediction.to(features.device).unsqueeze(1).repeat(restarts, 1)

    def margin(delta: torch.Tensor) -> torch.Tensor:
        logits = classifier(features + delta)
        own = logits.gather(1, prediction).squeeze(1)
        return own - logits.scatter(1, prediction, float("-inf")).max(dim=1).values

    best, best_delta = _ascend(margin, delta, radius, steps, maximize=False)
    return _best_restart(best, best_delta, restarts, largest=False)


def _ascend(objective: Callable[[torch.Tensor], torch.Tensor], delta: torch.Tensor, radius: torch.Tensor, steps: int, *,
            maximize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The one PGD loop: `steps` projected, normalised gradient steps on `objective(delta)` [rows] (up when
    `maximize`, down otherwise), step length decaying from half the radius; returns per row the best value seen
    (float64) and the delta that achieved it, so the value is always realised by a point in the ball."""
    sign = 1.0 if maximize else -1.0
    view = (-1,) + (1,) * (delta.dim() - 1)
    best = torch.full((delta.shape[0],), -sign * float("inf"), dtype=torch.float64, device=delta.device)
    best_delta = torch.zeros_like(delta)
    for step in range(steps + 1):
        delta = delta.detach().requires_grad_(True)
        value = objective(delta)
        with torch.no_grad():
            improved = sign * value.to(torch.float64) > sign * best
            best = torch.where(improved, value.to(torch.float64), best)
            best_delta[improved] = delta[improved].detach()
        if step == steps:
            break
        (gradient,) = torch.autograd.grad(value.sum(), delta)
        with torch.no_grad():
            size = 0.5 * radius * (1 - step / steps) + 0.02 * radius
            unit = gradient / gradient.reshape(gradient.shape[0], -1).norm(dim=1).clamp(min=1e-30).reshape(view)
            delta = _project(delta + sign * size.reshape(view) * unit, radius)
    return best, best_delta


def _random_starts(
    points: torch.Tensor, radius: torch.Tensor, restarts: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All restarts as one batch, restart-major: `(points, radius, delta)` with `restarts·batch` rows, delta a
    uniformly random direction scaled to the radius. The draws come restart by restart from `generator`, so the
    starts (and the generator's state afterwards) are those of running the restarts one after another; every row
    then follows its own trajectory, as the model treats rows independently."""
    view = (-1,) + (1,) * (points.dim() - 1)
    noise = torch.cat([torch.randn(points.shape, generator=generator, dtype=points.dtype) for _ in range(restarts)])
    noise = noise.to(points.device)
    radius = radius.repeat(restarts)
    delta = noise * (radius / noise.reshape(noise.shape[0], -1).norm(dim=1).clamp(min=1e-30)).reshape(view)
    return points.repeat(restarts, *(1,) * (points.dim() - 1)), radius, delta


def _best_restart(
    best: torch.Tensor, best_delta: torch.Tensor, restarts: int, *, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point, the best value over the restarts' rows and its delta (the earliest restart on ties)."""
    best = best.reshape(restarts, -1)
    value, which = best.max(dim=0) if largest else best.min(dim=0)
    deltas = best_delta.reshape(restarts, best.shape[1], *best_delta.shape[1:])
    return value, deltas[which, torch.arange(best.shape[1], device=which.device)]
