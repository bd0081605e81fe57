"""The max-affine certificate (bounds.max_affine) is sound (no PGD or random perturbation inside R changes the
label; in 2-D no ray in 20 000 directions leaves the certified label region inside R) and exact (a witness, the
least-distance point of each other-class piece's region, checked on h, leaves it at R)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bounds import SAFETY_MARGIN, ClassMax, certify_feature_radius, pgd_margin_attack
from bounds.feature_certification import rounding_allowance
from bounds.max_affine import least_distance


def random_max_affine(dim: int, classes: int, pieces: int, seed: int) -> nn.Sequential:
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(dim, classes * pieces)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(classes * pieces, dim, generator=generator))
        linear.bias.copy_(torch.randn(classes * pieces, generator=generator))
    return nn.Sequential(linear, ClassMax(pieces)).eval()


def leaves_certified_region(h: nn.Sequential, points: torch.Tensor, label: int, allowance: float) -> torch.Tensor:
    """[n] bool, in float64: the label no longer leads every other class by `allowance` (the centre's rounding
    allowance, which the certificate keeps every margin above)."""
    with torch.no_grad():
        logits = h.double()(points.double())
    others = torch.cat([logits[:, :label], logits[:, label + 1:]], dim=1).amax(dim=1)
    return logits[:, label] - others <= allowance


def ray_distance(h: nn.Sequential, centre: torch.Tensor, label: int, allowance: float, directions: torch.Tensor,
                 reach: float, samples: int = 500) -> float:
    """The smallest distance along any of `directions` [n, d] (unit) at which the input leaves the certified
    region: each ray is walked in `samples` steps up to `reach` to its first point outside (the region outside
    may be bounded, so only walking finds it), then bisected to ~1e-12 between that step and the one before."""
    steps = torch.linspace(0, reach, samples + 1, dtype=torch.float64)[1:]
    out = torch.stack([leaves_certified_region(h, centre + t * directions, label, allowance) for t in steps], dim=1)
    hits = out.any(dim=1)
    first = out[hits].float().argmax(dim=1)
    high = steps[first]
    low = torch.where(first > 0, steps[(first - 1).clamp(min=0)], torch.zeros_like(high))
    directions = directions[hits]
    for _ in range(40):
        middle = (low + high) / 2
        out = leaves_certified_region(h, centre + middle[:, None] * directions, label, allowance)
        high = torch.where(out, middle, high)
        low = torch.where(out, low, middle)
    return float(high.min()) if high.numel() else math.inf


@pytest.mark.parametrize("seed", range(6))
def test_the_certificate_is_exact_in_two_dimensions(seed: int) -> None:
    h = random_max_affine(2, 3, 4, seed).double()
    angles = torch.linspace(0, 2 * math.pi, 20_000, dtype=torch.float64)
    directions = torch.stack([angles.cos(), angles.sin()], dim=1)
    points = torch.randn(8, 2, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    cert = certify_feature_radius(h.float(), points.float())
    with torch.no_grad():
        allowance = rounding_allowance(h.float()(points.float()))
    for point, label, radius, delta in zip(points, cert.prediction.tolist(), cert.feature_radius.tolist(),
                                           allowance.tolist(), strict=True):
        centre = point.float().double()
        nearest = ray_distance(h, centre, label, delta, directions, reach=10.0)
        if radius == 0:
            continue
        assert radius <= nearest  # sound: no ray leaves the region inside R
        # exact: a witness leaves the region at R (up to the SAFETY_MARGIN = 1e-4 of R the certificate keeps back)
        witness = nearest_leaving_point(h, centre, label, delta)
        assert leaves_certified_region(h, witness[None], label, delta).all()
        assert float((witness - centre).norm()) <= radius * (1 + 2 * SAFETY_MARGIN)


def nearest_leaving_point(h: nn.Sequential, centre: torch.Tensor, label: int, allowance: float) -> torch.Tensor:
    """The nearest z' where some other class's piece b comes within `allowance` of all of the label's pieces:
    for each b the least-distance point of those half-spaces, 1e-9 inside them. A witness only: the caller checks
    it on h, so nothing of bounds.max_affine is trusted here."""
    weight, bias = h[0].weight.detach().double().numpy(), h[0].bias.detach().double().numpy()
    owner = np.arange(weight.shape[0]) // h[1].pieces
    own = np.flatnonzero(owner == label)
    best = None
    for b in np.flatnonzero(owner != label):
        normals = weight[own] - weight[b]
        gaps = normals @ centre.numpy() + bias[own] - bias[b] - allowance + 1e-9
        _, offset = least_distance(normals, gaps)
        if offset is None:
            continue  # b never catches every one of the label's pieces
        point = centre + torch.from_numpy(offset)
        if leaves_certified_region(h, point[None], label, allowance).all() and (
                best is None or (point - centre).norm() < (best - centre).norm()):
            best = point
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(3))
def test_no_pgd_or_random_perturbation_inside_the_radius_changes_the_label(seed: int) -> None:
    h = random_max_affine(16, 5, 6, seed)
    points = 3 * torch.randn(200, 16, generator=torch.Generator().manual_seed(50 + seed))
    cert = certify_feature_radius(h, points)
    certified = cert.feature_radius > 0
    assert certified.float().mean() > 0.5
    z, label, radius = points[certified].double(), cert.prediction[certified], cert.feature_radius[certified]
    worst, _ = pgd_margin_attack(h.double(), z, label, radius, steps=100, restarts=5,
                                 generator=torch.Generator().manual_seed(seed))
    assert (worst > 0).all()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(20):
        direction = torch.randn(z.shape, generator=generator, dtype=torch.float64)
        moved = z + direction / direction.norm(dim=1, keepdim=True) * radius[:, None] * (1 - 1e-9)
        with torch.no_grad():
            assert (h.double()(moved).argmax(dim=1) == label).all()
    # and the attack reaches a label change not far beyond: the radius is the boundary, not a loose bound
    beyond, _ = pgd_margin_attack(h.double(), z, label, radius * 1.01, steps=200, restarts=5,
                                  generator=torch.Generator().manual_seed(seed))
    assert (beyond < 0).float().mean() > 0.8


def test_a_nearest_prototype_classifier_is_max_affine_and_certified_as_one() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(12, 5, generator=generator, dtype=torch.float64)  # 3 classes x 4 prototypes
    linear = nn.Linear(5, 12).double()
    with torch.no_grad():
        linear.weight.copy_(2 * centres)
        linear.bias.copy_(-centres.square().sum(dim=1))
    h = nn.Sequential(linear, ClassMax(4))
    z = torch.randn(300, 5, generator=generator, dtype=torch.float64)
    nearest_class = torch.cdist(z, centres).argmin(dim=1) // 4
    with torch.no_grad():
        assert torch.equal(h(z).argmax(dim=1), nearest_class)
    cert = certify_feature_radius(h.float(), z.float())
    # at least the classic single-pair bound max_a min_b (||z - c_b||^2 - ||z - c_a||^2) / (2 ||c_a - c_b||)
    squared = torch.cdist(z, centres).square()
    for row in range(z.shape[0]):
        own = torch.arange(12) // 4 == cert.prediction[row]
        pair = ((squared[row, ~own][None, :] - squared[row, own][:, None])
                / (2 * torch.cdist(centres[own], centres[~own])))
        assert cert.feature_radius[row] >= pair.min(dim=1).values.max() - 1e-3


def test_class_max_refuses_a_width_that_is_not_whole_classes() -> None:
    with pytest.raises(ValueError, match=r"classes \* 3"):
        ClassMax(3)(torch.zeros(2, 7))
    with pytest.raises(ValueError, match=">= 1 piece"):
        ClassMax(0)
