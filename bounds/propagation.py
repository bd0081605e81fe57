"""Bound propagation over a BoundGraph for l2 / linf input balls, batched: IBP and CROWN.

* IBP pushes elementwise boxes forward. The first affine layer after the input is bounded exactly for the ball
  (centre ± radius·dual-norm of each row), not through the box that contains the ball.
* CROWN (Zhang et al. 2018) propagates linear coefficients backward from a node to the input through each
  operator's `backward` (ReLU: CROWN's relaxation with adaptive lower slopes; MaxMin: the same relaxation of
  relu(a - b)), then concretises them on the ball
  with the dual norm (l2 -> l2, linf -> l1). Both directions hold for every input in the ball, given sound
  intermediate bounds at every activation input.
* Intermediate bounds (`intermediate="crown"`): each activation (ReLU, MaxMin) input node is first bounded by IBP;
  the neurons that IBP leaves unstable (for MaxMin: both members of a pair whose order is not fixed) are then
  re-bounded by CROWN (in chunks of `spec_chunk` neurons) and the two boxes intersected.
  Both are sound, so the intersection is. `intermediate="ibp"` skips the refinement (cheap, looser).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bounds.cancellation import StopCheck, stop_if_asked
from bounds.graph import BoundGraph
from bounds.operators import AffineOperator, Box, Operator

NORMS = ("l2", "linf")
INTERMEDIATE_METHODS = ("crown", "ibp")


@dataclass(frozen=True)
class InputBall:
    """The input set `{x : ||x - center[b]||_norm <= radius[b]}`; `center` [batch, *shape], `radius` [batch]."""

    center: torch.Tensor
    radius: torch.Tensor
    norm: str = "l2"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; valid: {NORMS}")

    def box(self) -> Box:
        """The smallest box containing the ball (the l2 ball lies inside the linf ball of the same radius)."""
        spread = self.radius.reshape((-1,) + (1,) * (self.center.dim() - 1))
        return Box(self.center - spread, self.center + spread)


@dataclass(frozen=True)
class LinearBounds:
    """`lA·x + lbias <= spec·node(x) <= uA·x + ubias` for x in the ball; A [batch, spec, n_input], bias [batch, spec]."""

    lA: torch.Tensor
    uA: torch.Tensor
    lbias: torch.Tensor
    ubias: torch.Tensor


def _dual_norm(a: torch.Tensor, norm: str) -> torch.Tensor:
    return a.norm(p=2, dim=-1) if norm == "l2" else a.abs().sum(dim=-1)


def concretize(ball: InputBall, bounds: LinearBounds) -> Box:
    """Elementwise `[lower, upper]` [batch, spec] of the linear bounds over the ball (exact for linear functions)."""
    x0 = ball.center.reshape(ball.center.shape[0], -1)
    radius = ball.radius.to(x0.dtype).unsqueeze(1)
    lower = torch.einsum("bsn,bn->bs", bounds.lA, x0) + bounds.lbias - radius * _dual_norm(bounds.lA, ball.norm)
    upper = torch.einsum("bsn,bn->bs", bounds.uA, x0) + bounds.ubias + radius * _dual_norm(bounds.uA, ball.norm)
    return Box(lower, upper)


def crown_backward(
    graph: BoundGraph, boxes: list[Box], target: int, lA: torch.Tensor | None, uA: torch.Tensor | None,
    *, should_stop: StopCheck = None,
) -> LinearBounds:
    """Back-substitute the coefficients `lA`, `uA` [batch, spec, *shape(target)] down to the input.

    `boxes` must hold sound bounds for every activation input below `target`. `should_stop` is polled before each
    layer's backward step (bounds.cancellation).
    """
    pending: dict[int, list] = {target: [lA, uA]}
    lbias: torch.Tensor | float = 0.0
    ubias: torch.Tensor | float = 0.0
    for index in range(target, 0, -1):
        if index not in pending:
            continue
        stop_if_asked(should_stop)
        node_lA, node_uA = pending.pop(index)
        node = graph.nodes[index]
        coefficients, node_lbias, node_ubias = node.op.backward(
            node_lA, node_uA, tuple(boxes[j] for j in node.inputs)
        )
        lbias = lbias + node_lbias
        ubias = ubias + node_ubias
        for source, (source_lA, source_uA) in zip(node.inputs, coefficients, strict=True):
            if source in pending:
                previous = pending[source]
                previous[0] = None if source_lA is None else previous[0] + source_lA
                previous[1] = None if source_uA is None else previous[1] + source_uA
            else:
                pending[source] = [source_lA, source_uA]
    input_lA, input_uA = pending[0]
    reference = input_lA if input_lA is not None else input_uA
    batch, spec = reference.shape[:2]

    def flat(a):
        return torch.zeros(batch, spec, 1, dtype=reference.dtype, device=reference.device) if a is None else (
            a.reshape(batch, spec, -1))

    def as_bias(b):
        if isinstance(b, float):
            return torch.full((batch, spec), b, dtype=reference.dtype, device=reference.device)
        return b

    return LinearBounds(flat(input_lA), flat(input_uA), as_bias(lbias), as_bias(ubias))


def crown_bounds_of(
    graph: BoundGraph, boxes: list[Box], ball: InputBall, target: int, spec: torch.Tensor,
    *, should_stop: StopCheck = None,
) -> tuple[Box, LinearBounds]:
    """CROWN bounds of `spec·node(x)` with `spec` [batch, s, *shape(target)]: the box [batch, s] and the linear form."""
    linear = crown_backward(graph, boxes, target, spec, spec, should_stop=should_stop)
    return concretize(ball, linear), linear


def _refine_with_crown(
    graph: BoundGraph, boxes: list[Box], ball: InputBall, target: int, spec_chunk: int, activations: list[Operator],
    should_stop: StopCheck,
) -> Box:
    box = boxes[target]
    batch = box.lower.shape[0]
    lower = box.lower.reshape(batch, -1).clone()
    upper = box.upper.reshape(batch, -1).clone()
    unstable = torch.stack([op.unstable_inputs(box).reshape(batch, -1) for op in activations]).any(dim=0)
    unstable = unstable.any(dim=0).nonzero().squeeze(1)
    numel = lower.shape[1]
    for start in range(0, unstable.numel(), spec_chunk):
        neurons = unstable[start:start + spec_chunk]
        spec = torch.zeros(batch, neurons.numel(), numel, dtype=lower.dtype, device=lower.device)
        spec[:, torch.arange(neurons.numel(), device=lower.device), neurons] = 1.0
        refined, _ = crown_bounds_of(graph, boxes, ball, target, spec.reshape(batch, -1, *graph.nodes[target].shape),
                                     should_stop=should_stop)
        lower[:, neurons] = torch.maximum(lower[:, neurons], refined.lower)
        upper[:, neurons] = torch.minimum(upper[:, neurons], refined.upper)
    shape = box.lower.shape
    return Box(lower.reshape(shape), upper.reshape(shape))


def compute_bounds(
    graph: BoundGraph, ball: InputBall, *, intermediate: str = "crown", spec_chunk: int = 1024,
    should_stop: StopCheck = None,
) -> list[Box]:
    """Sound elementwise bounds [batch, *shape] of every node over the ball (IBP forward, CROWN-refined at
    activation inputs when `intermediate == "crown"`). `should_stop` is polled before each CROWN refinement and
    inside it (bounds.cancellation); IBP steps are too cheap to need it."""
    if intermediate not in INTERMEDIATE_METHODS:
        raise ValueError(f"unknown intermediate method {intermediate!r}; valid: {INTERMEDIATE_METHODS}")
    activation_inputs: dict[int, list[Operator]] = {}
    for node in graph.nodes[1:]:
        if node.op.is_activation:
            activation_inputs.setdefault(node.inputs[0], []).append(node.op)
    boxes: list[Box] = [ball.box()]
    ball_centers: dict[int, torch.Tensor] = {0: ball.center}  # nodes whose value set is the (reshaped) ball
    exact: set[int] = set()
    for index, node in enumerate(graph.nodes[1:], start=1):
        op, sources = node.op, node.inputs
        if isinstance(op, AffineOperator) and op.is_permutation and sources[0] in ball_centers:
            ball_centers[index] = op.forward(ball_centers[sources[0]])
            boxes.append(op.interval(boxes[sources[0]]))
        elif isinstance(op, AffineOperator) and sources[0] in ball_centers:
            boxes.append(op.ball_interval(ball_centers[sources[0]], ball.radius.to(ball.center.dtype), ball.norm))
            exact.add(index)
        else:
            boxes.append(op.interval(*(boxes[j] for j in sources)))
        if intermediate == "crown" and index in activation_inputs and index not in exact:
            boxes[index] = _refine_with_crown(graph, boxes, ball, index, spec_chunk, activation_inputs[index],
                                              should_stop)
    return boxes
