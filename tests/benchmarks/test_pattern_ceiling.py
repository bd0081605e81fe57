"""benchmarks.pattern_ceiling: the largest MaxMin-pattern gradient and the ceiling it puts on Lipschitz certificates."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from benchmarks.pattern_ceiling import (
    ceiling_radius,
    largest_pattern_gradients,
    pattern_gradient,
    patterns_at,
)
from bounds import MaxMin
from bounds.feature_certification import lipschitz_margin_radius


def _head(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), MaxMin(), nn.Linear(4, 4), MaxMin(), nn.Linear(4, 3)).double()


def test_the_pattern_gradient_at_a_point_is_the_margins_gradient_there():
    h = _head()
    z = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights = [m.weight.detach() for m in h if isinstance(m, nn.Linear)]
    for row, signs in enumerate(patterns_at(h, z)):
        point = z[row:row + 1].clone().requires_grad_(True)
        logits = h(point)[0]
        (logits[0] - logits[2]).backward()
        expected = pattern_gradient(weights, signs, weights[-1][0] - weights[-1][2])
        torch.testing.assert_close(point.grad[0], expected)


def test_sign_ascent_reaches_no_more_than_the_largest_pattern_and_no_less_than_its_starts():
    h = _head()
    weights = [m.weight.detach() for m in h if isinstance(m, nn.Linear)]
    starts = patterns_at(h, torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    largest = largest_pattern_gradients(h, starts, random_starts=2)
    every = [[torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)]
             for a in itertools.product((1.0, -1.0), repeat=2) for b in itertools.product((1.0, -1.0), repeat=2)]
    for y, j in ((0, 1), (0, 2), (1, 2)):
        direction = weights[-1][y] - weights[-1][j]
        exhaustive = max(float(pattern_gradient(weights, s, direction).norm()) for s in every)
        from_starts = max(float(pattern_gradient(weights, s, direction).norm()) for s in starts)
        assert from_starts - 1e-12 <= float(largest[y, j]) <= exhaustive + 1e-12
        assert largest[y, j] == largest[j, y]


def test_the_ceiling_is_never_below_the_certificate():
    h = _head(3)
    z = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    starts = patterns_at(h, z[:8])
    ceiling = ceiling_radius(h, z, largest_pattern_gradients(h, starts))
    certified = lipschitz_margin_radius(h, z, h(z).argmax(dim=1))
    assert bool((ceiling >= certified).all())
