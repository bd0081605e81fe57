"""Local Lipschitz bounds dominate the Jacobian norm anywhere in the ball and are exact when nothing is unstable."""

from __future__ import annotations

import pytest
import torch
from bounds_models import ENCODERS

from bounds import InputBall, build_graph, compute_bounds, global_lipschitz_upper, pgd_feature_distance
from bounds.feature_distance import local_jacobian_norm
from bounds.midpoint_lipschitz import midpoint_lipschitz_upper
from bounds.operators import Box


def _jacobian_norm(model, point: torch.Tensor) -> float:
    jacobian = torch.autograd.functional.jacobian(lambda z: model(z.unsqueeze(0)).squeeze(0), point)
    return float(torch.linalg.matrix_norm(jacobian.reshape(jacobian.shape[0], -1).double(), ord=2))


@pytest.mark.parametrize("radius", [0.05, 0.3, 3.0])
@pytest.mark.parametrize("encoder_name", sorted(ENCODERS))
def test_local_bound_dominates_jacobians_in_the_ball(encoder_name, radius):
    build, shape = ENCODERS[encoder_name]
    model = build(11)
    generator = torch.Generator().manual_seed(11)
    center = torch.rand(1, *shape, generator=generator)
    graph = build_graph(model, shape)
    boxes = compute_bounds(graph, InputBall(center, torch.tensor([radius])))
    bound = float(local_jacobian_norm(graph, boxes)[0])
    for _ in range(8):
        direction = torch.randn(shape, generator=generator)
        point = center[0] + radius * float(torch.rand(1, generator=generator)) * direction / direction.norm()
        assert _jacobian_norm(model, point) <= bound


@pytest.mark.parametrize("encoder_name", ["toy", "mnist_cnn"])
def test_midpoint_bound_is_exact_at_a_point_and_never_above_the_layer_product(encoder_name):
    build, shape = ENCODERS[encoder_name]
    model = build(12)
    center = torch.rand(2, *shape, generator=torch.Generator().manual_seed(12))
    graph = build_graph(model, shape)
    at_point = midpoint_lipschitz_upper(graph, compute_bounds(graph, InputBall(center, torch.zeros(2))))
    for b in range(2):
        exact = _jacobian_norm(model, center[b])
        assert exact <= float(at_point[b]) <= exact * (1 + 1e-4)
    everywhere = midpoint_lipschitz_upper(graph, compute_bounds(graph, InputBall(center, torch.full((2,), 1e4))))
    assert (everywhere <= global_lipschitz_upper(model, shape) * (1 + 1e-5)).all()


def test_large_matrix_fallback_stays_above_the_exact_norm(monkeypatch):
    """Past EXACT_NORM_COST the norm falls back to min(Frobenius, Hölder): looser, never below the exact value."""
    import bounds.midpoint_lipschitz as midpoint

    generator = torch.Generator().manual_seed(13)
    matrices = torch.randn(3, 40, 70, generator=generator) * torch.rand(3, 1, 70, generator=generator)
    exact = torch.linalg.matrix_norm(matrices.double(), ord=2)
    assert torch.allclose(midpoint.spectral_upper(matrices), exact, rtol=1e-5)
    monkeypatch.setattr(midpoint, "EXACT_NORM_COST", 0)
    fallback = midpoint.spectral_upper(matrices)
    assert (fallback >= exact).all() and (fallback > exact * 1.05).any()


@pytest.mark.parametrize("encoder_name", ["toy", "mnist_cnn"])
def test_global_midpoint_bound_dominates_every_slope_pattern_and_difference_quotient(encoder_name):
    """The all-unstable midpoint expansion is a global Lipschitz bound: it must stay above the best slope pattern
    the ascent finds (admissible everywhere), above PGD on ||f(x) - f(y)|| / ||x - y||, and below the product."""
    from bounds.midpoint_lipschitz import global_midpoint_upper
    from bounds.slope_ascent import slope_ascent_lower
    from bounds.spectral import layer_product_lipschitz_upper

    build, shape = ENCODERS[encoder_name]
    model = build(14)
    graph = build_graph(model, shape)
    bound = global_midpoint_upper(graph)
    assert bound == pytest.approx(global_lipschitz_upper(model, shape))
    assert bound <= layer_product_lipschitz_upper(model, shape) * (1 + 1e-6)
    images = torch.rand(4, *shape, generator=torch.Generator().manual_seed(14))
    everywhere = [Box(torch.full((4, *n.shape), -1.0), torch.full((4, *n.shape), 1.0)) for n in graph.nodes]
    ascent = slope_ascent_lower(graph, images, everywhere, restarts=6, iterations=60)
    assert float(ascent.max()) <= bound
    # the ascent is no strawman: it beats the Jacobian at the images themselves (one admissible pattern)
    assert float(ascent.min()) >= max(_jacobian_norm(model, x) for x in images) * (1 - 1e-5)
    for radius in (0.01, 1.0, 10.0):
        distance, _ = pgd_feature_distance(model, images, torch.full((4,), radius), steps=40, restarts=2,
                                           generator=torch.Generator().manual_seed(15))
        assert float(distance.max()) / radius <= bound
