"""The one batched binary search (used for image radii and for feature radii)."""

from __future__ import annotations

from collections.abc import Callable

import torch

# certify(radius [k], index [k] int64) -> certified [k] bool, for the images `index` at those radii.
Certifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def batched_binary_search(
    certify: Certifier,
    lower: torch.Tensor,
    upper: torch.Tensor,
    *,
    tolerance: float,
    max_steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element, the largest radius found that `certify` verified, and the number of `certify` calls it took.

    `lower` [batch] must already be verified (0, or a closed-form sound radius); `upper` [batch] is a first guess.
    While the guess verifies, the bracket doubles; then it is bisected until `upper - lower <= tolerance·upper`
    (relative tolerance) or `max_steps` calls were spent. Only verified radii are ever returned (the lower end).
    Returns `(radius [batch] float64, steps [batch] int64)`.
    """
    lo = lower.to(torch.float64).clone()
    hi = torch.maximum(upper.to(torch.float64), lo)
    steps = torch.zeros_like(lo, dtype=torch.int64)
    expanding = torch.ones_like(lo, dtype=torch.bool)
    for _ in range(max_steps):
        active = (hi - lo) > tolerance * hi
        if not bool(active.any()):
            break
        index = active.nonzero().squeeze(1)
        probe = torch.where(expanding[index], hi[index], (lo[index] + hi[index]) / 2)
        verified = certify(probe, index).to(device=lo.device)
        steps[index] += 1
        grow = expanding[index] & verified
        lo[index] = torch.where(verified, probe, lo[index])
        hi[index] = torch.where(grow, 2 * probe, torch.where(verified, hi[index], probe))
        expanding[index] = grow
    return lo, steps
