"""Downstream heads h whose feature-space radius is exact or nearly so, and the loss that trains them.

Three head kinds (`HEAD_KINDS`, chosen by `TrainConfig.head`):

* "mlp": the paper's Linear/ReLU MLP with cross-entropy (reaas_client.downstream.build_mlp); CROWN bounds it.
* "linear": one Linear h(z) = W z + b. Its radius min_j (z_y - z_j) / ||w_y - w_j||_2 is exact.
* "lipschitz": a 1-Lipschitz body g = AOLLinear -> MaxMin -> ... (widths `TrainConfig.hidden`) and a free last
  Linear, h = W g + b; its radius min_j (z_y - z_j) / (||w_y - w_j||_2 · L_body) is sound (bounds'
  feature_certification).
* "orthogonal": the same shape with orthogonal Linears (torch's Cayley parametrisation: orthonormal columns, or
  rows where a layer narrows) instead of AOL ones. Both are 1-Lipschitz for any parameters, but AOL's rescaling
  leaves most singular values below 1 where orthogonal layers keep every one at 1. Measured on PCA-64 digits
  (issue 21, benchmarks/results/heads.md): at widths 512-512 the orthogonal head is more accurate at a larger ACR,
  and both certify about 0.88 of the end-to-end PGD radius; a square 64-64-64 orthogonal body (an isometry
  wherever MaxMin is differentiable) certifies 0.99 of it, but is less accurate. What loosens the wide bodies is
  the 64 -> 512 embedding: w_y - w_j has components outside the body's 64-dimensional local range, which the
  radius's ||w_y - w_j|| still counts.

Both margin heads train with a Lipschitz-margin loss measured in distance units: for every j != y the certified
distance to the y/j boundary, d_j = (z_y - z_j) / (||w_y - w_j||_2 · L_body), and the loss
log(1 + sum_j exp((eps - d_j) / temperature)), cross-entropy of the logits (eps - d_j) / temperature against a 0
for y. It is invariant to the scale of W: the older GloRo/AOL form (cross-entropy of z_j + eps · ||w_y - w_j|| at
temperature 1; Leino et al. 2021, Prach & Lampert 2022) is not, and once eps exceeded most reachable d_j it fell
fastest by shrinking every ||w_y - w_j|| to 0, merging the class rows into a one-class head (issue 21: eps 4 on
PCA-64 digits, accuracy 0.100, loss exactly ln 10). Here a merged head has d_j = 0 and the loss stays high.
`temperature` is in the features' distance units (0.25 on PCA-64 digit features, about 1/25 of their spread).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from bounds.layers import MaxMin
from bounds.lipschitz_layers import AOLLinear, materialize

HEAD_KINDS: tuple[str, ...] = ("mlp", "linear", "lipschitz", "orthogonal")
MARGIN_HEADS: tuple[str, ...] = ("linear", "lipschitz", "orthogonal")


def lipschitz_margin_loss(logits: torch.Tensor, labels: torch.Tensor, last_weight: torch.Tensor, *,
                          margin: float, temperature: float = 0.25, body_lipschitz: float = 1.0) -> torch.Tensor:
    """Mean over the batch of log(1 + sum_{j != y} exp((margin - d_j) / temperature)), d_j = (z_y - z_j) /
    (||w_y - w_j||_2 · body_lipschitz) the certified distance to the y/j boundary. `logits` [batch, K] = W g + b,
    `labels` [batch], `last_weight` W [K, width]; `margin` and `temperature` in feature-space distance units."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    spread = (last_weight[labels].unsqueeze(1) - last_weight.unsqueeze(0)).norm(dim=-1)  # [batch, K], 0 at y
    gap = logits.gather(1, labels[:, None]) - logits  # z_y - z_j, 0 at y
    distance = gap / (spread.clamp_min(1e-12) * body_lipschitz)
    offset = (margin - distance) / temperature
    offset = offset.scatter(1, labels[:, None], 0.0)  # y's own term: exp(0) = the 1 in log(1 + ...)
    return torch.logsumexp(offset, dim=1).mean()


def consistency_penalty(logits: torch.Tensor, copies: int, weight: float, entropy_weight: float = 0.5
                        ) -> torch.Tensor:
    """Jeong & Shin (2020)'s consistency term for a smoothed classifier's base model: `logits` [copies * batch, K]
    of `copies` noisy views of each input (copy-major), weight · mean_i KL(p_mean || p_i) + entropy_weight ·
    H(p_mean) (their lambda and eta = 0.5). It
    pulls the noisy views' predictions together, which raises the smoothed top-class probability and so the radius."""
    if copies < 2 or logits.shape[0] % copies:
        raise ValueError(f"need >= 2 copies dividing the batch, got {copies} for {logits.shape[0]} rows")
    log_p = logits.log_softmax(dim=1).view(copies, logits.shape[0] // copies, -1)
    mean = log_p.exp().mean(dim=0)
    log_mean = mean.clamp_min(1e-12).log()
    kl = (mean * (log_mean - log_p)).sum(dim=-1).mean()
    return weight * kl - entropy_weight * (mean * log_mean).sum(dim=-1).mean()


def build_lipschitz_body(feature_dim: int, hidden: tuple[int, ...], *, orthogonal: bool = False) -> nn.Sequential:
    """AOLLinear(d, w1) -> MaxMin -> AOLLinear(w1, w2) -> MaxMin ... (or orthogonal Linears): 1-Lipschitz for any
    weights (AOL rescaling or orthogonality; MaxMin permutes pairs). Widths must be even (MaxMin pairs the
    channels)."""
    if not hidden or any(w % 2 for w in hidden):
        raise ValueError(f"a lipschitz head needs even hidden widths, got {hidden}")
    layers: list[nn.Module] = []
    width = feature_dim
    for size in hidden:
        dense = (parametrizations.orthogonal(nn.Linear(width, size), orthogonal_map="cayley") if orthogonal
                 else AOLLinear(width, size))
        layers += [dense, MaxMin()]
        width = size
    return nn.Sequential(*layers)


def build_margin_head(kind: str, feature_dim: int, num_classes: int, hidden: tuple[int, ...]) -> nn.Sequential:
    """The trainable form of a margin head: Sequential(body..., Linear). Body empty for "linear"."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(feature_dim, num_classes))
    if kind in ("lipschitz", "orthogonal"):
        body = build_lipschitz_body(feature_dim, hidden, orthogonal=kind == "orthogonal")
        return nn.Sequential(*body, nn.Linear(hidden[-1], num_classes))
    raise ValueError(f"unknown margin head {kind!r}; valid: {MARGIN_HEADS}")


def finalize_margin_head(model: nn.Sequential, mean: torch.Tensor) -> nn.Sequential:
    """The servable h(z) = model(z - mean): AOL and orthogonally parametrised layers turned into plain Linears
    with the weights they compute (the bounds vocabulary; bounds/ recomputes their norms soundly, ~1 + 1e-6 for
    float32 orthogonal ones) and the centring folded into the first layer's bias, b' = b - W' mean. Centring
    moves no Lipschitz constant; the features are never rescaled, so the margin eps means feature-space units."""
    model = model.cpu().eval()
    for module in model:
        if parametrize.is_parametrized(module):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    plain = materialize(model)
    first = plain[0]
    with torch.no_grad():
        first.bias.sub_(first.weight @ mean.to(first.weight.dtype))
    return plain.eval()
