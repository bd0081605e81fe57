"""Lower bounds of sup ||J(D)||_2 over independent ReLU slopes: what no Jacobian-relaxation bound may undercut.

`local_lipschitz` and the global midpoint bound (bounds.midpoint_lipschitz) bound ||J||_2 over every
J(D) = W_L D_{L-1} ... D_1 W_1 with diagonal slopes D_k fixed (0 / 1) on stable neurons and anywhere in [0, 1],
independently, on unstable ones. `slope_ascent_lower` finds an admissible D and a unit v with ||J(D)·v|| large by
alternating ascent: power steps for the singular vectors, then for each layer the best 0/1 slope of every
unstable neuron given the others (u·J(D)·v is linear in each D_k). Every value it returns is attained, so it is a
lower bound of that supremum: a test that the sound bounds stay above it, and a measure of how much any bound
of that family could still gain (benchmarks/jacobian_limit.py).
"""

from __future__ import annotations

import torch

from bounds.graph import BoundGraph
from bounds.operators import AddOperator, AffineOperator, Box, ReLUOperator


def slope_sets(graph: BoundGraph, boxes: list[Box]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """relu node -> (fixed slope on stable neurons, mask of unstable neurons), each [batch, *shape]."""
    sets = {}
    for index, node in enumerate(graph.nodes):
        if isinstance(node.op, ReLUOperator):
            box = boxes[node.inputs[0]]
            unstable = box.crosses_zero
            sets[index] = ((box.lower >= 0).to(box.lower.dtype), unstable)
    return sets


def _jvp(graph: BoundGraph, slopes: dict[int, torch.Tensor], v: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every node's value of J(D)·v (biases dropped), the forward signal at each relu's input included."""
    values = {0: v}
    for index in range(1, len(graph.nodes)):
        node = graph.nodes[index]
        inputs = [values[i] for i in node.inputs]
        if isinstance(node.op, ReLUOperator):
            values[index] = inputs[0] * slopes[index]
        elif isinstance(node.op, AffineOperator):
            values[index] = node.op.linear(inputs[0])
        elif isinstance(node.op, AddOperator):
            values[index] = inputs[0] + inputs[1]
        else:
            raise TypeError(f"no linear map for {type(node.op).__name__}")
    return values


def _vjp(graph: BoundGraph, slopes: dict[int, torch.Tensor], u: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every node's cotangent of u·J(D) (the backward signal at each relu's output included)."""
    grads = {graph.output_index: u}
    for index in range(graph.output_index, 0, -1):
        node = graph.nodes[index]
        if index not in grads:
            continue
        grad = grads[index]
        if isinstance(node.op, ReLUOperator):
            pulled = [grad * slopes[index]]
        elif isinstance(node.op, AffineOperator):
            pulled = [node.op.vjp(grad)]
        else:
            pulled = [grad, grad]
        for source, g in zip(node.inputs, pulled, strict=True):
            grads[source] = grads[source] + g if source in grads else g
    return grads


def slope_ascent_lower(graph: BoundGraph, images: torch.Tensor, boxes: list[Box], *, restarts: int = 4,
                iterations: int = 40, seed: int = 0) -> torch.Tensor:
    """Lower bound [batch] of sup ||J(D)||_2 over independent slopes (see the module docstring): every value is
    ||J(D)·v|| for an actual admissible D and unit v. The first restart starts from the slopes at the images
    themselves (admissible: the images lie in their balls), the others from random 0/1 slopes."""
    sets = slope_sets(graph, boxes)
    batch = boxes[0].lower.shape[0]
    generator = torch.Generator().manual_seed(seed)
    device = boxes[0].lower.device  # the draws come from the CPU generator (the same on every device), then move
    best = torch.zeros(batch, dtype=torch.float64, device=device)
    view = (batch,) + (1,) * len(graph.input_shape)
    values = graph.forward_all(images)
    at_images = {i: (values[graph.nodes[i].inputs[0]] > 0).to(f.dtype) for i, (f, _) in sets.items()}
    for restart in range(restarts):
        slopes = {i: torch.where(u, at_images[i] if restart == 0 else
                                 torch.randint(0, 2, u.shape, generator=generator).to(device, f.dtype), f)
                  for i, (f, u) in sets.items()}
        v = torch.randn(batch, *graph.input_shape, generator=generator).to(device, boxes[0].lower.dtype)
        for _ in range(iterations):
            v = v / v.reshape(batch, -1).norm(dim=1).clamp(min=1e-30).reshape(view)
            forward = _jvp(graph, slopes, v)
            out = forward[graph.output_index].reshape(batch, -1)
            best = torch.maximum(best, out.norm(dim=1).to(torch.float64))
            u = (out / out.norm(dim=1, keepdim=True).clamp(min=1e-30)).reshape(forward[graph.output_index].shape)
            backward = _vjp(graph, slopes, u)
            # u·J(D)·v is linear in each D_k: the best 0/1 slope of an unstable neuron is 1 iff its forward signal
            # times its backward signal is positive (one layer at a time keeps the update an ascent)
            for index, (fixed, unstable) in sets.items():
                gain = forward[graph.nodes[index].inputs[0]] * backward[index]
                slopes[index] = torch.where(unstable, (gain > 0).to(fixed.dtype), fixed)
                forward = _jvp(graph, slopes, v)
                backward = _vjp(graph, slopes, u)
            v = backward[0]
        v = v / v.reshape(batch, -1).norm(dim=1).clamp(min=1e-30).reshape(view)
        best = torch.maximum(best, _jvp(graph, slopes, v)[graph.output_index].reshape(batch, -1).norm(dim=1)
                             .to(torch.float64))
    return best
