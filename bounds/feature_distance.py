"""Sound upper bounds UB(x, r) of the feature distance `max_{||d||_2 <= r} ||f(x + d) - f(x)||_2`.

Write g(d) = f(x + d) - f(x) (g(0) = 0) and B = {d : ||d||_2 <= r}. Each bound below is >= max_B ||g||_2:

* `lipschitz`: L·r with L a sound global Lipschitz upper bound (bounds.lipschitz: the smaller of the layer-norm
  product and the midpoint expansion with every ReLU unstable): ||g(d)|| <= L·||d||.
* `ibp`: elementwise interval bounds l <= f(x + d) <= u on B give |g_i| <= max(u_i - f_i(x), f_i(x) - l_i),
  and the l2 norm of that vector bounds ||g||.
* `crown`: the same elementwise-to-l2 step with CROWN bounds of f (the paper's method). It loses up to
  sqrt(feature_dim) against the true l2 distance even when f is affine on B.
* `crown_spectral`: CROWN also yields matrices with `lA·d + bL <= g(d) <= uA·d + bU` on B (bL, bU absorb
  f(x)). Write g(d) = M·d + m + w(d) with M = (uA + lA)/2, m = (bU + bL)/2; then |w_i(d)| <= h_i(d) with
  h(d) = D·d + e, D = (uA - lA)/2, e = (bU - bL)/2, so by the triangle inequality
  ||g(d)|| <= ||M||_2·r + ||m|| + ||D||_2·r + ||e||, with exact (float64) spectral norms. When every ReLU is
  stable on B, f is affine there: lA = uA = J, bL = bU = 0 and the bound is the exact ||J||_2·r.
* `local_lipschitz`: by Lebourg's mean value theorem, g(d) lies in the convex hull of {J·d : J a Clarke
  Jacobian of f at a point of B}. Every such J = W_L·S_{L-1}·...·S_1·W_1 (residual adds summing branches) with
  S_k diagonal, entries 1 on stably active, 0 on stably inactive and in [0, 1] on unstable neurons (from the
  intermediate bounds on B); for MaxMin S_k is block-diagonal, [[t, 1 - t], [1 - t, t]] per pair, t fixed to 1 or
  0 on ordered pairs and in [0, 1] on the others. Interval arithmetic backward through that product gives |J - C| <= R elementwise,
  so ||J||_2 <= min(||C||_2 + ||R||_2, || |C| + R ||_2). For chains (no residual add) the midpoint expansion
  of bounds.midpoint_lipschitz gives a second sound bound of the same sup; UB = the smaller one times r. When
  every ReLU is stable, both are the exact ||J||_2·r.
* `best`: the minimum of all of the above, each sound, so the minimum is.

Intermediate bounds come from bounds.propagation (`intermediate="crown"` by default, or "ibp"); the bounds that
need them share one pass. Spectral norms are exact float64 values inflated by bounds.spectral.SPECTRAL_SAFETY.
Every function here takes an optional `should_stop` (bounds.cancellation), polled between layers and stages.
"""

from __future__ import annotations

import torch

from bounds.cancellation import StopCheck, stop_if_asked
from bounds.graph import BoundGraph
from bounds.midpoint_lipschitz import DEFAULT_MEMORY_BUDGET_BYTES, midpoint_applies, midpoint_lipschitz_upper
from bounds.operators import Box
from bounds.propagation import InputBall, compute_bounds, crown_backward
from bounds.spectral import matrix_norm_upper

FEATURE_BOUNDS = ("lipschitz", "ibp", "crown", "crown_spectral", "local_lipschitz")


def _elementwise_to_l2(box: Box, features: torch.Tensor) -> torch.Tensor:
    deviation = torch.maximum(box.upper - features, features - box.lower).clamp(min=0)
    return deviation.to(torch.float64).norm(dim=1)


def _identity_spec(graph: BoundGraph, batch: int, like: torch.Tensor) -> torch.Tensor:
    shape = graph.nodes[-1].shape
    numel = int(torch.tensor(shape).prod())
    eye = torch.eye(numel, dtype=like.dtype, device=like.device)
    return eye.reshape(1, numel, *shape).expand(batch, numel, *shape)


