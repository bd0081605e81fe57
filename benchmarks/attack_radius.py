"""The empirical robust radius of a classifier: the smallest l2 radius at which PGD finds a label change.

A certificate says "no x' with ||x' - x||_2 < R changes the label"; an attack that changes it at distance r proves
the true robust radius is <= r. So for the classifier a certificate is about, certified / attack <= 1 always
(a ratio above 1 would be a soundness bug), and 1 - ratio is the room a tighter bound could still win.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from bounds import pgd_margin_attack


@dataclass(frozen=True)
class AttackConfig:
    """Bisection over the radius in [0, `max_radius`] (`search_steps` halvings), l2 PGD on the margin
    (bounds.pgd_margin_attack, `steps` x `restarts`) at each probe radius."""

    max_radius: float = 4.0  # l2 attack radii of these digit classifiers lie in ~0.5-2.5; beyond 4 is censored
    search_steps: int = 8  # resolution max_radius / 2^8 ~ 0.016
    steps: int = 100
    restarts: int = 2  # 5 costs 2.5x (~10 min more in bench-certify); a weaker attack only loosens the upper bound
    seed: int = 0

    def describe(self) -> str:
        return (f"l2 PGD on the margin, {self.steps} steps x {self.restarts} restarts per probe, bisection over "
                f"the radius in [0, {self.max_radius:g}] ({self.search_steps} halvings, float64)")


class Clip(nn.Module):
    """x -> clamp(x, low, high): the pixel clipping a SEaaS client applies before querying f."""

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(self.low, self.high)


def attack_radius(classifier: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                  config: AttackConfig = AttackConfig()) -> torch.Tensor:
    """Per input [B] (inputs [B, ...], labels [B]): an UPPER bound of `classifier`'s true l2 robust radius.

    0 where the input is already misclassified; otherwise the smallest probed radius at which PGD found a label
    change (each one a real counterexample), `max_radius` where none was found. The model runs in float64, so
    float32 rounding cannot fake a label change at a margin a certificate proved to be ~1e-7."""
    model = copy.deepcopy(classifier).double().eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    inputs, labels = inputs.double(), labels.long()
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        correct = model(inputs).argmax(1) == labels
    low = torch.zeros(len(inputs), dtype=torch.float64)
    high = torch.full((len(inputs),), config.max_radius, dtype=torch.float64)
    active = correct.clone()
    for _ in range(config.search_steps):
        if not active.any():
            break
        middle = (low + high) / 2
        margin, _ = pgd_margin_attack(model, inputs[active], labels[active], middle[active], steps=config.steps,
                                      restarts=config.restarts, generator=generator)
        fooled = torch.zeros(len(inputs), dtype=torch.bool)
        fooled[active] = margin < 0
        high = torch.where(fooled, middle, high)
        low = torch.where(active & ~fooled, middle, low)
    return torch.where(correct, high, torch.zeros_like(high))
