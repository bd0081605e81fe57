"""How far could a Lipschitz bound that knows the MaxMin body's structure lift a margin head's certificate?

The margin certificate divides each class margin m_j(z) = h_y(z) - h_j(z) by ||w_y - w_j|| * Lip(body). The gradient
of m_j is g(s) = W_1^T D_1(s_1) W_2^T ... D_{k-1}(s_{k-1}) (w_y - w_j), D_l(s_l) MaxMin's Jacobian: on each channel
pair, identity (s = +1) or swap (s = -1). A global bound that holds for every pattern s (a finer product bound, an
SDP, any relaxation of the swaps) can be no smaller than max_s ||g(s)||. Sign ascent finds large ||g(s)||, so its
value is a lower bound on that maximum, and min_j m_j / (that value) an upper bound, a *ceiling*, on the radius any
pattern-blind Lipschitz certificate can give an input. A ceiling close to the certificate says no such bound is worth
building: a tighter certificate would have to follow the patterns the ball actually reaches (exact verification).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from bounds import MaxMin


def _weights(h: nn.Sequential) -> list[torch.Tensor]:
    """The float64 weights of h = Linear (MaxMin Linear)*, the margin heads' form."""
    layers = list(h)
    if (len(layers) % 2 == 0 or not all(isinstance(m, nn.Linear) for m in layers[0::2])
            or not all(isinstance(m, MaxMin) for m in layers[1::2])):
        raise ValueError("expected h = Linear, MaxMin, Linear, ..., Linear")
    return [m.weight.detach().to("cpu", torch.float64) for m in layers[0::2]]


def _swap(values: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """D(signs) applied along the last dimension (D is symmetric, so also `values @ D`): pair k (channels k and
    k + half) kept where signs[k] > 0, swapped where not."""
    a, b = values.chunk(2, dim=-1)
    keep = signs > 0
    return torch.cat([torch.where(keep, a, b), torch.where(keep, b, a)], dim=-1)


def pattern_gradient(weights: list[torch.Tensor], signs: list[torch.Tensor], direction: torch.Tensor) -> torch.Tensor:
    """g(s) for the MaxMin patterns `signs` (one per MaxMin, half its width) and `direction` = w_y - w_j."""
    g = direction
    for weight, pattern in zip(reversed(weights[:-1]), reversed(signs), strict=True):
        g = weight.T @ _swap(g, pattern)
    return g


def patterns_at(h: nn.Sequential, features: torch.Tensor) -> list[list[torch.Tensor]]:
    """The MaxMin patterns of h at each row of `features`: where its gradients actually are."""
    x = features.detach().to("cpu", torch.float64)
    per_layer = []
    with torch.no_grad():
        for module in copy.deepcopy(h).to("cpu", torch.float64)[:-1]:
            if isinstance(module, MaxMin):
                a, b = x.chunk(2, dim=1)
                per_layer.append(torch.where(a >= b, 1.0, -1.0).double())
            x = module(x)
    return [[layer[row] for layer in per_layer] for row in range(features.shape[0])]


def _ascend(weights: list[torch.Tensor], signs: list[torch.Tensor], direction: torch.Tensor) -> float:
    """Sign ascent from `signs`: per MaxMin layer l, g = sum_k (keep_k or swap_k), each pair's contribution kept or
    swapped; set each s_k to the one with the larger inner product with the current g. Each step can only raise
    ||g|| (<g', g> >= ||g||^2); sweeps until no sign changes."""
    signs = [s.clone() for s in signs]
    for _ in range(100):
        changed = False
        for layer in range(len(signs)):
            # the vector arriving at MaxMin `layer` from above, and the linear map below it (input_dim x width)
            above = direction
            for weight, pattern in zip(reversed(weights[layer + 1:-1]), reversed(signs[layer + 1:]), strict=True):
                above = weight.T @ _swap(above, pattern)
            below = weights[0].T
            for weight, pattern in zip(weights[1:layer + 1], signs[:layer], strict=True):
                below = _swap(below, pattern) @ weight.T
            half = above.shape[0] // 2
            low_a, low_b = below[:, :half], below[:, half:]
            keep = low_a * above[:half] + low_b * above[half:]  # [input_dim, half]: pair k kept
            swap = low_a * above[half:] + low_b * above[:half]  # pair k swapped
            g = torch.where(signs[layer] > 0, keep, swap).sum(dim=1)
            better = torch.where(((keep - swap) * g[:, None]).sum(dim=0) >= 0, 1.0, -1.0).double()
            if not torch.equal(better, signs[layer]):
                signs[layer], changed = better, True
        if not changed:
            break
    return float(pattern_gradient(weights, signs, direction).norm())


def largest_pattern_gradients(h: nn.Sequential, starts: list[list[torch.Tensor]], random_starts: int = 8,
                              seed: int = 0) -> torch.Tensor:
    """[K, K]: for each class pair, the largest ||g(s)|| sign ascent reaches from `starts` (patterns where h was
    evaluated) and `random_starts` random patterns; a lower bound on max_s ||g(s)||, symmetric, 0 on the diagonal."""
    weights = _weights(h)
    generator = torch.Generator().manual_seed(seed)
    widths = [w.shape[0] // 2 for w in weights[:-1]]
    seeds = [*starts, *([torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1 for n in widths]
                        for _ in range(random_starts))]
    last = weights[-1]
    classes = last.shape[0]
    largest = torch.zeros(classes, classes, dtype=torch.float64)
    for y in range(classes):
        for j in range(y + 1, classes):
            direction = last[y] - last[j]
            largest[y, j] = largest[j, y] = max(_ascend(weights, s, direction) for s in seeds)
    return largest


def ceiling_radius(h: nn.Sequential, features: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
    """min_j m_j(z) / largest[y, j] per row (y = h's prediction): no pattern-blind Lipschitz certificate can give
    more (margins in float64, no rounding allowance: the ceiling is optimistic by design)."""
    with torch.no_grad():
        logits = copy.deepcopy(h).to("cpu", torch.float64)(features.detach().to("cpu", torch.float64))
    prediction = logits.argmax(dim=1)
    margins = logits.gather(1, prediction[:, None]) - logits
    ratios = margins / largest[prediction].clamp(min=1e-300)
    ratios.scatter_(1, prediction[:, None], torch.inf)
    return ratios.min(dim=1).values
