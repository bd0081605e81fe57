"""The batched search returns only verified radii, converges to the threshold, and counts its calls."""

from __future__ import annotations

import torch

from bounds.search import batched_binary_search


def test_search_finds_thresholds_with_and_without_scores():
    thresholds = torch.tensor([0.3, 1.7, 12.0, 0.0005], dtype=torch.float64)

    def certify_bool(radius, index):
        return radius < thresholds[index]

    def certify_scored(radius, index):
        score = (radius / thresholds[index]) ** 1.5  # convex, crosses 1 at the threshold
        return score < 1, score

    for certify in (certify_bool, certify_scored):
        radius, steps = batched_binary_search(certify, torch.zeros(4), torch.ones(4), tolerance=1e-3, max_steps=60)
        assert (radius < thresholds).all()
        assert (radius >= thresholds * (1 - 2e-3)).all()
        assert (steps > 0).all()


def test_search_never_returns_an_unverified_radius_even_with_misleading_scores():
    thresholds = torch.tensor([0.5, 2.0], dtype=torch.float64)

    def certify(radius, index):
        return radius < thresholds[index], torch.rand(index.numel(), dtype=torch.float64) * 3

    radius, _ = batched_binary_search(certify, torch.zeros(2), torch.ones(2), tolerance=1e-4, max_steps=80)
    assert (radius < thresholds).all()
