"""A local Lipschitz bound for chains (ReLU and MaxMin) by expanding every activation around its midpoint Jacobian.

On the ball, every Clarke Jacobian of a chain f = T_L ∘ relu ∘ T_{L-1} ∘ ... ∘ relu ∘ T_1 (T_k affine) is
J = T_L D_{L-1} T_{L-1} ... D_1 T_1 with D_k diagonal: 1 on stably active, 0 on stably inactive and some value in
[0, 1] on unstable neurons (set U_k). Write D_k = M_k + E_k with M_k the midpoint (1, 0, 1/2) and |E_k| <= 1/2
supported on U_k (E_k = P_k E_k P_k, P_k the projector on U_k). Expanding the product over which layers take
E_k and bounding each term by the triangle inequality and submultiplicativity gives, with
Seg(a..b) = T_b M_{b-1} T_{b-1} ... M_{a} T_a (all midpoints, a fixed matrix) and N(s, j) = ||P_j Seg(s+1..j) P_s||
(P_0 = P_L = I),

    F(j) = N(0, j) + 1/2 · sum_{s=1}^{j-1} N(s, j) · F(s),      ||J||_2 <= F(L)

(the terms whose last E sits at layer s are exactly P_j Seg(s+1..j) E_s [P_s·(the rest)], and the rest expands
into the terms counted by F(s)). With no unstable neuron F(L) = ||Seg(1..L)|| = ||J||_2, exact; with every
neuron unstable it is the Combettes–Pesquet-style bound with slopes 1/2 ± 1/2. Each N(s, j) is a spectral norm of
an explicit matrix obtained by one backward pass from layer j.

MaxMin: per pair every Clarke Jacobian is J_pair = 1/2·[[1, 1], [1, 1]] + (2t - 1)·v vᵀ, v = (1, -1)/sqrt(2),
|2t - 1| <= 1; stable pairs are the exact identity (t = 1) or swap (t = 0). So M_k is that midpoint (norm 1) and
E_k = P_k Ẽ_k P_k with P_k the projector on the v of the unstable pairs and ||Ẽ_k|| <= 1: the same recursion with
factor 1 instead of 1/2 (`expansion_factor` of each activation operator) and P_k onto those directions. Here M and
E act on orthogonal subspaces, so the triangle inequality can lose up to 2x per layer: with every pair unstable the
expansion is looser than the layer product (which global_lipschitz_upper keeps), and it earns its place locally,
where most pairs are stable. That norm is exact (float64 Gram eigenvalue) unless that costs more
than EXACT_NORM_COST, otherwise the smaller of the Frobenius norm and sqrt(||A||_1·||A||_inf), both sound upper
bounds of ||A||_2 but loose ones: on the demo encoder exact norms halve the bound (0.58 -> 0.29 per unit radius at
r = 0.25) for about twice the time, on the CIFAR-sized bench encoder they cut it 3.8x.
"""

from __future__ import annotations

import torch

from bounds.cancellation import StopCheck, stop_if_asked
from bounds.graph import BoundGraph
from bounds.operators import AddOperator, AffineOperator, Box
from bounds.spectral import SPECTRAL_SAFETY, matrix_norm_upper, operator_norm_upper

# min(m, n)^2 · max(m, n) per image up to which N(s, j) is computed exactly (2e10: ~1 s per image on one CPU core;
# the demo and CIFAR-sized encoders stay below it at every radius the benchmark probes)
EXACT_NORM_COST = 20_000_000_000
DEFAULT_MEMORY_BUDGET_BYTES = 1 << 30


def is_chain(graph: BoundGraph) -> bool:
    return not any(isinstance(node.op, AddOperator) for node in graph.nodes[1:])


def midpoint_applies(graph: BoundGraph) -> bool:
    """Whether the midpoint expansion covers `graph`: a chain (no residual add) of affine layers and activations."""
    return is_chain(graph)


def spectral_upper(matrix: torch.Tensor) -> torch.Tensor:
    """Sound upper bound [batch] of ||A||_2 for `matrix` [batch, m, n]."""
    matrix = matrix.to(torch.float64)
    small, large = sorted(matrix.shape[1:])
    if small * small * large <= EXACT_NORM_COST:
        return matrix_norm_upper(matrix)
    frobenius = matrix.flatten(1).norm(dim=1)
    absolute = matrix.abs()
    holder = torch.sqrt(absolute.sum(dim=1).max(dim=1).values * absolute.sum(dim=2).max(dim=1).values)
    return torch.minimum(frobenius, holder) * (1.0 + SPECTRAL_SAFETY)


def _affine_norms(graph: BoundGraph) -> dict[int, float]:
    """Sound spectral-norm upper bound of every affine node (cached on the graph: weights never change)."""
    cached = getattr(graph, "_affine_norms", None)
    if cached is None:
        cached = {i: operator_norm_upper(node.op) for i, node in enumerate(graph.nodes)
                  if isinstance(node.op, AffineOperator)}
        graph._affine_norms = cached
    return cached