def jacobian_interval(
    graph: BoundGraph, boxes: list[Box], *, should_stop: StopCheck = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(C, R)` [batch, feature_dim, n_input] with |J - C| <= R for every Clarke Jacobian J of f on the set the
    boxes describe (see the module docstring)."""
    batch = boxes[0].lower.shape[0]
    center = _identity_spec(graph, batch, boxes[0].lower)
    pending: dict[int, list[torch.Tensor]] = {graph.output_index: [center, torch.zeros_like(center)]}
    for index in range(graph.output_index, 0, -1):
        if index not in pending:
            continue
        stop_if_asked(should_stop)
        node_center, node_radius = pending.pop(index)
        node = graph.nodes[index]
        pulled = node.op.jacobian_backward(node_center, node_radius, tuple(boxes[j] for j in node.inputs))
        for source, (c, r) in zip(node.inputs, pulled, strict=True):
            if source in pending:
                pending[source] = [pending[source][0] + c, pending[source][1] + r]
            else:
                pending[source] = [c, r]
    c, r = pending[0]
    return c.reshape(batch, c.shape[1], -1), r.reshape(batch, r.shape[1], -1)


def local_jacobian_norm(
    graph: BoundGraph, boxes: list[Box], *, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    should_stop: StopCheck = None,
) -> torch.Tensor:
    """Sound upper bound [batch] of ||J||_2 over every Clarke Jacobian J on the set the boxes describe."""
    c, r = jacobian_interval(graph, boxes, should_stop=should_stop)
    stop_if_asked(should_stop)
    split = matrix_norm_upper(c) + matrix_norm_upper(r)
    joint = matrix_norm_upper(c.abs() + r)
    bound = torch.minimum(split, joint)
    if midpoint_applies(graph) and bool((r > 0).any()):
        bound = torch.minimum(bound, midpoint_lipschitz_upper(graph, boxes, memory_budget_bytes=memory_budget_bytes,
                                                              should_stop=should_stop))
    return bound


def feature_distance_upper(
    graph: BoundGraph,
    images: torch.Tensor,
    radius: torch.Tensor,
    names: tuple[str, ...],
    *,
    lipschitz_upper: float | None = None,
    intermediate: str = "crown",
    spec_chunk: int = 1024,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    should_stop: StopCheck = None,
) -> dict[str, torch.Tensor]:
    """UB(x, r) [batch] float64 for each requested name in FEATURE_BOUNDS; `images` [batch, C, H, W], `radius`
    [batch] (l2). `lipschitz_upper` is required for "lipschitz". CROWN handles `spec_chunk` specification rows at
    a time; the local Lipschitz bound keeps its explicit matrices within `memory_budget_bytes`. Raises
    SearchCancelled once `should_stop()` is true (polled at the start and between layers; bounds.cancellation)."""
    unknown = set(names) - set(FEATURE_BOUNDS)
    if unknown:
        raise ValueError(f"unknown feature-distance bounds {sorted(unknown)}; valid: {FEATURE_BOUNDS}")
    stop_if_asked(should_stop)
    radius64 = radius.to(torch.float64)
    result: dict[str, torch.Tensor] = {}
    if "lipschitz" in names:
        if lipschitz_upper is None:
            raise ValueError("the 'lipschitz' bound needs lipschitz_upper")
        result["lipschitz"] = lipschitz_upper * radius64
    needs_propagation = [n for n in names if n != "lipschitz"]
    if not needs_propagation:
        return result
    dtype = graph.nodes[1].op.weight.dtype if hasattr(graph.nodes[1].op, "weight") else images.dtype
    images = images.to(dtype)
    batch = images.shape[0]
    features = graph.forward(images).reshape(batch, -1)
    ball = InputBall(images, radius.to(dtype), "l2")
    only_ibp = needs_propagation == ["ibp"]
    boxes = compute_bounds(graph, ball, intermediate="ibp" if only_ibp else intermediate, spec_chunk=spec_chunk,
                           should_stop=should_stop)
    if "ibp" in names:
        output = boxes[-1]
        result["ibp"] = _elementwise_to_l2(Box(output.lower.reshape(batch, -1), output.upper.reshape(batch, -1)),
                                           features)
    if "crown" in names or "crown_spectral" in names:
        spec = _identity_spec(graph, batch, images)
        linear = crown_backward(graph, boxes, graph.output_index, spec, spec, should_stop=should_stop)
        x0 = images.reshape(batch, -1)
        offset_lower = torch.einsum("bsn,bn->bs", linear.lA, x0) + linear.lbias - features
        offset_upper = torch.einsum("bsn,bn->bs", linear.uA, x0) + linear.ubias - features
        if "crown" in names:
            spread_lower = radius.to(dtype).unsqueeze(1) * linear.lA.norm(dim=-1)
            spread_upper = radius.to(dtype).unsqueeze(1) * linear.uA.norm(dim=-1)
            box = Box(offset_lower - spread_lower + features, offset_upper + spread_upper + features)
            result["crown"] = _elementwise_to_l2(box, features)
        if "crown_spectral" in names:
            slope_mid = (linear.uA.to(torch.float64) + linear.lA.to(torch.float64)) / 2
            slope_gap = (linear.uA.to(torch.float64) - linear.lA.to(torch.float64)) / 2
            offset_mid = (offset_upper.to(torch.float64) + offset_lower.to(torch.float64)) / 2
            offset_gap = (offset_upper.to(torch.float64) - offset_lower.to(torch.float64)) / 2
            result["crown_spectral"] = (
                (matrix_norm_upper(slope_mid) + matrix_norm_upper(slope_gap)) * radius64
                + offset_mid.norm(dim=1) + offset_gap.norm(dim=1)
            )
    if "local_lipschitz" in names:
        jacobian_norm = local_jacobian_norm(graph, boxes, memory_budget_bytes=memory_budget_bytes,
                                            should_stop=should_stop)
        result["local_lipschitz"] = jacobian_norm * radius64
    return result
