"""Certify a downstream classifier h in feature space: the largest l2 radius R_F around f(x) keeping h's label.

For the prediction y = argmax h(z), the margins m_j(z') = h_y(z') - h_j(z') (j != y) must stay > 0 on the ball
||z' - z||_2 < R. The certified radius is the larger of two sound radii:

* bound propagation: the margins are lower-bounded on the ball by CROWN (or IBP); R is certified when every lower
  bound is > 0. When h has no activation it is affine, CROWN is exact, and R_F = min_j m_j(z) / ||a_j||_2 (a_j the
  margin's gradient) in closed form. Otherwise the one batched binary search (bounds.search) runs upward from the
  larger of the Lipschitz-margin radius below and R_0 = min_j m_j(z) / (sqrt(2)·Lip(h)).
* the Lipschitz margin: write h(z) = W g(z) + b with g the body (h minus its last Linear) and L_body >= Lip(g)
  (bounds.global_lipschitz_upper). Then
  |m_j(z + d) - m_j(z)| = |(w_y - w_j)·(g(z + d) - g(z))| <= ||w_y - w_j||_2 · L_body · ||d||_2, so every margin
  stays > 0 for ||d||_2 < min_j m_j(z) / (||w_y - w_j||_2 · L_body). Exact for a linear h (g = id, L_body = 1),
  and what a head trained with the Lipschitz-margin loss (reaas_client.heads) maximises.

A max-affine h (nn.Linear then bounds.layers.ClassMax: the prototype heads) is certified exactly instead, whatever
the method (bounds.max_affine): its decision regions are polyhedra, so the radius is a least distance to them.

Activations are ReLU or MaxMin (the Lipschitz heads); the search starts where the Lipschitz margin left off, so
it only ever adds to it. Returned radii are the verified radius times (1 - SAFETY_MARGIN), which covers float32
rounding (~1e-6 relative) in the margin bounds.

Every margin must stay above a rounding allowance delta = ROUNDING_ALLOWANCE · (1 + max_j |h_j(z)|) rather than
above 0: the certificate is about exact arithmetic, but the client evaluates h (and the server f) in float32, whose
rounding (~1e-6 relative per layer) could turn an exact margin of 1e-7 into a tie or a flip; a float32 PGD found
exactly that before the allowance. The radii above become (m - delta) / ..., which costs nothing measurable at
the margins the heads are trained for.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from bounds.f2i import SAFETY_MARGIN
from bounds.graph import BoundGraph, build_graph
from bounds.layers import ClassMax, MaxMin, UnsupportedLayerError
from bounds.lipschitz import global_lipschitz_upper
from bounds.max_affine import max_affine_radius
from bounds.operators import MaxMinOperator
from bounds.propagation import InputBall, compute_bounds, concretize, crown_backward
from bounds.search import batched_binary_search

CERTIFY_METHODS = ("auto", "crown", "ibp", "margin")
# "margin": the Lipschitz-margin radius alone. "auto": that for heads whose activations are all MaxMin (the margin
# heads, trained to maximise exactly it: on PCA-64 digit features CROWN added 0.0002 to a mean radius of 2.52 at
# ~100x the time), the CROWN search for anything with a ReLU (the paper's MLP, whose margin radius is loose).
ROUNDING_ALLOWANCE = 1e-4


def rounding_allowance(logits: torch.Tensor) -> torch.Tensor:
    """delta [batch] float64 for `logits` [batch, K]: how far above 0 a certified margin must stay (module
    docstring)."""
    return ROUNDING_ALLOWANCE * (1 + logits.detach().to(torch.float64).abs().amax(dim=1).cpu())


@dataclass(frozen=True)
class FeatureCertificate:
    """`prediction` [batch] int64 (argmax of h), `feature_radius` [batch] float64 (certified l2 radius, 0 if none)."""

    prediction: torch.Tensor
    feature_radius: torch.Tensor


def _margin_spec(prediction: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """[batch, num_classes - 1, num_classes]: rows e_y - e_j for every j != y."""
    eye = torch.eye(num_classes, dtype=dtype, device=prediction.device)
    others = torch.stack([torch.cat([torch.arange(0, y), torch.arange(y + 1, num_classes)]) for y in prediction.cpu()])
    others = others.to(prediction.device)
    return eye[prediction].unsqueeze(1) - eye[others]  # [batch, K-1, K]


def _margin_lower_bounds(
    graph: BoundGraph, features: torch.Tensor, radius: torch.Tensor, spec: torch.Tensor, method: str
) -> torch.Tensor:
    """Sound lower bounds [batch, K-1] of the margins over the l2 balls of `radius` [batch]."""
    ball = InputBall(features, radius.to(features.dtype), "l2")
    boxes = compute_bounds(graph, ball, intermediate=method)
    if method == "ibp":
        out = boxes[-1]
        positive, negative = spec.clamp(min=0), spec.clamp(max=0)
        return torch.einsum("bsk,bk->bs", positive, out.lower) + torch.einsum("bsk,bk->bs", negative, out.upper)
    return concretize(ball, crown_backward(graph, boxes, graph.output_index, spec, spec)).lower


def split_last_linear(classifier: nn.Module) -> tuple[nn.Sequential, nn.Linear]:
    """(body g, last Linear) with h = last ∘ g; `classifier` is an nn.Sequential (or a single nn.Linear)."""
    layers = [classifier] if isinstance(classifier, nn.Linear) else list(classifier)
    if not layers or not isinstance(layers[-1], nn.Linear):
        raise UnsupportedLayerError(f"h must end in an nn.Linear, got {type(layers[-1]).__name__ if layers else None}")
    return nn.Sequential(*layers[:-1]), layers[-1]


def body_lipschitz_upper(body: nn.Sequential, feature_dim: int) -> float:
    """A sound upper bound of Lip(g) for the body g of h (1 for an empty body).

    Trailing activations are dropped first: ReLU and MaxMin are 1-Lipschitz, so Lip(act ∘ g') <= Lip(g'), and the
    midpoint expansion of g' need not treat them as unstable everywhere."""
    layers = list(body)
    while layers and isinstance(layers[-1], nn.ReLU | MaxMin | nn.Identity):
        layers.pop()
    body = nn.Sequential(*layers)
    if len(body) == 0:
        return 1.0
    return global_lipschitz_upper(body, (feature_dim,))


