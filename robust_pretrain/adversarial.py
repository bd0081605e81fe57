"""The adversarial contrastive baseline (RoCL, Kim et al. 2020): PGD on the instance-discrimination loss.

RoCL attacks the *instance identity*: it perturbs a view so that its features move away from their
positive key and towards the negatives, without any label. We do it inside MoCo (positive = the momentum
key, negatives = the queue) and in the l2 norm, the norm the certificates are about. Training then uses the
clean and the adversarial view as two queries of the same key.
"""

from __future__ import annotations

import torch

from robust_pretrain.moco import MoCo, contrastive_loss


def instance_adversary(
    moco: MoCo,
    view_q: torch.Tensor,
    keys: torch.Tensor,
    *,
    epsilon: float,
    step_size: float,
    steps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Views within l2 distance ``epsilon`` of ``view_q`` (and in [0, 1]) that maximise the InfoNCE loss.

    l2 PGD from a uniform random start in the ball; each step moves ``step_size`` along the normalised
    gradient and projects back. ``view_q`` [batch, C, H, W], ``keys`` [batch, dim]; returns [batch, C, H, W],
    detached. ``autograd.grad`` with respect to the perturbation only leaves the parameters' ``.grad``
    (and a DistributedDataParallel wrapper's gradient hooks) untouched.
    """
    delta = _random_in_ball(view_q, epsilon, generator)
    labels = torch.zeros(view_q.shape[0], dtype=torch.long, device=view_q.device)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = contrastive_loss(moco.logits(moco.encoder_q((view_q + delta).clamp(0.0, 1.0)), keys), labels)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = delta + step_size * grad / _per_sample_norm(grad).clamp_min(1e-12)
            delta = delta * (epsilon / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
            delta = (view_q + delta).clamp(0.0, 1.0) - view_q
    return (view_q + delta).detach()


def _per_sample_norm(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.flatten(1).norm(dim=1).view(-1, *([1] * (tensor.dim() - 1)))


def _random_in_ball(like: torch.Tensor, radius: float, generator: torch.Generator) -> torch.Tensor:
    """Uniform in the l2 ball of ``radius`` per sample (direction Gaussian, radius ~ U^(1/d))."""
    direction = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    dims = like[0].numel()
    scale = torch.rand(like.shape[0], generator=generator, device=like.device, dtype=like.dtype) ** (
        1.0 / dims
    )
    return direction / _per_sample_norm(direction) * (radius * scale).view(-1, *([1] * (like.dim() - 1)))
