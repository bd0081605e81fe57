"""F2I radii are sound: no random or PGD perturbation inside the certified radius moves the features by R_F."""

from __future__ import annotations

import pytest
import torch
from bounds_models import ENCODERS

from bounds import (
    BOUNDS_OFFERED,
    DEFAULT_BOUND,
    f2i_radius,
    feature_distance_upper,
    global_lipschitz_upper,
    pgd_feature_distance,
)
from bounds.graph import build_graph


def _random_distances(model, images, radius, samples, generator):
    """Feature distances of random perturbations on the sphere of `radius` [batch] (the worst of `samples`)."""
    worst = torch.zeros(images.shape[0], dtype=torch.float64)
    clean = model(images)
    for _ in range(samples):
        noise = torch.randn(images.shape, generator=generator)
        noise = noise * (radius / noise.reshape(images.shape[0], -1).norm(dim=1)).reshape(-1, 1, 1, 1)
        worst = torch.maximum(worst, (model(images + noise) - clean).norm(dim=1).double())
    return worst


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("encoder_name", sorted(ENCODERS))
def test_feature_distance_bounds_dominate_attacks(encoder_name, seed):
    build, shape = ENCODERS[encoder_name]
    model = build(seed)
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(4, *shape, generator=generator)
    graph = build_graph(model, shape)
    lipschitz = global_lipschitz_upper(model, shape)
    for radius_value in (0.05, 0.5, 2.0):
        radius = torch.full((4,), radius_value)
        upper = feature_distance_upper(graph, images, radius, ("lipschitz", "ibp", "crown", "crown_spectral",
                                                              "local_lipschitz"), lipschitz_upper=lipschitz)
        attacked, _ = pgd_feature_distance(model, images, radius, steps=30, restarts=2, generator=generator)
        with torch.no_grad():
            sampled = _random_distances(model, images, radius, 20, generator)
        for name, value in upper.items():
            assert (attacked <= value).all(), (name, radius_value, attacked, value)
            assert (sampled <= value).all(), (name, radius_value)


@pytest.mark.parametrize("bound", ["best", "best_ibp"])
@pytest.mark.parametrize("encoder_name", sorted(ENCODERS))
def test_f2i_radius_is_sound_and_reports_the_deciding_bound(encoder_name, bound):
    build, shape = ENCODERS[encoder_name]
    model = build(5)
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(3, *shape, generator=generator)
    feature_radii = torch.tensor([0.1, 0.5, 1.0])
    result = f2i_radius(model, images, feature_radii, bound=bound)
    assert result.image_radius.dtype == torch.float64 and result.search_steps.dtype == torch.int64
    assert set(result.bound) <= set(BOUNDS_OFFERED)
    attacked, _ = pgd_feature_distance(model, images, result.image_radius.float(), steps=40, restarts=3,
                                       generator=generator)
    assert (attacked < feature_radii.double()).all()
    lipschitz_only = f2i_radius(model, images, feature_radii, bound="lipschitz")
    assert (result.image_radius >= lipschitz_only.image_radius).all()


def test_lipschitz_radius_is_closed_form_and_zero_feature_radius_gives_zero():
    build, shape = ENCODERS["toy"]
    model = build(0)
    images = torch.rand(3, *shape)
    result = f2i_radius(model, images, torch.tensor([0.0, 0.5, 1.0]), bound="lipschitz", lipschitz_upper=2.0)
    torch.testing.assert_close(result.image_radius, torch.tensor([0.0, 0.25, 0.5], dtype=torch.float64),
                               rtol=2e-4, atol=0)
    assert (result.image_radius <= torch.tensor([0.0, 0.25, 0.5], dtype=torch.float64)).all()
    assert result.bound == ("lipschitz",) * 3


def test_memory_budget_chunks_without_changing_results():
    build, shape = ENCODERS["toy"]
    model = build(1)
    images = torch.rand(5, *shape, generator=torch.Generator().manual_seed(0))
    radii = torch.full((5,), 0.5)
    whole = f2i_radius(model, images, radii, bound="crown")
    chunked = f2i_radius(model, images, radii, bound="crown", memory_budget_bytes=1)
    # float32 batched kernels differ in the last bits with the batch layout; the radii agree to rounding
    torch.testing.assert_close(whole.image_radius, chunked.image_radius, rtol=1e-5, atol=0)


def test_unknown_bound_lists_the_valid_ones():
    build, shape = ENCODERS["toy"]
    with pytest.raises(ValueError, match="crown"):
        f2i_radius(build(0), torch.rand(1, *shape), torch.ones(1), bound="nope")
    assert DEFAULT_BOUND in BOUNDS_OFFERED
