"""Downstream heads h whose feature-space radius is exact or nearly so, and the loss that trains them.

Five head kinds (`HEAD_KINDS`, chosen by `TrainConfig.head`):

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
* "prototype": a nearest-prototype classifier, `TrainConfig.prototypes` points per class in feature space, the
  class of the nearest one wins. It is max-affine (-||z - c||^2 = 2 c · z - ||c||^2 - ||z||^2), served as
  Linear -> bounds.layers.ClassMax, and bounds.max_affine certifies it *exactly*: the certified radius is the
  distance to the nearest input it misclassifies, so nothing is left for a tighter bound or an attack (the
  Lipschitz heads certify about 0.87 of their attack radius). It trains in seconds where the 512-512 bodies
  take minutes. Its loss is in distance units too: the certified distance max_a min_b of the pair distances
  (d_b^2 - d_a^2) / (2 ||c_a - c_b||) to the a/b bisector (a over the label's prototypes, b over the others;
  Voracek and Hein 2022 train the same bound with a hinge), smoothed by log-sum-exp at a softness of
  PROTOTYPE_SOFTNESS · temperature, then log(1 + exp((eps - d) / temperature)).

The network margin heads train with a Lipschitz-margin loss measured in distance units: for every j != y the certified
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

from bounds.layers import ClassMax, MaxMin
from bounds.lipschitz_layers import AOLLinear, materialize

HEAD_KINDS: tuple[str, ...] = ("mlp", "linear", "lipschitz", "orthogonal", "prototype")
MARGIN_HEADS: tuple[str, ...] = ("linear", "lipschitz", "orthogonal", "prototype")
PROTOTYPE_SOFTNESS = 0.4  # of the temperature: the log-sum-exp softness of the prototype head's max-min


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


class PrototypeHead(nn.Module):
    """The trainable form of the "prototype" head: `prototypes` [classes * per_class, d] (class k's are rows
    k * per_class ...), in the coordinates it trains in. The servable form is `finalize_prototype_head`'s."""

    def __init__(self, prototypes: torch.Tensor, per_class: int) -> None:
        super().__init__()
        if prototypes.dim() != 2 or prototypes.shape[0] % per_class:
            raise ValueError(f"need [classes * {per_class}, d] prototypes, got {tuple(prototypes.shape)}")
        self.prototypes = nn.Parameter(prototypes.clone())
        self.per_class = per_class

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits [batch, classes]: minus the squared distance to each class's nearest prototype."""
        return ClassMax(self.per_class)(-torch.cdist(z, self.prototypes).square())

    def certified_distance(self, z: torch.Tensor, labels: torch.Tensor, softness: float) -> torch.Tensor:
        """[batch]: log-sum-exp smoothed max over the label's prototypes a of the min over the others b of
        (||z - c_b||^2 - ||z - c_a||^2) / (2 ||c_a - c_b||), signed distance to the a/b bisector. Unsmoothed
        (softness 0) it is a sound radius, > 0 exactly where the nearest prototype has the label."""
        distance = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
        for label in labels.unique().tolist():  # by class, with slices: deterministic gradients (no scatter-add)
            rows = (labels == label).nonzero().squeeze(1)
            start, stop = label * self.per_class, (label + 1) * self.per_class
            own = self.prototypes[start:stop]
            other = torch.cat([self.prototypes[:start], self.prototypes[stop:]])
            apart = torch.cdist(own, other).clamp_min(1e-12)  # [own, other]
            to_own, to_other = torch.cdist(z[rows], own).square(), torch.cdist(z[rows], other).square()
            pair = (to_other[:, None, :] - to_own[:, :, None]) / (2 * apart)  # [rows, own, other]
            if softness == 0:
                distance[rows] = pair.min(dim=2).values.max(dim=1).values
            else:
                nearest_other = -softness * torch.logsumexp(-pair / softness, dim=2)
                distance[rows] = softness * torch.logsumexp(nearest_other / softness, dim=1)
        return distance


def prototype_margin_loss(distance: torch.Tensor, *, margin: float, temperature: float = 0.25) -> torch.Tensor:
    """Mean of log(1 + exp((margin - distance) / temperature)), `distance` [batch] the prototype head's
    certified distance (PrototypeHead.certified_distance): the margin heads' loss with one boundary term."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return nn.functional.softplus((margin - distance) / temperature).mean()


def initial_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int, per_class: int,
                       generator: torch.Generator) -> torch.Tensor:
    """[num_classes * per_class, d]: `per_class` distinct training rows of each class drawn at random (with
    replacement only where a class has fewer rows)."""
    rows = []
    for label in range(num_classes):
        members = (labels == label).nonzero().squeeze(1)
        if members.numel() == 0:
            raise ValueError(f"class {label} has no training rows to place a prototype at")
        picks = (torch.randperm(members.numel(), generator=generator)[:per_class] if members.numel() >= per_class
                 else torch.randint(members.numel(), (per_class,), generator=generator))
        rows.append(features[members[picks]])
    return torch.cat(rows)


def finalize_prototype_head(head: PrototypeHead, mean: torch.Tensor, scale: float) -> nn.Sequential:
    """The servable h: Linear(d, classes * per_class) -> ClassMax, piece p scoring 2 c_p · z - ||c_p||^2 for
    the prototypes c_p = scale · (trained row) + mean in raw feature units (its argmax is the nearest
    prototype's class; the ||z||^2 all classes share is dropped)."""
    centres = head.prototypes.detach().cpu().to(torch.float32) * scale + mean.cpu().to(torch.float32)
    linear = nn.Linear(centres.shape[1], centres.shape[0])
    with torch.no_grad():
        linear.weight.copy_(2 * centres)
        linear.bias.copy_(-centres.square().sum(dim=1))
    return nn.Sequential(linear, ClassMax(head.per_class)).eval()
