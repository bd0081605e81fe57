"""F2IPerturb: the certified image-space radius R for a feature-space radius R_F (batched binary search).

For each image x the result R satisfies UB(x, R) < R_F for the named sound bound UB (bounds.feature_distance), so
||f(x + d) - f(x)||_2 < R_F for every ||d||_2 <= R. Floating-point safety: a radius r counts as verified only if
UB(x, r)·(1 + SAFETY_MARGIN) < R_F; bounds are computed in IEEE float32 (rounding ~1e-6 relative; on CUDA
build_graph turns TensorFloat-32 off, bounds.layers.require_ieee_float32), SAFETY_MARGIN is 1e-4. The true
feature distance is monotone in r, so every radius below a verified one is certified too.

Rounding at small radii. A float32 bound is only as good as float32 can represent the ball: once r nears the
spacing of float32 numbers around x, x ± r rounds onto x, interval widths collapse and a bound of ~0 "verifies" any
radius (measured: R_F = 1e-9 certified R with a feature distance of 2·R_F, 1e-12 with 1 000·R_F). So the float32
search only *finds* a radius; every searched radius is then confirmed once in float64 with the same bounds (IEEE
float64 rounding is ~1e-16 of the activations, covered by the margin m at every radius above the floor below), and
one that fails falls back to what the float64 evaluation proves (a K·r bound's R_F/(K(1 + m))) or to the closed form.
Below the floor R_F < LOCAL_BOUND_FLOOR·(1 + ||f(x)||_2) even float64 intervals lose the margin, and above the
ceiling (a closed-form radius LOCAL_BOUND_CEILING times wider than the input) float32 overflows, so those images
get the closed form, which is exact arithmetic on a sound L and needs no evaluation of f at all. R_F below
SMALLEST_FEATURE_RADIUS (where float64 leaves normal numbers and R_F(1 - m)/L could round up) is answered R = 0.

"auto" (DEFAULT_BOUND) spends the expensive local bounds only where they can pay. Facts it rests on:

* The closed-form radius R_F·(1 - m)/L (L a sound global Lipschitz bound, m = SAFETY_MARGIN) is always sound:
  L·r·(1 + m) < R_F there. So *which* images get it never affects soundness, only tightness and cost.
* Every bound of the form K·r with K >= sup over the ball of ||J|| ("lipschitz", "local_lipschitz") has
  K >= ||J(x)||: x lies in every ball around x, and J(x) is a Clarke Jacobian there. Such a bound certifies at
  most R_F/||J(x)||, so if ||J(x)||·(1 + tau) >= L it cannot beat R_F/L by more than tau. We test that with a
  *lower* bound of ||J(x)|| (bounds.pointwise_jacobian, a few batched power-iteration steps), the direction the
  implication needs. tau is the search `tolerance`: the search itself stops within tau of the crossing, so a
  closed-form answer within tau of what a local K·r bound could give is as precise as searching would be.
* For "ibp", "crown" and "crown_spectral" the claim "cannot beat R_F/L by more than tau when the test passes"
  is not a theorem (a ReLU net's true distance can bend below ||J(x)||·r); it is what the benchmark measures.
* An affine encoder (no activation in its graph: identity, PCA) has J = const and L = ||J|| up to
  SPECTRAL_SAFETY (global_lipschitz_upper is exact there), so it gets the closed form with no per-image work.

Images whose test fails go to the "best_ibp" search; each result names the bound that decided it ("lipschitz"
with 0 search steps for a closed-form answer).

Cancellation (bounds.cancellation): an optional `should_stop` is polled before every bound evaluation, between
image chunks and inside each evaluation (per CROWN layer and spec chunk, per Jacobian backward layer); once it is
true the search raises SearchCancelled and returns nothing, so no partial radius ever leaves it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from bounds.cancellation import StopCheck, stop_if_asked
from bounds.feature_distance import FEATURE_BOUNDS, feature_distance_upper, local_jacobian_norm
from bounds.graph import BoundGraph, build_graph
from bounds.layers import UnsupportedLayerError, module_device
from bounds.lipschitz import global_lipschitz_upper
from bounds.midpoint_lipschitz import DEFAULT_MEMORY_BUDGET_BYTES
from bounds.operators import AffineOperator
from bounds.pointwise_jacobian import jacobian_norm_lower
from bounds.propagation import InputBall, compute_bounds
from bounds.search import batched_binary_search

SAFETY_MARGIN = 1e-4
# Local (searched) bounds only for R_F >= LOCAL_BOUND_FLOOR·(1 + ||f(x)||_2); below, the closed form (module docstring).
# float64 rounding of a bound is ~1e-16 x activation scale x depth x fan-in (< 1e-12 here), 1e-4 of it at this floor
# is ~1e-10: a hundredfold cushion.
LOCAL_BOUND_FLOOR = 1e-6
# ... and only where the closed-form radius is <= LOCAL_BOUND_CEILING·(1 + ||x||_2): a ball that much wider than the
# input itself holds every input a client could send, every ReLU is unstable on it, and a float32 search there
# overflows (R_F = 1e308 once ended in a failed eigendecomposition); the closed form answers, as it would anyway.
LOCAL_BOUND_CEILING = 1e3
# Smallest R_F answered with a non-zero radius: far above float64's smallest normal (2.2e-308) divided by any L.
SMALLEST_FEATURE_RADIUS = 1e-200
# "best": the minimum of every bound, intermediate bounds by CROWN (largest radii); "best_ibp": the same minimum
# with IBP intermediate bounds (about half the time of a CROWN-only search, somewhat smaller radii); "auto": the
# closed form where the local bounds cannot pay, best_ibp elsewhere (module docstring).
BOUNDS_OFFERED: tuple[str, ...] = (*FEATURE_BOUNDS, "best", "best_ibp", "auto")
# The service default: the closed form costs a few forward passes per image where local bounds cannot beat it;
# elsewhere best_ibp, which certifies the radius of "best" (within 0.1%) on the demo encoder in ~0.7x its time
# (benchmarks/results/bounds.md). Clients that want the largest radius whatever it costs ask for "best".
DEFAULT_BOUND = "auto"
AUTO_SEARCH = "best_ibp"  # where "auto" sends the images its test does not decide
BOUND_DESCRIPTIONS: dict[str, str] = {
    "lipschitz": "global Lipschitz bound L·r: R = R_F(1 - m)/L in closed form",
    "ibp": "interval bound propagation, elementwise feature bounds -> l2",
    "crown": "CROWN elementwise feature bounds -> l2 (the paper's method)",
    "crown_spectral": "CROWN linear bounds -> l2 through exact spectral norms",
    "local_lipschitz": "interval Clarke Jacobian over the ball (and midpoint expansion) times r",
    "best": "minimum of every bound, CROWN intermediate bounds (largest radii, slowest)",
    "best_ibp": "minimum of every bound, IBP intermediate bounds",
    "auto": "closed form R_F(1 - m)/L where a lower bound of ||J(x)|| shows local bounds cannot beat it by the "
            "tolerance, best_ibp search elsewhere",
}
CLOSED_FORM_BOUNDS = ("lipschitz",)
_LINEAR_IN_RADIUS = ("lipschitz", "local_lipschitz")  # UB = K·r with K valid on the whole ball of radius r
_BYTES_FACTOR = 8  # live [batch, spec, *node] tensors during a CROWN backward step: lA, uA and temporaries


@dataclass(frozen=True)
class F2IResult:
    """`image_radius` [batch] float64 (certified), `bound` (the bound that decided each radius), `search_steps`
    [batch] int64 (bound evaluations spent on each image)."""

    image_radius: torch.Tensor
    bound: tuple[str, ...]
    search_steps: torch.Tensor


def _bound_names(bound: str) -> tuple[str, ...]:
    if bound not in BOUNDS_OFFERED:
        raise ValueError(f"unknown bound {bound!r}; valid: {BOUNDS_OFFERED}")
    return FEATURE_BOUNDS if bound in ("best", "best_ibp", "auto") else (bound,)


def is_affine(model: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """True when the model traces to affine operators only (no activation): its Jacobian is one constant matrix.
    A model outside the bounds vocabulary is not known to be affine."""
    try:
        graph = build_graph(model, input_shape)
    except UnsupportedLayerError:
        return False
    return all(isinstance(node.op, AffineOperator) for node in graph.nodes[1:])


def evaluate_bound_once(
    model: nn.Module, images: torch.Tensor, radius: float, bound: str, *, lipschitz_upper: float,
    tolerance: float = 1e-3,
) -> None:
    """One evaluation of `bound` at `radius` on `images` [batch, C, H, W] (what one search step costs; for "auto",
    its per-image test). For timing: the values are discarded."""
    names = _bound_names(bound)
    with torch.no_grad():
        if bound == "auto":
            if not is_affine(model, tuple(images.shape[1:])):
                with torch.enable_grad():
                    global_radius_suffices(model, images, lipschitz_upper, tolerance)
            return
        radii = torch.full((images.shape[0],), radius, dtype=images.dtype, device=images.device)
        if names == ("lipschitz",):
            feature_distance_upper(None, images, radii, names, lipschitz_upper=lipschitz_upper)
            return
        graph = build_graph(model, tuple(images.shape[1:]), dtype=torch.float32, device=images.device)
        radii = torch.full((images.shape[0],), radius, dtype=images.dtype, device=images.device)
        feature_distance_upper(graph, images, radii, names, lipschitz_upper=lipschitz_upper,
                               intermediate="ibp" if bound == "best_ibp" else "crown")


def closed_form_radius(feature_radii: torch.Tensor, lipschitz_upper: float) -> torch.Tensor:
    """R_F·(1 - m)/L [batch] float64: L·r·(1 + m) < R_F there, verified by construction (R_F = 0 gives 0, and so
    does R_F < SMALLEST_FEATURE_RADIUS, where the float64 quotient could round above the exact one; a quotient past
    float64's range is the largest double)."""
    radii_f = feature_radii.to(torch.float64).cpu()
    # an L < 1 can carry a huge R_F past float64's range: the largest double is below the exact quotient, inf is not
    radius = (radii_f * (1 - SAFETY_MARGIN) / lipschitz_upper).clamp(min=0, max=torch.finfo(torch.float64).max)
    return torch.where(radii_f >= SMALLEST_FEATURE_RADIUS, radius, torch.zeros_like(radius))


def _verdict(values: dict[str, torch.Tensor], names: tuple[str, ...], radius: torch.Tensor,
             radii_f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str | None]]:
    """What one evaluation of the bounds `values` (each [k], at `radius` [k]) proves against `radii_f` [k]:
    `(verified, score, which, certified, certified_by)`. verified <=> min UB·(1 + m) < R_F; `which` the index of
    the minimising bound; `certified` the radius a K·r bound valid on the whole probed ball proves,
    min(r, R_F/(K(1 + m))·(1 - 1e-9)) (0 where none), and the bound that proves it."""
    radius = radius.cpu().to(torch.float64)
    stacked = torch.stack([values[n] for n in names], dim=1).cpu()  # one device-to-host wait per step
    best, which = stacked.min(dim=1)
    score = best * (1 + SAFETY_MARGIN) / radii_f
    verified = score < 1
    certified = torch.zeros_like(score)
    certified_by: list[str | None] = [None] * len(radius)
    for name in _LINEAR_IN_RADIUS:
        if name in values:
            constant = stacked[:, names.index(name)] / radius
            candidate = torch.minimum(radii_f / (constant * (1 + SAFETY_MARGIN)) * (1 - 1e-9), radius)
            candidate = torch.where(torch.isfinite(candidate), candidate, torch.zeros_like(candidate))
            better = candidate > certified
            certified = torch.where(better, candidate, certified)
            certified_by = [name if b else c for b, c in zip(better.tolist(), certified_by, strict=True)]
    return verified, score, which, certified, certified_by