def lipschitz_margin_radius(classifier: nn.Module, features: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """min_j m_j(z) / (||w_y - w_j||_2 · L_body) per row of `features` [batch, feature_dim], y = `prediction`
    [batch], the margins less the rounding allowance; 0 where y is not h's argmax by more than that allowance.
    float64 [batch], before SAFETY_MARGIN (see the module docstring).

    The margins are recomputed in float64 on the CPU, so they carry no float32 rounding of their own."""
    body, last = split_last_linear(classifier)
    lipschitz = body_lipschitz_upper(body, features.shape[1])
    exact = copy.deepcopy(classifier).to("cpu", torch.float64)
    prediction = prediction.cpu().unsqueeze(1)
    with torch.no_grad():
        logits = exact(features.detach().to("cpu", torch.float64))
        weight = last.weight.detach().to("cpu", torch.float64)
        margins = logits.gather(1, prediction) - logits - rounding_allowance(logits).unsqueeze(1)  # [batch, K]
        spread = (weight[prediction.squeeze(1)].unsqueeze(1) - weight.unsqueeze(0)).norm(dim=-1)  # [batch, K]
        ratios = margins.clamp(min=0) / (spread * lipschitz).clamp(min=1e-300)
        ratios.scatter_(1, prediction, math.inf)
    return ratios.min(dim=1).values if logits.shape[1] > 1 else torch.full_like(logits[:, 0], math.inf)


def max_affine_parts(classifier: nn.Module) -> tuple[nn.Linear, int] | None:
    """(Linear, pieces per class) when `classifier` is Sequential(Linear, ClassMax), the max-affine form; else None."""
    layers = list(classifier) if isinstance(classifier, nn.Sequential) else []
    if len(layers) == 2 and isinstance(layers[0], nn.Linear) and isinstance(layers[1], ClassMax):
        return layers[0], layers[1].pieces
    return None


def certify_feature_radius(
    classifier: nn.Module,
    features: torch.Tensor,
    *,
    method: str = "auto",
    tolerance: float = 1e-4,
    max_steps: int = 40,
) -> FeatureCertificate:
    """Prediction and certified feature-space l2 radius for each row of `features` [batch, feature_dim].

    Guarantee: for every z' with ||z' - z||_2 < feature_radius, argmax h(z') = prediction (the larger of two sound
    radii, see the module docstring). `classifier` is a Sequential of Linear / ReLU / MaxMin ending in a Linear,
    or Linear then ClassMax (certified exactly by bounds.max_affine whatever the method); `method`: "crown" or
    "ibp" (bound propagation, searched upward from the margin radius), "margin" (the Lipschitz-margin radius
    alone) or "auto" (see CERTIFY_METHODS).
    """
    if method not in CERTIFY_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {CERTIFY_METHODS}")
    if features.dim() != 2:
        raise ValueError(f"features must be [batch, feature_dim], got {tuple(features.shape)}")
    device = next(classifier.parameters()).device
    max_affine = max_affine_parts(classifier)
    if max_affine is not None:
        with torch.no_grad():
            logits = classifier(features.to(device=device, dtype=torch.float32))
        prediction = logits.argmax(dim=1).cpu()
        radius = max_affine_radius(max_affine[0].weight, max_affine[0].bias, max_affine[1], features, prediction,
                                   rounding_allowance(logits))
        return FeatureCertificate(prediction, radius * (1 - SAFETY_MARGIN))
    graph = build_graph(classifier, (features.shape[1],), dtype=torch.float32, device=device)
    z = features.to(device=device, dtype=torch.float32)
    with torch.no_grad():
        logits = graph.forward(z)
        prediction = logits.argmax(dim=1)
        num_classes = logits.shape[1]
        batch = z.shape[0]
        if num_classes < 2 or batch == 0:
            radius = torch.full((batch,), math.inf if num_classes < 2 else 0.0, dtype=torch.float64)
            return FeatureCertificate(prediction.cpu(), radius)
        spec = _margin_spec(prediction, num_classes, z.dtype)
        zero = torch.zeros(batch, dtype=z.dtype, device=device)
        at_point = crown_backward(graph, compute_bounds(graph, InputBall(z, zero), intermediate="ibp"),
                                  graph.output_index, spec, spec)
        allowance = rounding_allowance(logits)
        margins = concretize(InputBall(z, zero), at_point).lower.to(torch.float64).cpu()  # [batch, K-1]
        margins = margins - allowance.unsqueeze(1)
        gradient_norm = at_point.lA.to(torch.float64).norm(dim=-1).cpu()
        linearised = (margins.clamp(min=0) / gradient_norm.clamp(min=1e-30)).min(dim=1).values
        if not any(node.op.is_activation for node in graph.nodes[1:]):
            return FeatureCertificate(prediction.cpu(), linearised * (1 - SAFETY_MARGIN))
        if method == "auto":
            only_maxmin = all(isinstance(node.op, MaxMinOperator) for node in graph.nodes[1:] if node.op.is_activation)
            method = "margin" if only_maxmin else "crown"
        if method == "margin":
            radius = lipschitz_margin_radius(classifier, features, prediction.cpu())
            return FeatureCertificate(prediction.cpu(), radius * (1 - SAFETY_MARGIN))
        lipschitz = global_lipschitz_upper(classifier, (features.shape[1],))
        smallest_margin = margins.clamp(min=0).min(dim=1).values
        closed_form = smallest_margin / (math.sqrt(2.0) * max(lipschitz, 1e-30))
        # both sound: the search only ever raises its verified lower end, so the result is their max or more
        lower = torch.maximum(closed_form, lipschitz_margin_radius(classifier, features, prediction.cpu()))

        def certify(radius: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            device_index = index.to(device)
            bounds = _margin_lower_bounds(graph, z[device_index], radius.to(device), spec[device_index], method)
            worst = bounds.min(dim=1).values.cpu().to(torch.float64) - allowance[index]
            # score 0 at the centre, 1 where the worst margin's lower bound reaches the allowance
            score = 1 - worst / smallest_margin[index].clamp(min=1e-30)
            return worst > 0, score

        radius, _ = batched_binary_search(
            certify, lower, torch.maximum(linearised, lower), tolerance=tolerance, max_steps=max_steps
        )
    return FeatureCertificate(prediction.cpu(), radius * (1 - SAFETY_MARGIN))
