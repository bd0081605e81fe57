"""IBP and CROWN bounds contain the brute-force extremes of tiny nets with 2-D inputs (dense grids of the ball)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bounds import InputBall, Residual, build_graph, compute_bounds, concretize, crown_backward
from bounds.operators import ReLUOperator


def _tiny_net(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    return nn.Sequential(
        nn.Linear(2, 6), nn.ReLU(),
        Residual(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))), nn.ReLU(),
        Residual(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 4)), shortcut=nn.Linear(6, 4)),
        nn.ReLU(), nn.Linear(4, 3),
    )


def _ball_points(center: torch.Tensor, radius: float, norm: str, resolution: int = 201) -> torch.Tensor:
    """Dense points of the 2-D ball (grid inside plus the whole boundary): [points, 2]."""
    axis = torch.linspace(-radius, radius, resolution, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    if norm == "l2":
        grid = grid[grid.norm(dim=1) <= radius]
        angle = torch.linspace(0, 2 * math.pi, 4 * resolution, dtype=torch.float64)
        grid = torch.cat([grid, radius * torch.stack([angle.cos(), angle.sin()], dim=1)])
    return center.double() + grid


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("kind", ["mlp", "residual"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ibp_and_crown_contain_brute_force_extremes(kind, seed, norm):
    model = _tiny_net(kind, seed).double()
    graph = build_graph(model, (2,), dtype=torch.float64)
    centers = torch.randn(3, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    radius = 0.7
    ball = InputBall(centers, torch.full((3,), radius, dtype=torch.float64), norm)
    for intermediate in ("ibp", "crown"):
        boxes = compute_bounds(graph, ball, intermediate=intermediate)
        spec = torch.eye(3, dtype=torch.float64).expand(3, 3, 3)
        crown = concretize(ball, crown_backward(graph, boxes, graph.output_index, spec, spec))
        for b in range(3):
            values = graph.forward_all(_ball_points(centers[b], radius, norm))
            for node_index, value in enumerate(values):
                box = boxes[node_index]
                assert (value >= box.lower[b] - 1e-9).all() and (value <= box.upper[b] + 1e-9).all(), node_index
            output = values[-1]
            assert (output >= crown.lower[b] - 1e-9).all() and (output <= crown.upper[b] + 1e-9).all()


def test_crown_intermediate_bounds_are_tighter_than_ibp_on_average():
    model = _tiny_net("mlp", 7).double()
    graph = build_graph(model, (2,), dtype=torch.float64)
    centers = torch.randn(16, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ball = InputBall(centers, torch.full((16,), 0.5, dtype=torch.float64))
    ibp = compute_bounds(graph, ball, intermediate="ibp")
    crown = compute_bounds(graph, ball, intermediate="crown")
    relu_inputs = [n.inputs[0] for n in graph.nodes[1:] if isinstance(n.op, ReLUOperator)]
    last = relu_inputs[-1]
    assert (crown[last].upper - crown[last].lower <= ibp[last].upper - ibp[last].lower + 1e-12).all()
    assert (crown[last].upper - crown[last].lower).mean() < (ibp[last].upper - ibp[last].lower).mean()


def test_crown_is_exact_for_an_affine_net():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 5), nn.Linear(5, 2)).double()
    graph = build_graph(model, (2,), dtype=torch.float64)
    center = torch.randn(1, 2, dtype=torch.float64)
    ball = InputBall(center, torch.tensor([0.3], dtype=torch.float64))
    boxes = compute_bounds(graph, ball)
    spec = torch.eye(2, dtype=torch.float64).expand(1, 2, 2)
    crown = concretize(ball, crown_backward(graph, boxes, graph.output_index, spec, spec))
    points = graph.forward(_ball_points(center[0], 0.3, "l2", 401))
    torch.testing.assert_close(crown.upper[0], points.max(dim=0).values, rtol=0, atol=1e-5)
    torch.testing.assert_close(crown.lower[0], points.min(dim=0).values, rtol=0, atol=1e-5)