def global_radius_suffices(
    model: nn.Module, images: torch.Tensor, lipschitz_upper: float, tolerance: float
) -> torch.Tensor:
    """[batch] bool: where a lower bound of ||J(x)|| proves ||J(x)||·(1 + tolerance) >= L, so no K·r bound can
    beat R_F/L by more than `tolerance` (module docstring). Deterministic (seeded start)."""
    threshold = lipschitz_upper / (1 + tolerance)
    with torch.enable_grad():
        lower = jacobian_norm_lower(model, images, target=threshold, generator=torch.Generator().manual_seed(0))
    return (lower >= threshold).cpu()


def _chunk_sizes(graph: BoundGraph, names: tuple[str, ...], batch: int, budget: int, itemsize: int) -> tuple[int, int]:
    """(images per chunk, intermediate CROWN neurons per chunk) so that the largest backward state fits `budget`."""
    if names == ("lipschitz",):
        return max(batch, 1), 1
    per_spec_row = graph.max_numel() * itemsize * _BYTES_FACTOR
    output_rows = int(torch.tensor(graph.nodes[-1].shape).prod())
    images = max(1, min(batch, budget // max(1, per_spec_row * output_rows)))
    spec_chunk = max(output_rows, budget // max(1, per_spec_row * images))
    return images, spec_chunk


def _search_chunk(
    graph: BoundGraph,
    graph64: BoundGraph,
    images: torch.Tensor,
    feature_radii: torch.Tensor,
    names: tuple[str, ...],
    *,
    lipschitz_upper: float,
    tolerance: float,
    max_steps: int,
    spec_chunk: int,
    intermediate: str,
    memory_budget_bytes: int,
    should_stop: StopCheck,
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    radii_f = feature_radii.to(torch.float64).cpu()
    batch = images.shape[0]
    decider = [names[0]] * batch
    lower = torch.zeros(batch, dtype=torch.float64)
    if "lipschitz" in names and lipschitz_upper > 0:
        # L·r·(1 + m) < R_F at r = R_F·(1 - m)/L: the Lipschitz radius in closed form, verified by construction.
        lower = closed_form_radius(radii_f, lipschitz_upper)
        decider = ["lipschitz"] * batch
    # what a searched radius falls back to when float64 does not confirm it: the closed form, whichever bound
    closed = closed_form_radius(radii_f, lipschitz_upper) if lipschitz_upper > 0 else lower.clone()
    probe_above_global = "lipschitz" in names and lipschitz_upper > 0 and names != ("lipschitz",)
    if names == ("lipschitz",):
        upper = (radii_f / lipschitz_upper) if lipschitz_upper > 0 else torch.full_like(radii_f, math.inf)
        upper = torch.where(torch.isfinite(upper), upper, lower)
    elif probe_above_global:
        upper = lower * (1 + tolerance)  # probed once below, before the search
    else:
        # First guess: where the exact Jacobian at x alone would reach R_F (the true radius if f stays affine).
        point = InputBall(images, torch.zeros(batch, dtype=images.dtype, device=images.device))
        jacobian_norm = local_jacobian_norm(graph, compute_bounds(graph, point, intermediate="ibp"),
                                            should_stop=should_stop).cpu()
        upper = radii_f / jacobian_norm.clamp(min=1e-12)
        if lipschitz_upper > 0:
            # sound bounds rarely certify far beyond the global-Lipschitz radius: start the bracket near it
            upper = torch.minimum(upper, 2 * radii_f / lipschitz_upper)
        upper = torch.where(torch.isfinite(upper), upper, 2 * lower + 1.0)
    upper = torch.where(radii_f > 0, torch.maximum(upper, lower), lower)

    current = lower.tolist()  # the largest radius certified so far per image (to track the deciding bound)

    def certify(radius: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        device_index = index.to(images.device)
        values = feature_distance_upper(
            graph, images[device_index], radius.to(images.device, images.dtype), names,
            lipschitz_upper=lipschitz_upper, intermediate=intermediate, spec_chunk=spec_chunk,
            memory_budget_bytes=memory_budget_bytes, should_stop=should_stop,
        )
        verified, score, which, certified, certified_by = _verdict(values, names, radius, radii_f[index])
        for position, image in enumerate(index.tolist()):
            if verified[position]:
                decider[image] = names[int(which[position])]
            elif certified_by[position] is not None and certified[position] > current[image]:
                decider[image] = certified_by[position]
                current[image] = float(certified[position])
            if verified[position]:
                current[image] = max(current[image], float(radius[position]))
        return verified, score, certified

    probed = torch.zeros(batch, dtype=torch.int64)
    if probe_above_global:
        # One probe a tolerance above the global-Lipschitz radius: where the local bounds cannot beat the global
        # constant by more than the tolerance (the demo encoder at every benchmark R_F), it closes the bracket
        # by itself; where they can, the search doubles the bracket from there.
        wanted = (radii_f > 0).nonzero().squeeze(1)
        if wanted.numel():
            verified, _, certified = certify(upper[wanted], wanted)
            lower[wanted] = torch.where(verified, upper[wanted], torch.maximum(lower[wanted], certified))
            upper[wanted] = torch.where(verified, 2 * upper[wanted], upper[wanted])
            probed[wanted] = 1
    radius, steps = batched_binary_search(certify, lower, upper, tolerance=tolerance, max_steps=max_steps,
                                          should_stop=should_stop)
    if names != ("lipschitz",):
        radius = _confirm_in_float64(graph64, images, radii_f, radius, closed, names, decider, tolerance=tolerance,
                                     lipschitz_upper=lipschitz_upper, intermediate=intermediate,
                                     spec_chunk=spec_chunk, memory_budget_bytes=memory_budget_bytes,
                                     should_stop=should_stop)
    return radius, decider, steps + probed


def _confirm_in_float64(
    graph64: BoundGraph,
    images: torch.Tensor,
    radii_f: torch.Tensor,
    radius: torch.Tensor,
    closed: torch.Tensor,
    names: tuple[str, ...],
    decider: list[str],
    *,
    tolerance: float,
    **evaluation,
) -> torch.Tensor:
    """The float32 search's radii [batch], each re-proved in float64 with the same bounds (module docstring).

    A radius float64 rejects is tried once more at r/score (float64's own crossing where the bound is near-linear in
    r; at most a `tolerance` lower, the precision the search promises), then lowered to what
    either evaluation proves through a K·r bound, else to `closed` (the closed form, verified by construction).
    With "lipschitz" among `names` the closed form always counts; a single named bound answers with its own proof,
    and with the closed form only where that proves nothing. `decider` is updated in place."""
    searched = (radius > closed).nonzero().squeeze(1) if "lipschitz" in names else torch.arange(len(radius))
    if not searched.numel():
        return radius
    proven, proven_by, score = _prove_in_float64(graph64, images, radii_f, radius, searched, names, **evaluation)
    # where the bound is near-linear in r, r/score is float64's own crossing; never more than a tolerance below
    lowered = radius * torch.clamp((1 - 1e-6) / score, min=1 - tolerance, max=1)
    retry = searched[(proven[searched] < radius[searched]) & (lowered[searched] > proven[searched])]
    if retry.numel():
        again, again_by, _ = _prove_in_float64(graph64, images, radii_f, lowered, retry, names, **evaluation)
        for image in retry.tolist():
            if again[image] > proven[image]:
                proven[image], proven_by[image] = again[image], again_by[image]
    confirmed = radius.clone()
    for image in searched.tolist():
        counts = proven[image] > 0 and (proven[image] >= closed[image] or "lipschitz" not in names)
        confirmed[image] = proven[image] if counts else closed[image]
        decider[image] = proven_by[image] if counts else ("lipschitz" if closed[image] > 0 else names[0])
    return confirmed


def _prove_in_float64(
    graph64: BoundGraph, images: torch.Tensor, radii_f: torch.Tensor, radius: torch.Tensor, which_images: torch.Tensor,
    names: tuple[str, ...], *, lipschitz_upper: float, intermediate: str, spec_chunk: int, memory_budget_bytes: int,
    should_stop: StopCheck,
) -> tuple[torch.Tensor, list[str | None], torch.Tensor]:
    """For the images `which_images`: the radius one float64 evaluation of the bounds at `radius` proves (the radius
    itself where verified, a K·r bound's smaller one, else 0), the bound that proves it, and the evaluation's score
    (min UB·(1 + m)/R_F); [batch], 0 (score 1) elsewhere."""
    proven = torch.zeros_like(radius)
    scores = torch.ones_like(radius)
    proven_by: list[str | None] = [None] * len(radius)
    per_chunk = max(1, (images.shape[0] + 1) // 2)  # float64 takes twice the bytes the float32 chunk was sized for
    for start in range(0, len(which_images), per_chunk):
        index = which_images[start:start + per_chunk]
        values = feature_distance_upper(
            graph64, images[index.to(images.device)].to(torch.float64), radius[index].to(images.device), names,
            lipschitz_upper=lipschitz_upper, intermediate=intermediate, spec_chunk=spec_chunk,
            memory_budget_bytes=memory_budget_bytes, should_stop=should_stop,
        )
        verified, score, which, certified, certified_by = _verdict(values, names, radius[index], radii_f[index])
        proven[index] = torch.where(verified, radius[index], certified)
        scores[index] = torch.where(torch.isfinite(score) & (score > 0), score, torch.full_like(score, math.inf))
        for position, image in enumerate(index.tolist()):
            proven_by[image] = names[int(which[position])] if verified[position] else certified_by[position]
    return proven, proven_by, scores


def f2i_radius(
    model: nn.Module,
    images: torch.Tensor,
    feature_radii: torch.Tensor,
    *,
    bound: str = DEFAULT_BOUND,
    tolerance: float = 1e-3,
    max_steps: int = 30,
    lipschitz_upper: float | None = None,
    memory_budget_bytes: int | None = None,
    intermediate: str = "crown",
    should_stop: StopCheck = None,
) -> F2IResult:
    """For each image, the largest r found (relative `tolerance`) with UB(x, r) < R_F for the bound `bound`.

    `images` [batch, C, H, W], `feature_radii` [batch] (R_F >= 0; R_F = 0 gives R = 0). `lipschitz_upper` (a
    sound global bound, e.g. from the checkpoint metadata) is computed when None. The batch is processed in chunks
    whose CROWN state fits `memory_budget_bytes` (default 1 GiB), so any batch size runs. `intermediate` picks
    the intermediate bounds for the CROWN-based bounds ("crown" or "ibp"; "best_ibp" always uses "ibp").
    `bound="auto"` answers R_F·(1 - m)/L where the local bounds cannot beat it by more than `tolerance` and
    searches with "best_ibp" elsewhere (module docstring). `should_stop` (a cheap callable, e.g. "the client gave
    up") is polled before every bound evaluation and inside each; once true, SearchCancelled is raised and no
    radius is returned (bounds.cancellation). None (the default) never stops.
    """
    _bound_names(bound)
    if images.dim() != 4:
        raise ValueError(f"images must be [batch, C, H, W], got {tuple(images.shape)}")
    feature_radii = torch.as_tensor(feature_radii).reshape(-1)
    if feature_radii.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {feature_radii.shape[0]} feature radii")
    if bool((feature_radii < 0).any()) or not bool(torch.isfinite(feature_radii).all()):
        raise ValueError("feature radii must be finite and >= 0")
    if lipschitz_upper is None:
        lipschitz_upper = global_lipschitz_upper(model, tuple(images.shape[1:]))
    search = dict(tolerance=tolerance, max_steps=max_steps, lipschitz_upper=float(lipschitz_upper),
                  memory_budget_bytes=memory_budget_bytes, intermediate=intermediate, should_stop=should_stop)
    if bound != "auto":
        return _search(model, images, feature_radii, bound, **search)
    return _auto(model, images, feature_radii, **search)


def _auto(model: nn.Module, images: torch.Tensor, feature_radii: torch.Tensor, **search) -> F2IResult:
    """The closed form where the test of the module docstring passes, the AUTO_SEARCH search elsewhere."""
    lipschitz_upper = search["lipschitz_upper"]
    if lipschitz_upper <= 0:  # f is constant: nothing to decide, the search handles it as before
        return _search(model, images, feature_radii, AUTO_SEARCH, **search)
    radius = closed_form_radius(feature_radii, lipschitz_upper)
    deciders = ["lipschitz"] * images.shape[0]
    steps = torch.zeros(images.shape[0], dtype=torch.int64)
    if is_affine(model, tuple(images.shape[1:])):
        return F2IResult(radius, tuple(deciders), steps)
    device = module_device(model, images.device)
    wanted = (feature_radii > 0).nonzero().squeeze(1).cpu()
    candidates = images[wanted.to(images.device)].to(device=device, dtype=torch.float32)
    stop_if_asked(search["should_stop"])
    undecided = wanted[~global_radius_suffices(model, candidates, lipschitz_upper, search["tolerance"])]
    if undecided.numel():
        searched = _search(model, images[undecided.to(images.device)],
                           feature_radii[undecided.to(feature_radii.device)], AUTO_SEARCH, **search)
        radius[undecided] = searched.image_radius
        steps[undecided] = searched.search_steps
        for image, name in zip(undecided.tolist(), searched.bound, strict=True):
            deciders[image] = name
    return F2IResult(radius, tuple(deciders), steps)


def _search(
    model: nn.Module,
    images: torch.Tensor,
    feature_radii: torch.Tensor,
    bound: str,
    *,
    tolerance: float,
    max_steps: int,
    lipschitz_upper: float,
    memory_budget_bytes: int | None,
    intermediate: str,
    should_stop: StopCheck,
) -> F2IResult:
    """The batched search with one named bound (inputs already validated)."""
    names = _bound_names(bound)
    if bound == "best_ibp":
        intermediate = "ibp"
    device = module_device(model, images.device)
    shape = tuple(images.shape[1:])
    graph = build_graph(model, shape, dtype=torch.float32, device=device)
    images = images.to(device=device, dtype=torch.float32)
    radii_f = feature_radii.to(torch.float64).cpu()
    batch = images.shape[0]
    radius = closed_form_radius(radii_f, lipschitz_upper) if lipschitz_upper > 0 else torch.zeros_like(radii_f)
    deciders = ["lipschitz" if lipschitz_upper > 0 else names[0]] * batch
    steps = torch.zeros(batch, dtype=torch.int64)
    if names == ("lipschitz",) or batch == 0:
        return F2IResult(radius, tuple(deciders), steps)
    with torch.no_grad():
        scale = 1 + graph.forward(images).reshape(batch, -1).to(torch.float64).norm(dim=1).cpu()
        width = 1 + images.reshape(batch, -1).to(torch.float64).norm(dim=1).cpu()
        searched = ((radii_f >= LOCAL_BOUND_FLOOR * scale)
                    & (closed_form_radius(radii_f, max(lipschitz_upper, 1e-300)) <= LOCAL_BOUND_CEILING * width))
        searched = searched.nonzero().squeeze(1)
        if not searched.numel():
            return F2IResult(radius, tuple(deciders), steps)
        graph64 = build_graph(model, shape, dtype=torch.float64, device=device)
        budget = memory_budget_bytes if memory_budget_bytes is not None else DEFAULT_MEMORY_BUDGET_BYTES
        per_chunk, spec_chunk = _chunk_sizes(graph, names, len(searched), budget, itemsize=4)
        for start in range(0, len(searched), per_chunk):
            stop_if_asked(should_stop)
            index = searched[start:start + per_chunk]
            chunk_radius, decider, step = _search_chunk(
                graph, graph64, images[index.to(device)], radii_f[index], names,
                lipschitz_upper=lipschitz_upper, tolerance=tolerance, max_steps=max_steps,
                spec_chunk=spec_chunk, intermediate=intermediate, memory_budget_bytes=budget,
                should_stop=should_stop,
            )
            radius[index] = chunk_radius
            steps[index] = step
            for image, name in zip(index.tolist(), decider, strict=True):
                deciders[image] = name
    return F2IResult(radius, tuple(deciders), steps)
