"""F2I radii stay sound at tiny feature radii (issue 25), where float32 can no longer represent the ball, and every
bound answers at absurdly large ones, where a float32 search would overflow.

At R_F = 1e-9 a float32 IBP search once certified radii whose feature distance, measured in float64, was 2x R_F
(1 000x at 1e-12): x ± r rounded onto x. The attack here runs on a float64 copy of the model, so it measures the
function the certificate is about, not float32's rounding of it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from bounds_models import ENCODERS, MAXMIN_ENCODERS

from bounds import BOUNDS_OFFERED, SAFETY_MARGIN, f2i_radius, global_lipschitz_upper, pgd_feature_distance
from bounds.f2i import LOCAL_BOUND_CEILING, LOCAL_BOUND_FLOOR, SMALLEST_FEATURE_RADIUS, closed_form_radius

ALL_ENCODERS = {**ENCODERS, **MAXMIN_ENCODERS}
TINY_RADII = (1e-6, 1e-8, 1e-10, 1e-12)


def _float64_attack(model: torch.nn.Module, images: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    exact = copy.deepcopy(model).double().eval()
    distance, _ = pgd_feature_distance(exact, images.double(), radius.double(), steps=30, restarts=2,
                                       generator=torch.Generator().manual_seed(0))
    return distance


@pytest.mark.parametrize("encoder_name", sorted(ALL_ENCODERS))
@pytest.mark.parametrize("bound", ["auto", "ibp", "best_ibp", "local_lipschitz"])
def test_tiny_feature_radii_are_never_over_certified(encoder_name, bound):
    build, shape = ALL_ENCODERS[encoder_name]
    model = build(0).eval()
    images = torch.rand(3, *shape, generator=torch.Generator().manual_seed(1))
    lipschitz = global_lipschitz_upper(model, shape)
    for feature_radius in TINY_RADII:
        radii = torch.full((3,), feature_radius)
        result = f2i_radius(model, images, radii, bound=bound, tolerance=1e-2, lipschitz_upper=lipschitz)
        assert bool((result.image_radius > 0).all()), (feature_radius, result)
        distance = _float64_attack(model, images, result.image_radius)
        assert bool((distance < feature_radius).all()), (encoder_name, bound, feature_radius, distance / feature_radius)


def _model_images_lipschitz(encoder_name: str, seed: int):
    """A test encoder, two seeded images and its global Lipschitz upper bound."""
    build, shape = ALL_ENCODERS[encoder_name]
    model = build(0).eval()
    images = torch.rand(2, *shape, generator=torch.Generator().manual_seed(seed))
    return model, images, global_lipschitz_upper(model, shape)


@pytest.mark.parametrize("encoder_name", ["toy", "random_maxmin"])
def test_every_bound_answers_the_closed_form_below_the_floor(encoder_name):
    model, images, lipschitz = _model_images_lipschitz(encoder_name, seed=2)
    radii = torch.full((2,), LOCAL_BOUND_FLOOR / 10)  # below LOCAL_BOUND_FLOOR·(1 + ||f(x)||) whatever f(x)
    for bound in BOUNDS_OFFERED:
        result = f2i_radius(model, images, radii, bound=bound, lipschitz_upper=lipschitz)
        assert torch.equal(result.image_radius, closed_form_radius(radii, lipschitz)), bound
        assert result.bound == ("lipschitz", "lipschitz") and int(result.search_steps.sum()) == 0


def test_radii_below_the_smallest_normal_range_certify_nothing():
    build, shape = ENCODERS["toy"]
    model = build(0).eval()
    radii = torch.tensor([SMALLEST_FEATURE_RADIUS / 2, 1e-300, 5e-324], dtype=torch.float64)
    result = f2i_radius(model, torch.rand(3, *shape), radii, bound="auto", lipschitz_upper=0.5)
    assert torch.equal(result.image_radius, torch.zeros(3, dtype=torch.float64))
    smallest = closed_form_radius(torch.tensor([SMALLEST_FEATURE_RADIUS]), 1e6)
    assert float(smallest) * 1e6 * (1 + SAFETY_MARGIN) < SMALLEST_FEATURE_RADIUS


@pytest.mark.parametrize("encoder_name", ["mnist_cnn", "random_maxmin"])
def test_every_bound_is_total_at_huge_feature_radii(encoder_name):
    """R_F = 1e308 once ended in a failed eigendecomposition (INTERNAL): above the ceiling the closed form answers."""
    model, images, lipschitz = _model_images_lipschitz(encoder_name, seed=3)
    radii = torch.tensor([1e308, lipschitz * LOCAL_BOUND_CEILING * (2 + images[1].norm().item())], dtype=torch.float64)
    for bound in BOUNDS_OFFERED:
        result = f2i_radius(model, images, radii, bound=bound, lipschitz_upper=lipschitz)
        assert torch.equal(result.image_radius, closed_form_radius(radii, lipschitz)), bound
        assert bool(torch.isfinite(result.image_radius).all())
