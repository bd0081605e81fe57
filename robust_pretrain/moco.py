"""The method in one module: MoCo (query/key encoders, momentum update, queue, InfoNCE) with the paper's
spectral-norm penalty, after facebookresearch/moco's ``builder.py``.

Training loss (REaaS, Qu et al. 2023, eq. for robust pre-training):
    (1/m) sum_i l(i) + lambda * prod_j ||T_j||_s
with l(i) the InfoNCE loss of query i. There is no projection head: the features that enter InfoNCE are the
features the provider serves, so the penalty acts on exactly the network whose Lipschitz bound the
certificates use.

The penalty is the paper's literal product. InfoNCE sees only l2-normalised features, so one might fear
the product is lowered just by shrinking all features alike (which would leave R = R_F / L unchanged); a
scale-free variant (product / feature spread) was tried on the demo data and gave smaller certified radii
of a linear probe, or collapsed the features at larger lambda: biases and the downstream fit make the
scale matter, and the literal product lowered the certified-radius proxy's denominator the most.

For encoders that are 1-Lipschitz by construction (``similarity="distance"``) the logits are
-||q - k||^2 / T on the raw features instead: under a fixed Lipschitz constant the scale of the features *is*
the certified radius, and a normalised InfoNCE cannot see it. There is no penalty to compute then.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from robust_pretrain.spectral import SpectralNormProduct

SIMILARITIES: tuple[str, ...] = ("cosine", "distance")


class MoCo(nn.Module):
    """Query encoder ``encoder_q`` (trained, served), momentum key encoder ``encoder_k``, queue of keys.

    Paper symbols as arguments: ``queue_size`` K, ``momentum`` m, ``temperature`` T. State (the queue, its
    pointer, the power-iteration vectors) lives in buffers, so it is checkpointed with the weights.
    """

    def __init__(
        self,
        encoder: nn.Module,
        input_shape: tuple[int, int, int],
        feature_dim: int,
        *,
        queue_size: int = 4096,
        momentum: float = 0.99,
        temperature: float = 0.2,
        power_iterations: int = 1,
        generator: torch.Generator | None = None,
        similarity: str = "cosine",
    ) -> None:
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {similarity!r}; valid: {SIMILARITIES}")
        self.momentum = momentum
        self.temperature = temperature
        self.similarity = similarity
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder)
        for parameter in self.encoder_k.parameters():
            parameter.requires_grad_(False)
        # "distance" is for encoders that are 1-Lipschitz by construction: their product is 1 by design.
        self.spectral = (
            SpectralNormProduct(encoder, input_shape, power_iterations, generator=generator)
            if similarity == "cosine"
            else None
        )
        queue = torch.randn(feature_dim, queue_size, generator=generator)
        self.register_buffer("queue", F.normalize(queue, dim=0) if similarity == "cosine" else queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def encode_keys(self, view_k: torch.Tensor) -> torch.Tensor:
        """Momentum-update the key encoder, then encode the key view. [batch, C, H, W] -> [batch, dim]."""
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            param_k.mul_(self.momentum).add_(param_q.detach(), alpha=1.0 - self.momentum)
        return self.encoder_k(view_k)

    def forward(
        self, view_q: torch.Tensor, keys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """InfoNCE logits for the queries against their keys and the queue, plus what the penalty needs.

        ``view_q`` [r * batch, C, H, W] (r >= 1 query views per key, e.g. clean and adversarial),
        ``keys`` [batch, dim]. Returns ``logits`` [r * batch, 1 + K] (column 0 the positive), ``labels``
        [r * batch] (all 0), the raw query features [r * batch, dim], and the spectral-norm product (scalar).
        """
        queries = self.encoder_q(view_q)
        logits = self.logits(queries, keys.repeat(queries.shape[0] // keys.shape[0], 1))
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        product = self.spectral(self.encoder_q) if self.spectral is not None else queries.new_ones(())
        return logits, labels, queries, product

    def logits(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[batch, 1 + K]: similarity to the own key, then to each queued key, over T (cosine, or minus the
        squared l2 distance of the raw features)."""
        queue = self.queue.clone().detach()
        if self.similarity == "distance":
            positive = -(queries - keys).pow(2).sum(dim=1, keepdim=True)
            negative = -torch.cdist(queries, queue.T).pow(2)
            return torch.cat([positive, negative], dim=1) / self.temperature
        queries, keys = F.normalize(queries, dim=1), F.normalize(keys, dim=1)
        positive = (queries * keys).sum(dim=1, keepdim=True)
        negative = queries @ queue
        return torch.cat([positive, negative], dim=1) / self.temperature

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest keys by this step's keys from every process."""
        keys = _gather_from_all_processes(keys)
        if self.similarity == "cosine":
            keys = F.normalize(keys, dim=1)
        size = self.queue.shape[1]
        positions = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[:, positions] = keys.T
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)


def contrastive_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(1/m) sum_i l(i): the InfoNCE loss is cross-entropy with the positive as the target class."""
    return F.cross_entropy(logits, labels)


def spectral_penalty(lipschitz_product: torch.Tensor, weight: float) -> torch.Tensor:
    """lambda * prod_j ||T_j||_s (``lipschitz_product`` from ``MoCo.forward``)."""
    return weight * lipschitz_product


def _gather_from_all_processes(tensor: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)