def midpoint_lipschitz_upper(
    graph: BoundGraph, boxes: list[Box], *, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    should_stop: StopCheck = None,
) -> torch.Tensor:
    """Sound upper bound [batch] of ||J||_2 over the Clarke Jacobians on the set the boxes describe (chains only).

    Images are processed in groups small enough that every explicit matrix fits `memory_budget_bytes` whole; only
    when one image's matrices do not fit are their rows split into blocks A_i, with ||A||_2 <= sqrt(sum ||A_i||^2)
    (sound, but up to sqrt(#blocks) looser, which is why whole matrices come first). `should_stop` is polled
    before each layer of every backward pass (bounds.cancellation).
    """
    activations = [i for i, node in enumerate(graph.nodes) if i > 0 and node.op.is_activation]
    batch = boxes[0].lower.shape[0]
    rows = max([int(torch.tensor(graph.nodes[-1].shape).prod())]
               + [int(graph.nodes[i].op.midpoint(boxes[graph.nodes[i].inputs[0]])[1].any(dim=0).sum())
                  for i in activations])
    # per row of an explicit matrix: the float32 backward state and its temporaries, plus float64 copies for norms
    row_bytes = graph.max_numel() * (4 * boxes[0].lower.element_size() + 2 * 8)
    group = max(1, min(batch, memory_budget_bytes // max(1, rows * row_bytes)))
    row_chunk = max(1, memory_budget_bytes // (group * row_bytes))
    return torch.cat([
        _midpoint_group(graph, [Box(b.lower[start:start + group], b.upper[start:start + group]) for b in boxes],
                        row_chunk, should_stop)
        for start in range(0, batch, group)
    ])


def _midpoint_group(graph: BoundGraph, boxes: list[Box], spec_chunk: int, should_stop: StopCheck) -> torch.Tensor:
    activations = [i for i, node in enumerate(graph.nodes) if i > 0 and node.op.is_activation]
    batch = boxes[0].lower.shape[0]
    device, dtype = boxes[0].lower.device, boxes[0].lower.dtype
    norms = _affine_norms(graph)
    midpoint, unstable, midpoint_norm = {}, {}, {}
    for i in activations:
        op = graph.nodes[i].op
        midpoint[i], unstable[i] = op.midpoint(boxes[graph.nodes[i].inputs[0]])
        midpoint_norm[i] = op.midpoint_norm(midpoint[i])
    totals: dict[int | None, torch.Tensor] = {}
    # rows from every activation's unstable directions, then (top None) from the output, whose node may itself be
    # an activation: then its own E enters with N = ||P|| = 1 and F = the total of its rows
    for top in [*activations, None]:
        if top is None:
            start = graph.output_index
            rows = torch.arange(int(torch.tensor(graph.nodes[start].shape).prod()), device=device)
            row_mask = torch.ones(batch, rows.numel(), dtype=torch.bool, device=device)
        else:
            start = graph.nodes[top].inputs[0]  # Seg(..j) ends at activation j's input
            rows = unstable[top].any(dim=0).nonzero().squeeze(1)
            row_mask = unstable[top][:, rows]
        if rows.numel() == 0:
            totals[top] = torch.zeros(batch, dtype=torch.float64, device=device)
            continue
        squared: dict[int, torch.Tensor] = {}  # sum over row chunks of N(s, top)^2, per activation s (0: the input)
        products: dict[int, torch.Tensor] = {}  # layer-norm bound of ||Seg(s+1..top)||
        directions = rows.numel() if top is None else unstable[top].shape[1]
        for first in range(0, rows.numel(), spec_chunk):
            chunk, mask = rows[first:first + spec_chunk], row_mask[:, first:first + spec_chunk]
            a = torch.zeros(batch, chunk.numel(), directions, dtype=dtype, device=device)
            a[:, torch.arange(chunk.numel(), device=device), chunk] = mask.to(dtype)
            if top is not None:
                a = graph.nodes[top].op.from_directions(a)  # the rows of P_j: its unstable directions
            product = torch.ones(batch, dtype=torch.float64, device=device)
            index = start
            while index > 0:
                stop_if_asked(should_stop)
                node = graph.nodes[index]
                if node.op.is_activation:
                    columns = unstable[index]
                    if bool(columns.any()):
                        cols = columns.any(dim=0).nonzero().squeeze(1)
                        restricted = node.op.to_directions(a)[:, :, cols] * columns[:, cols].unsqueeze(1).to(dtype)
                        squared[index] = squared.get(index, 0.0) + spectral_upper(restricted) ** 2
                        products[index] = product
                    a = node.op.midpoint_vjp(a, midpoint[index])
                    product = product * midpoint_norm[index]
                elif isinstance(node.op, AffineOperator):
                    a = node.op.vjp(a.reshape(-1, *node.op.out_shape)).reshape(batch, chunk.numel(), -1)
                    product = product * norms[index]
                else:
                    raise TypeError(f"midpoint expansion needs a chain, found {type(node.op).__name__}")
                index = node.inputs[0]
            stop_if_asked(should_stop)
            squared[0] = squared.get(0, 0.0) + spectral_upper(a) ** 2
            products[0] = product
        total = torch.minimum(squared.pop(0).sqrt(), products[0])
        for s, value in squared.items():
            factor = graph.nodes[s].op.expansion_factor
            total = total + factor * torch.minimum(value.sqrt(), products[s]) * totals[s]
        totals[top] = total
    return totals[None]


def global_midpoint_upper(graph: BoundGraph, *, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES) -> float:
    """Sound global Lipschitz upper bound of a chain: the midpoint expansion with every ReLU unstable.

    Slopes anywhere in [0, 1] on every neuron cover every Clarke Jacobian of f at every input, so by Lebourg's mean
    value theorem ||f(x) - f(y)|| <= F(L)·||x - y|| for all x, y. The expansion keeps the signs that the product
    of layer norms throws away (on the demo encoder 0.21 against 0.93).
    """
    if not midpoint_applies(graph):
        raise ValueError("the midpoint expansion needs a chain (no residual add)")
    weight = next(node.op.weight for node in graph.nodes[1:] if hasattr(node.op, "weight"))
    everywhere = [Box(torch.full((1, *node.shape), -1.0, dtype=weight.dtype, device=weight.device),
                      torch.full((1, *node.shape), 1.0, dtype=weight.dtype, device=weight.device))
                  for node in graph.nodes]
    return float(midpoint_lipschitz_upper(graph, everywhere, memory_budget_bytes=memory_budget_bytes)[0])
