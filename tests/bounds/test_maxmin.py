"""MaxMin and PixelUnshuffle in bounds/: traced exactly, sound IBP / CROWN / Jacobian / Lipschitz bounds."""

from __future__ import annotations

import math

import pytest
import torch
from bounds_models import MAXMIN_ENCODERS
from torch import nn

from bounds import (
    BOUNDS_OFFERED,
    InputBall,
    MaxMin,
    UnsupportedLayerError,
    build_graph,
    compute_bounds,
    concretize,
    crown_backward,
    f2i_radius,
    feature_distance_upper,
    global_lipschitz_upper,
    layer_product_lipschitz_upper,
    operator_norm_upper,
    pgd_feature_distance,
)
from bounds.feature_distance import FEATURE_BOUNDS, jacobian_interval
from bounds.midpoint_lipschitz import midpoint_lipschitz_upper
from bounds.operators import Box, MaxMinOperator, PixelUnshuffleOperator
from bounds.spectral import SPECTRAL_SAFETY


def _random_ball_points(center: torch.Tensor, radius: float, count: int, generator) -> torch.Tensor:
    """[count, *shape]: random points of the l2 ball, half of them on its sphere."""
    direction = torch.randn(count, *center.shape, generator=generator, dtype=center.dtype)
    direction = direction / direction.reshape(count, -1).norm(dim=1).reshape(-1, *([1] * center.dim()))
    scale = torch.rand(count, generator=generator, dtype=center.dtype)
    scale[: count // 2] = 1.0
    return center + radius * scale.reshape(-1, *([1] * center.dim())) * direction


def _attacked_points(model, center: torch.Tensor, radius: float, generator) -> torch.Tensor:
    """PGD perturbations (feature-distance maximisers) of `center` [1, *shape]: [1, *shape]."""
    _, delta = pgd_feature_distance(model, center, torch.tensor([radius]), steps=100, restarts=5, generator=generator)
    return center + delta


@pytest.mark.parametrize("encoder_name", sorted(MAXMIN_ENCODERS))
def test_graph_forward_matches_model(encoder_name):
    build, shape = MAXMIN_ENCODERS[encoder_name]
    model = build(0)
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(build_graph(model, shape).forward(x), model(x), rtol=1e-5, atol=1e-5)


def test_maxmin_needs_even_channels_and_unshuffle_divisible_sizes():
    with pytest.raises(UnsupportedLayerError, match="MaxMin"):
        build_graph(nn.Sequential(nn.Linear(4, 5), MaxMin()), (4,))
    with pytest.raises(UnsupportedLayerError, match="PixelUnshuffle"):
        build_graph(nn.PixelUnshuffle(2), (1, 5, 4))


@pytest.mark.parametrize("shape", [(6,), (4, 3, 2)])
def test_maxmin_interval_is_exact_for_boxes(shape):
    """The interval is attained: forward(lower corner) and forward(upper corner) are its ends, and random points
    of the box stay inside."""
    generator = torch.Generator().manual_seed(1)
    op = MaxMinOperator(shape)
    lower = torch.randn(3, *shape, generator=generator, dtype=torch.float64)
    upper = lower + torch.rand(3, *shape, generator=generator, dtype=torch.float64)
    out = op.interval(Box(lower, upper))
    assert torch.equal(out.lower, op.forward(lower)) and torch.equal(out.upper, op.forward(upper))
    for _ in range(20):
        y = op.forward(lower + torch.rand(lower.shape, generator=generator, dtype=torch.float64) * (upper - lower))
        assert (out.lower <= y).all() and (y <= out.upper).all()


def test_pixel_unshuffle_is_a_permutation_with_its_exact_adjoint():
    generator = torch.Generator().manual_seed(2)
    (op,) = [n.op for n in build_graph(nn.PixelUnshuffle(2), (3, 4, 6), dtype=torch.float64).nodes[1:]]
    assert isinstance(op, PixelUnshuffleOperator) and op.out_shape == (12, 2, 3)
    x = torch.randn(5, 3, 4, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(5, 12, 2, 3, generator=generator, dtype=torch.float64)
    torch.testing.assert_close((op.linear(x) * y).sum(), (x * op.vjp(y)).sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(op.linear(x), nn.PixelUnshuffle(2)(x), rtol=0, atol=0)
    assert torch.equal(op.linear(x).reshape(5, -1).sort().values, x.reshape(5, -1).sort().values)  # a permutation
    assert torch.equal(op.abs_linear(x.abs()), op.linear(x).abs()) and torch.equal(op.abs_vjp(y), op.vjp(y))
    assert operator_norm_upper(op) == 1.0


@pytest.mark.parametrize("intermediate", ["ibp", "crown"])
@pytest.mark.parametrize("encoder_name", sorted(MAXMIN_ENCODERS))
def test_interval_bounds_contain_random_and_attacked_points(encoder_name, intermediate):
    build, shape = MAXMIN_ENCODERS[encoder_name]
    model = build(3)
    generator = torch.Generator().manual_seed(3)
    center = torch.rand(1, *shape, generator=generator)
    graph = build_graph(model, shape)
    for radius in (0.1, 1.0):
        boxes = compute_bounds(graph, InputBall(center, torch.tensor([radius])), intermediate=intermediate)
        points = torch.cat([_random_ball_points(center[0], radius, 200, generator),
                            _attacked_points(model, center, radius, generator)])
        for index, value in enumerate(graph.forward_all(points)):
            assert (value >= boxes[index].lower).all() and (value <= boxes[index].upper).all(), (index, radius)


@pytest.mark.parametrize("encoder_name", sorted(MAXMIN_ENCODERS))
def test_global_lipschitz_dominates_attacks_and_stays_below_the_layer_product(encoder_name):
    build, shape = MAXMIN_ENCODERS[encoder_name]
    model = build(4)
    bound = global_lipschitz_upper(model, shape)
    assert bound <= layer_product_lipschitz_upper(model, shape)
    if encoder_name.startswith("aol"):
        layers = sum(isinstance(m, nn.Linear | nn.Conv2d) for m in model.modules())
        assert bound <= (1 + SPECTRAL_SAFETY) ** layers
    generator = torch.Generator().manual_seed(4)
    images = torch.rand(4, *shape, generator=generator)
    for radius in (0.01, 1.0, 10.0):
        distance, _ = pgd_feature_distance(model, images, torch.full((4,), radius), steps=100, restarts=5,
                                           generator=generator)
        assert float(distance.max()) / radius <= bound
    x = images.clone().requires_grad_(True)
    out = model(x)
    for k in range(out.shape[1]):
        (grad,) = torch.autograd.grad(out[:, k].sum(), x, retain_graph=True)
        assert float(grad.reshape(4, -1).norm(dim=1).max()) <= bound


def test_maxmin_is_exactly_one_lipschitz_in_the_layer_product():
    # MaxMin and PixelUnshuffle have norm 1: the product is the (float32-orthogonal) weight's exact norm
    torch.manual_seed(5)
    linear = nn.Linear(16, 16)
    nn.init.orthogonal_(linear.weight)
    model = nn.Sequential(nn.PixelUnshuffle(2), nn.Flatten(), linear, MaxMin())
    product = layer_product_lipschitz_upper(model, (1, 4, 4))
    exact = float(torch.linalg.matrix_norm(linear.weight.detach().double(), ord=2))
    assert exact <= product <= exact * (1.0 + 2 * SPECTRAL_SAFETY)
    assert math.isclose(global_lipschitz_upper(model, (1, 4, 4)), product)


def test_maxmin_crown_step_holds_on_every_point_of_the_box():
    """One backward step: lA·y >= lA_in·x + lbias and uA·y <= uA_in·x + ubias at random points (and corners) of
    boxes with stable and unstable pairs, for random signed coefficients."""
    generator = torch.Generator().manual_seed(6)
    shape = (8,)
    op = MaxMinOperator(shape)
    lower = torch.randn(4, *shape, generator=generator, dtype=torch.float64)
    upper = lower + 2 * torch.rand(4, *shape, generator=generator, dtype=torch.float64)
    assert op.unstable_inputs(Box(lower, upper)).any() and not op.unstable_inputs(Box(lower, upper)).all()
    lA = torch.randn(4, 5, *shape, generator=generator, dtype=torch.float64)
    uA = torch.randn(4, 5, *shape, generator=generator, dtype=torch.float64)
    [(lA_in, uA_in)], lbias, ubias = op.backward(lA, uA, (Box(lower, upper),))
    corners = torch.rand(300, 4, *shape, generator=generator, dtype=torch.float64).round()
    fractions = torch.cat([corners, torch.rand(300, 4, *shape, generator=generator, dtype=torch.float64)])
    for fraction in fractions:
        x = lower + fraction * (upper - lower)
        y = op.forward(x)
        assert (torch.einsum("bsn,bn->bs", lA, y) >= torch.einsum("bsn,bn->bs", lA_in, x) + lbias - 1e-12).all()
        assert (torch.einsum("bsn,bn->bs", uA, y) <= torch.einsum("bsn,bn->bs", uA_in, x) + ubias + 1e-12).all()


def test_maxmin_crown_is_exact_where_every_pair_is_ordered():
    op = MaxMinOperator((4,))
    # x = (a0, a1, b0, b1) with a0 in [1, 2] >= b0 in [0, 0.5] and a1 in [-3, -2] <= b1 = -1
    lower = torch.tensor([[1.0, -3.0, 0.0, -1.0]], dtype=torch.float64)
    upper = torch.tensor([[2.0, -2.0, 0.5, -1.0]], dtype=torch.float64)
    lA = torch.randn(1, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    [(lA_in, uA_in)], lbias, ubias = op.backward(lA, lA, (Box(lower, upper),))
    # y = (a0, b1, b0, a1): the coefficients are those of that permutation (up to rounding), with no bias
    expected = torch.stack([lA[..., 0], lA[..., 3], lA[..., 2], lA[..., 1]], dim=-1)
    torch.testing.assert_close(lA_in, expected, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(uA_in, expected, rtol=1e-15, atol=1e-15)
    assert float(lbias.abs().max()) == 0.0 and float(ubias.abs().max()) == 0.0


def _tiny_maxmin_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 8), MaxMin(), nn.Linear(8, 8), MaxMin(), nn.Linear(8, 3)).double()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ibp_and_crown_contain_brute_force_extremes_of_a_2d_maxmin_net(seed):
    """Dense grids of 2-D balls: every node inside its box, the output inside CROWN's bounds."""
    model = _tiny_maxmin_net(seed)
    graph = build_graph(model, (2,), dtype=torch.float64)
    centers = torch.randn(3, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    radius = 0.7
    ball = InputBall(centers, torch.full((3,), radius, dtype=torch.float64))
    axis = torch.linspace(-radius, radius, 201, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    angle = torch.linspace(0, 2 * math.pi, 800, dtype=torch.float64)
    grid = torch.cat([grid[grid.norm(dim=1) <= radius], radius * torch.stack([angle.cos(), angle.sin()], dim=1)])
    spec = torch.eye(3, dtype=torch.float64).expand(3, 3, 3)
    for intermediate in ("ibp", "crown"):
        boxes = compute_bounds(graph, ball, intermediate=intermediate)
        crown = concretize(ball, crown_backward(graph, boxes, graph.output_index, spec, spec))
        for b in range(3):
            values = graph.forward_all(centers[b] + grid)
            for index, value in enumerate(values):
                assert (value >= boxes[index].lower[b] - 1e-9).all() and (value <= boxes[index].upper[b] + 1e-9).all()
            assert (values[-1] >= crown.lower[b] - 1e-9).all() and (values[-1] <= crown.upper[b] + 1e-9).all()


@pytest.mark.parametrize("encoder_name", sorted(MAXMIN_ENCODERS))
def test_crown_output_bounds_contain_random_and_attacked_points(encoder_name):
    build, shape = MAXMIN_ENCODERS[encoder_name]
    model = build(8)
    generator = torch.Generator().manual_seed(8)
    center = torch.rand(1, *shape, generator=generator)
    graph = build_graph(model, shape)
    features = int(graph.nodes[-1].shape[0])
    spec = torch.eye(features).expand(1, features, features)
    for radius in (0.1, 1.0):
        ball = InputBall(center, torch.tensor([radius]))
        crown = concretize(ball, crown_backward(graph, compute_bounds(graph, ball), graph.output_index, spec, spec))
        points = torch.cat([_random_ball_points(center[0], radius, 200, generator),
                            _attacked_points(model, center, radius, generator)])
        with torch.no_grad():
            out = model(points)
        assert (out >= crown.lower).all() and (out <= crown.upper).all(), radius


@pytest.mark.parametrize("radius", [0.05, 0.5])
@pytest.mark.parametrize("encoder_name", sorted(MAXMIN_ENCODERS))
def test_jacobian_interval_contains_autograd_jacobians_in_the_ball(encoder_name, radius):
    build, shape = MAXMIN_ENCODERS[encoder_name]
    model = build(9).double()
    generator = torch.Generator().manual_seed(9)
    center = torch.rand(1, *shape, generator=generator, dtype=torch.float64)
    graph = build_graph(model, shape, dtype=torch.float64)
    boxes = compute_bounds(graph, InputBall(center, torch.tensor([radius], dtype=torch.float64)))
    c, r = jacobian_interval(graph, boxes)
    assert (r > 0).any()  # some pair flips inside the ball: the check is not only the exact-Jacobian case
    for point in _random_ball_points(center[0], radius, 12, generator):
        jacobian = torch.autograd.functional.jacobian(lambda z: model(z.unsqueeze(0)).squeeze(0), point)
        assert ((jacobian.reshape(c.shape[1:]) - c[0]).abs() <= r[0] + 1e-12).all()


@pytest.mark.parametrize("encoder_name", sorted(MAXMIN_ENCODERS))
def test_every_feature_distance_bound_dominates_pgd_and_random_directions(encoder_name):
    build, shape = MAXMIN_ENCODERS[encoder_name]
    model = build(10)
    generator = torch.Generator().manual_seed(10)
    images = torch.rand(2, *shape, generator=generator)
    graph = build_graph(model, shape)
    lipschitz = global_lipschitz_upper(model, shape)
    for radius_value in (0.05, 0.5, 2.0):
        radius = torch.full((2,), radius_value)
        upper = feature_distance_upper(graph, images, radius, FEATURE_BOUNDS, lipschitz_upper=lipschitz)
        attacked, _ = pgd_feature_distance(model, images, radius, steps=100, restarts=5, generator=generator)
        with torch.no_grad():
            sampled = torch.stack([
                (model(_random_ball_points(images[b], radius_value, 100, generator)) - model(images[b:b + 1]))
                .norm(dim=1).max().double() for b in range(2)
            ])
        for name, value in upper.items():
            assert (attacked <= value).all() and (sampled <= value).all(), (name, radius_value)


@pytest.mark.parametrize("bound", BOUNDS_OFFERED)
@pytest.mark.parametrize("encoder_name", sorted(MAXMIN_ENCODERS))
def test_f2i_radius_survives_pgd(encoder_name, bound):
    build, shape = MAXMIN_ENCODERS[encoder_name]
    model = build(11)
    generator = torch.Generator().manual_seed(11)
    images = torch.rand(2, *shape, generator=generator)
    feature_radii = torch.tensor([0.1, 0.5])
    result = f2i_radius(model, images, feature_radii, bound=bound)
    assert (result.image_radius > 0).all()
    attacked, _ = pgd_feature_distance(model, images, result.image_radius.float(), steps=100, restarts=5,
                                       generator=generator)
    assert (attacked < feature_radii.double()).all(), (bound, result.image_radius)


def _jacobian_norm(model, point: torch.Tensor) -> float:
    jacobian = torch.autograd.functional.jacobian(lambda z: model(z.unsqueeze(0)).squeeze(0), point)
    return float(torch.linalg.matrix_norm(jacobian.reshape(jacobian.shape[0], -1).double(), ord=2))


@pytest.mark.parametrize("encoder_name", [*sorted(MAXMIN_ENCODERS), "ends_in_maxmin"])
def test_midpoint_bound_is_exact_at_a_point_and_dominates_jacobians_in_the_ball(encoder_name):
    if encoder_name == "ends_in_maxmin":  # the output node is itself an activation
        torch.manual_seed(12)
        model, shape = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), MaxMin(), nn.Linear(8, 6), MaxMin()), (1, 4, 4)
    else:
        build, shape = MAXMIN_ENCODERS[encoder_name]
        model = build(12)
    generator = torch.Generator().manual_seed(12)
    center = torch.rand(2, *shape, generator=generator)
    graph = build_graph(model, shape)
    at_point = midpoint_lipschitz_upper(graph, compute_bounds(graph, InputBall(center, torch.zeros(2))))
    for b in range(2):
        exact = _jacobian_norm(model, center[b])
        assert exact <= float(at_point[b]) <= exact * (1 + 1e-4)
    for radius in (0.1, 1.0):
        boxes = compute_bounds(graph, InputBall(center[:1], torch.tensor([radius])))
        bound = float(midpoint_lipschitz_upper(graph, boxes)[0])
        for point in _random_ball_points(center[0], radius, 10, generator):
            assert _jacobian_norm(model, point) <= bound
