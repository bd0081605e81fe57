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
    # + a targeted PGD (1 restart) toward each of this many runner-up classes, nearest first by the linearised
    # distance gap_j / ||grad gap_j|| at the input. The untargeted margin min_j (z_y - z_j) is concave where h is
    # linear, so PGD can settle on a sphere point pushing toward the wrong class; toward one class it is linear there
    targets: int = 0

    def describe(self) -> str:
        targeted = (f" + {self.steps} steps toward each of the {self.targets} nearest runner-up classes"
                    if self.targets else "")
        return (f"l2 PGD on the margin, {self.steps} steps x {self.restarts} restarts{targeted} per probe, bisection "
                f"over the radius in [0, {self.max_radius:g}] ({self.search_steps} halvings, float64)")


class Clip(nn.Module):
    """x -> clamp(x, low, high): the pixel clipping a SEaaS client applies before querying f."""

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(self.low, self.high)


class _TowardClass(nn.Module):
    """The classifier with every logit but the predicted one's and one target's at -inf (per row, restart-major
    when PGD repeats the rows): its margin is z_y - z_target, and a negative one is a real label change."""

    def __init__(self, model: nn.Module, labels: torch.Tensor, target: torch.Tensor, classes: int) -> None:
        super().__init__()
        self.model = model
        keep = torch.zeros(len(labels), classes, dtype=torch.bool)
        keep[torch.arange(len(labels)), labels] = True
        keep[torch.arange(len(labels)), target] = True
        self.keep = keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return logits.masked_fill(~self.keep.repeat(len(x) // len(self.keep), 1), float("-inf"))


def nearest_classes(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] runner-up classes, nearest first by (z_y - z_j) / ||grad_x (z_y - z_j)|| at each input (the
    exact distance to the y/j boundary where the model is linear)."""
    x = inputs.detach().clone().requires_grad_(True)
    logits = model(x)
    own = logits.gather(1, labels[:, None]).squeeze(1)
    distance = torch.full(logits.shape, float("inf"), dtype=torch.float64)
    for j in range(logits.shape[1]):
        gap = own - logits[:, j]
        (grad,) = torch.autograd.grad(gap.sum(), x, retain_graph=True)
        distance[:, j] = (gap.detach() / grad.flatten(1).norm(dim=1).clamp_min(1e-12)).double()
    distance[torch.arange(len(labels)), labels] = float("inf")
    return distance.argsort(dim=1)[:, :count]


def _probe(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, radius: torch.Tensor,
           targets: torch.Tensor, config: AttackConfig, generator: torch.Generator) -> torch.Tensor:
    """[B] the smallest margin PGD found within `radius`: untargeted, then toward each class of `targets`."""
    margin, _ = pgd_margin_attack(model, inputs, labels, radius, steps=config.steps, restarts=config.restarts,
                                  generator=generator)
    classes = None
    for column in range(targets.shape[1]):
        if classes is None:
            with torch.no_grad():
                classes = model(inputs[:1]).shape[1]
        toward = _TowardClass(model, labels, targets[:, column], classes)
        aimed, _ = pgd_margin_attack(toward, inputs, labels, radius, steps=config.steps, restarts=1,
                                     generator=generator)
        margin = torch.minimum(margin, aimed)
    return margin


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
    targets = (nearest_classes(model, inputs, labels, config.targets) if config.targets
               else torch.zeros(len(inputs), 0, dtype=torch.long))
    low = torch.zeros(len(inputs), dtype=torch.float64)
    high = torch.full((len(inputs),), config.max_radius, dtype=torch.float64)
    active = correct.clone()
    for _ in range(config.search_steps):
        if not active.any():
            break
        middle = (low + high) / 2
        margin = _probe(model, inputs[active], labels[active], middle[active], targets[active], config, generator)
        fooled = torch.zeros(len(inputs), dtype=torch.bool)
        fooled[active] = margin < 0
        high = torch.where(fooled, middle, high)
        low = torch.where(active & ~fooled, middle, low)
    return torch.where(correct, high, torch.zeros_like(high))


@dataclass(frozen=True)
class Tightness:
    """How close a deterministic certificate comes to the attack on the classifier it certifies: per-input attack
    radii, mean(certified) / mean(attack) (1 = the certificate leaves nothing to a tighter bound), how many inputs
    the attack could not flip within `max_radius` (censored: their true attack radius is at least max(max_radius,
    certified), which is what they count as, so the ratio is optimistic where there are any), and how many
    uncensored inputs have a certified radius above the radius at which PGD flipped them (a soundness bug: must
    be 0)."""

    attack: torch.Tensor
    ratio: float
    censored: int
    violations: int

    @property
    def mean_attack(self) -> float:
        return float(self.attack.mean())


def certificate_tightness(classifier: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, certified: torch.Tensor,
                          config: AttackConfig = AttackConfig()) -> Tightness:
    """attack_radius of `classifier` on `inputs` [B, ...] against the certified radii `certified` [B] (0 where wrong),
    both over the same inputs, so the ratio of their means is the tightness of the certificate on average."""
    attack = attack_radius(classifier, inputs, labels, config)
    certified = certified.to(torch.float64)
    censored = attack >= config.max_radius
    violations = int((~censored & (certified > attack)).sum())
    attack = torch.where(censored, torch.maximum(attack, certified), attack)
    ratio = float(certified.mean() / attack.mean()) if attack.mean() > 0 else float("nan")
    return Tightness(attack, ratio, int(censored.sum()), violations)
