"""Certify a downstream classifier h in feature space: the largest l2 radius R_F around f(x) keeping h's label.

For the prediction y = argmax h(z), the margins m_j(z') = h_y(z') - h_j(z') (j != y) are lower-bounded on the
ball ||z' - z||_2 <= R by CROWN (or IBP); R is certified when every lower bound is > 0. When h has no activation
(ReLU, MaxMin) it is affine, CROWN is exact, and R_F = min_j m_j(z) / ||a_j||_2 (a_j the margin's gradient) in closed form. Otherwise
the one batched binary search (bounds.search) runs from the sound closed-form start
R_0 = min_j m_j(z) / (sqrt(2)·Lip(h)). Returned radii are the verified radius times (1 - SAFETY_MARGIN), which
covers float32 rounding (~1e-6 relative) in the margin bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from bounds.f2i import SAFETY_MARGIN
from bounds.graph import BoundGraph, build_graph
from bounds.lipschitz import global_lipschitz_upper
from bounds.propagation import InputBall, compute_bounds, concretize, crown_backward
from bounds.search import batched_binary_search

CERTIFY_METHODS = ("crown", "ibp")


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


def certify_feature_radius(
    classifier: nn.Module,
    features: torch.Tensor,
    *,
    method: str = "crown",
    tolerance: float = 1e-4,
    max_steps: int = 40,
) -> FeatureCertificate:
    """Prediction and certified feature-space l2 radius for each row of `features` [batch, feature_dim].

    Guarantee: for every z' with ||z' - z||_2 < feature_radius, argmax h(z') = prediction (the sound lower bound
    of every margin is positive on that ball). `classifier` is a Sequential of Linear / ReLU / MaxMin (the bounds
    vocabulary).
    """
    if method not in CERTIFY_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {CERTIFY_METHODS}")
    if features.dim() != 2:
        raise ValueError(f"features must be [batch, feature_dim], got {tuple(features.shape)}")
    device = next(classifier.parameters()).device
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
        margins = concretize(InputBall(z, zero), at_point).lower.to(torch.float64).cpu()  # [batch, K-1]
        gradient_norm = at_point.lA.to(torch.float64).norm(dim=-1).cpu()
        linearised = (margins.clamp(min=0) / gradient_norm.clamp(min=1e-30)).min(dim=1).values
        if not any(node.op.is_activation for node in graph.nodes[1:]):
            return FeatureCertificate(prediction.cpu(), linearised * (1 - SAFETY_MARGIN))
        lipschitz = global_lipschitz_upper(classifier, (features.shape[1],))
        smallest_margin = margins.clamp(min=0).min(dim=1).values
        lower = smallest_margin / (math.sqrt(2.0) * max(lipschitz, 1e-30))

        def certify(radius: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            device_index = index.to(device)
            bounds = _margin_lower_bounds(graph, z[device_index], radius.to(device), spec[device_index], method)
            worst = bounds.min(dim=1).values.cpu().to(torch.float64)
            # score 0 at the centre, 1 where the worst margin's lower bound reaches 0
            score = 1 - worst / smallest_margin[index].clamp(min=1e-30)
            return worst > 0, score

        radius, _ = batched_binary_search(
            certify, lower, torch.maximum(linearised, lower), tolerance=tolerance, max_steps=max_steps
        )
    return FeatureCertificate(prediction.cpu(), radius * (1 - SAFETY_MARGIN))
