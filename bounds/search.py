"""The one batched radius search (used for image radii and for feature radii).

A certifier answers, for a batch of radii, which are verified, and optionally a score per radius that crosses
1 where verification stops (e.g. UB(x, r) / R_F): verified <=> score < 1 (the search never trusts the score for
soundness, only for choosing where to probe next). With scores the bracket is narrowed by safeguarded
regula falsi (linear interpolation of the score between the bracket ends, with the Illinois rule against
one-sided stalling), otherwise by bisection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bounds.cancellation import StopCheck, stop_if_asked

# certify(radius [k], index [k] int64) -> verified [k] bool, or (verified, score [k]), or (verified, score,
# certified [k]) where certified is a (possibly smaller) radius the same evaluation proved, e.g. R_F / K for a
# Lipschitz constant K valid on the whole probed ball.
Certifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]


def batched_binary_search(
    certify: Certifier,
    lower: torch.Tensor,
    upper: torch.Tensor,
    *,
    tolerance: float,
    max_steps: int,
    should_stop: StopCheck = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element, the largest radius found that `certify` verified, and the number of `certify` calls it took.

    `lower` [batch] must already be verified (0, or a closed-form sound radius); `upper` [batch] is a first guess.
    While the guess verifies, the bracket doubles; then it is narrowed until `upper - lower <= tolerance·upper`
    (relative tolerance) or `max_steps` calls were spent. Only verified radii are ever returned (the lower end),
    so the result is sound whatever the scores say. Returns `(radius [batch] float64, steps [batch] int64)`.
    `should_stop` is polled before every `certify` call; once true, SearchCancelled is raised and nothing returned.
    """
    lo = lower.to(torch.float64).clone()
    hi = torch.maximum(upper.to(torch.float64), lo)
    score_lo = torch.zeros_like(lo)  # score at lo (0 at radius 0, refined once lo is probed)
    score_hi = torch.full_like(lo, float("nan"))
    steps = torch.zeros_like(lo, dtype=torch.int64)
    expanding = torch.ones_like(lo, dtype=torch.bool)
    last_verified = torch.zeros_like(lo, dtype=torch.int8)  # +1 lo moved last, -1 hi moved last, 0 neither
    for _ in range(max_steps):
        active = (hi - lo) > tolerance * hi
        if not bool(active.any()):
            break
        index = active.nonzero().squeeze(1)
        low, h = lo[index], hi[index]
        width = h - low
        interpolated = low + (1 - score_lo[index]) / (score_hi[index] - score_lo[index]) * width
        # keep the probe inside the bracket, and close it when the interpolation would crawl
        interpolated = torch.minimum(torch.maximum(interpolated, low + 0.01 * width), h - 0.01 * width)
        closing = (interpolated - low) < tolerance * h
        interpolated = torch.where(closing, low + 0.99 * tolerance * h, interpolated)
        usable = torch.isfinite(interpolated) & torch.isfinite(score_hi[index])
        probe = torch.where(expanding[index], h, torch.where(usable, interpolated, (low + h) / 2))
        stop_if_asked(should_stop)
        answer = certify(probe, index)
        answer = answer if isinstance(answer, tuple) else (answer,)
        verified = answer[0].to(lo.device)
        score = answer[1].to(lo.device, torch.float64) if len(answer) > 1 else torch.full_like(probe, float("nan"))
        certified = answer[2].to(lo.device, torch.float64) if len(answer) > 2 else torch.zeros_like(probe)
        steps[index] += 1
        grow = expanding[index] & verified
        raised = ~verified & (certified > low)
        lo[index] = torch.where(verified, probe, torch.where(raised, torch.minimum(certified, probe), low))
        # a radius proven by a Lipschitz constant K sits where K·r reaches the threshold: estimate its score
        # along that line (a heuristic for the next probe only)
        estimate = score * torch.minimum(certified, probe) / probe
        score_lo[index] = torch.where(verified, score, torch.where(raised, estimate, score_lo[index]))
        hi[index] = torch.where(grow, 2 * probe, torch.where(verified, h, probe))
        score_hi[index] = torch.where(grow, torch.full_like(score, float("nan")),
                                      torch.where(verified, score_hi[index], score))
        # Illinois: when the same end moves twice in a row, halve the other end's distance to the crossing
        side = torch.where(verified, 1, -1).to(torch.int8)
        repeat = (side == last_verified[index]) & ~expanding[index]
        score_hi[index] = torch.where(repeat & verified, 1 + (score_hi[index] - 1) / 2, score_hi[index])
        score_lo[index] = torch.where(repeat & ~verified, 1 - (1 - score_lo[index]) / 2, score_lo[index])
        last_verified[index] = torch.where(expanding[index], torch.zeros_like(side), side)
        expanding[index] = grow
    return lo, steps
