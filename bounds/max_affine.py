"""The exact l2 radius of a max-affine classifier h_k(z) = max_{p in k} s_p(z), s_p(z) = w_p · z + b_p.

Why exact is possible: every decision region of such an h is a union of polyhedra. Around z with prediction y,
the inputs where y is *not* the prediction by more than the rounding allowance delta form

    U = union over pieces b of other classes of C_b,   C_b = {z' : s_a(z') - s_b(z') <= delta for every a in y},

(z' is in U iff some other-class piece comes within delta of all of y's pieces), so the radius is
min_b dist(z, C_b): one projection onto a polyhedron with |y's pieces| half-spaces per b. A nearest-prototype
classifier is max-affine (-||z - c||^2 = 2 c · z - ||c||^2 - ||z||^2, the last term shared by every class), and
its pieces are what reaas_client's prototype head trains.

Soundness does not rest on a solver: every distance is reported through weak duality. For any lambda >= 0 over
y's pieces, with g_a = s_a(z) - s_b(z) - delta and every z' in C_b,
sum_a lambda_a g_a <= ||sum_a lambda_a (w_a - w_b)||_2 · ||z' - z||_2, so

    dist(z, C_b) >= sum_a lambda_a g_a / ||sum_a lambda_a (w_a - w_b)||_2,

evaluated in float64. lambda = e_a gives the single-pair distance g_a / ||w_a - w_b|| (cheap, for all b at once);
the multipliers of the least-distance problem (Lawson and Hanson's NNLS, scipy.optimize.nnls) make it equal to the
distance. The b are visited in increasing order of their single-pair bound, and the visit stops once that bound
exceeds the smallest distance found, since no later b can be nearer.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import nnls


def least_distance(pair_weights: np.ndarray, gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Lawson and Hanson's least-distance program min ||u|| s.t. -(w_a - w_b) · u >= g_a, by NNLS:
    (multipliers [na] >= 0, the minimiser u [d] or None where the constraints are inconsistent, C_b empty).
    `pair_weights` [na, d] rows w_a - w_b, `gaps` [na] the g_a (module docstring). Raises RuntimeError where NNLS
    does not converge. Its output is a candidate only: `dual_distance` turns the multipliers into a bound."""
    system = np.vstack([-pair_weights.T, gaps[None, :]])
    target = np.zeros(system.shape[0])
    target[-1] = 1.0
    multipliers, _ = nnls(system, target, maxiter=50 * system.shape[1])
    residual = system @ multipliers - target
    return multipliers, (None if residual[-1] == 0 else -residual[:-1] / residual[-1])


def dual_distance(pair_weights: np.ndarray, gaps: np.ndarray) -> float:
    """A sound lower bound of dist(z, C_b), exact up to NNLS's convergence: weak duality at the least-distance
    program's multipliers (`least_distance`'s arguments); inf when C_b is empty (no z' lets b catch every a), 0
    when the multipliers prove nothing or NNLS did not converge (the single-pair bounds then stand alone)."""
    try:
        multipliers, _ = least_distance(pair_weights, gaps)
    except RuntimeError:
        return 0.0
    # float64 sums of na terms err by < na * 2^-53 of the sum of |terms|: 1e-12 of it covers any na < 4e3
    numerator = float(gaps @ multipliers) - 1e-12 * float(np.abs(gaps) @ multipliers)
    if numerator <= 0:
        return 0.0
    norm = (float(np.linalg.norm(pair_weights.T @ multipliers))
            + 1e-12 * float(np.linalg.norm(np.abs(pair_weights).T @ multipliers)))
    return numerator / norm if norm > 0 else math.inf  # norm 0 (all w_a = w_b): Farkas' proof that C_b is empty


def max_affine_radius(weight: torch.Tensor, bias: torch.Tensor, pieces: int, features: torch.Tensor,
                      prediction: torch.Tensor, allowance: torch.Tensor) -> torch.Tensor:
    """The certified l2 radius [batch] float64 of h_k(z) = max over class k's `pieces` rows of weight [K * pieces, d]
    z + bias at each row of `features` [batch, d], for `prediction` [batch]: min_b dist(z, C_b), every margin
    kept above `allowance` [batch] (0 where the prediction does not lead by it). Computed in float64 on the CPU."""
    w = weight.detach().to("cpu", torch.float64).numpy()
    scores = (features.detach().to("cpu", torch.float64) @ torch.from_numpy(w).T
              + bias.detach().to("cpu", torch.float64)).numpy()
    owner = np.arange(w.shape[0]) // pieces
    pair_norms: dict[int, np.ndarray] = {}  # per class y: ||w_a - w_b|| [others, own]
    radius = np.zeros(features.shape[0])
    for row, (label, delta) in enumerate(zip(prediction.tolist(), allowance.tolist(), strict=True)):
        own, other = np.flatnonzero(owner == label), np.flatnonzero(owner != label)
        if label not in pair_norms:
            pair_norms[label] = np.linalg.norm(w[own][None, :, :] - w[other][:, None, :], axis=2)
        gaps = scores[row, own][None, :] - scores[row, other][:, None] - delta  # [others, own]
        if (gaps <= 0).all(axis=1).any():
            continue  # z is already in some C_b
        single = (gaps / np.maximum(pair_norms[label], 1e-300)).max(axis=1)
        best = math.inf
        for index in np.argsort(single, kind="stable"):
            if single[index] >= best:
                break
            b = other[index]
            best = min(best, max(single[index], dual_distance(w[own] - w[b], gaps[index])))
        radius[row] = best
    return torch.from_numpy(radius)
