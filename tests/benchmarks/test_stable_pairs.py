"""benchmarks.heads.stable_pair_share: the share of first-layer MaxMin pairs whose order a ball cannot flip."""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.heads import stable_pair_share
from bounds import MaxMin


def _head() -> nn.Sequential:
    first, last = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        first.bias.zero_()
    return nn.Sequential(first, MaxMin(), last)


def test_a_pair_is_stable_exactly_while_the_ball_cannot_reach_its_tie():
    z = torch.tensor([[3.0, 0.0]])  # pair gap 3, tie at distance 3 / sqrt(2) = 2.12
    assert stable_pair_share(_head(), z, torch.tensor([2.0])) == 1.0
    assert stable_pair_share(_head(), z, torch.tensor([2.2])) == 0.0


def test_no_share_without_maxmin_or_without_a_certified_input():
    assert stable_pair_share(nn.Sequential(nn.Linear(2, 2)), torch.zeros(1, 2), torch.ones(1)) is None
    assert stable_pair_share(_head(), torch.zeros(1, 2), torch.zeros(1)) is None
