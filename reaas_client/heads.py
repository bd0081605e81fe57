"""Downstream heads h whose feature-space radius is exact or nearly so, and the loss that trains them.

Three head kinds (`HEAD_KINDS`, chosen by `TrainConfig.head`):

* "mlp": the paper's Linear/ReLU MLP with cross-entropy (reaas_client.downstream.build_mlp); CROWN bounds it.
* "linear": one Linear h(z) = W z + b. Its radius min_j (z_y - z_j) / ||w_y - w_j||_2 is exact.
* "lipschitz": a 1-Lipschitz body g = AOLLinear -> MaxMin -> ... (widths `TrainConfig.hidden`) and a free last
  Linear, h = W g + b; its radius min_j (z_y - z_j) / (||w_y - w_j||_2 · L_body) is sound (bounds'
  feature_certification) and leaves little to an attack.

Both margin heads train with the Lipschitz-margin loss (GloRo, Leino et al. 2021; AOL, Prach & Lampert 2022):
the logit of every j != y is raised by eps · ||w_y - w_j|| · L_body, the most a perturbation of norm eps can
raise z_j - z_y, and cross-entropy is taken of those offset logits at `temperature`. A head that classifies the
offset logits correctly has feature radius >= eps there. With eps = 0 and temperature 1 it is cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bounds.layers import MaxMin
from bounds.lipschitz_layers import AOLLinear, materialize

HEAD_KINDS: tuple[str, ...] = ("mlp", "linear", "lipschitz")
MARGIN_HEADS: tuple[str, ...] = ("linear", "lipschitz")


def lipschitz_margin_loss(logits: torch.Tensor, labels: torch.Tensor, last_weight: torch.Tensor, *,
                          margin: float, temperature: float = 1.0, body_lipschitz: float = 1.0) -> torch.Tensor:
    """temperature · CE(offset / temperature, y), offset_j = z_j + margin · ||w_y - w_j||_2 · body_lipschitz
    for j != y (offset_y = z_y). `logits` [batch, K], `labels` [batch], `last_weight` [K, width]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    spread = (last_weight[labels].unsqueeze(1) - last_weight.unsqueeze(0)).norm(dim=-1)  # [batch, K], 0 at y
    offset = logits + margin * body_lipschitz * spread
    return temperature * F.cross_entropy(offset / temperature, labels)


def build_lipschitz_body(feature_dim: int, hidden: tuple[int, ...]) -> nn.Sequential:
    """AOLLinear(d, w1) -> MaxMin -> AOLLinear(w1, w2) -> MaxMin ...: 1-Lipschitz for any weights (AOL
    rescaling, MaxMin permutes pairs). Widths must be even (MaxMin pairs the channels)."""
    if not hidden or any(w % 2 for w in hidden):
        raise ValueError(f"a lipschitz head needs even hidden widths, got {hidden}")
    layers: list[nn.Module] = []
    width = feature_dim
    for size in hidden:
        layers += [AOLLinear(width, size), MaxMin()]
        width = size
    return nn.Sequential(*layers)


def build_margin_head(kind: str, feature_dim: int, num_classes: int, hidden: tuple[int, ...]) -> nn.Sequential:
    """The trainable form of a margin head: Sequential(body..., Linear). Body empty for "linear"."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(feature_dim, num_classes))
    if kind == "lipschitz":
        body = build_lipschitz_body(feature_dim, hidden)
        return nn.Sequential(*body, nn.Linear(hidden[-1], num_classes))
    raise ValueError(f"unknown margin head {kind!r}; valid: {MARGIN_HEADS}")


def finalize_margin_head(model: nn.Sequential, mean: torch.Tensor) -> nn.Sequential:
    """The servable h(z) = model(z - mean): AOL layers materialised into plain Linears (the bounds vocabulary)
    and the centring folded into the first layer's bias, b' = b - W' mean. Centring moves no Lipschitz constant;
    the features are never rescaled, so the margin eps means feature-space units."""
    plain = materialize(model.cpu().eval())
    first = plain[0]
    with torch.no_grad():
        first.bias.sub_(first.weight @ mean.to(first.weight.dtype))
    return plain.eval()
