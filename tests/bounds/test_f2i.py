"""F2I radii are sound: no random or PGD perturbation inside the certified radius moves the features by R_F."""

from __future__ import annotations

import pytest
import torch
from bounds_models import ENCODERS

import bounds.f2i
from bounds import (
    BOUNDS_OFFERED,
    DEFAULT_BOUND,
    SAFETY_MARGIN,
    SearchCancelled,
    UnsupportedLayerError,
    f2i_radius,
    feature_distance_upper,
    global_lipschitz_upper,
    pgd_feature_distance,
)
from bounds.graph import build_graph

SEARCH_TOLERANCE = 1e-3  # f2i_radius's default relative tolerance


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
    # float32 batched kernels differ in the last bits with the batch layout, so a probe that lands within rounding
    # of R_F can go either way: the two searches agree to their relative tolerance (1e-3), and both are sound
    torch.testing.assert_close(whole.image_radius, chunked.image_radius, rtol=2 * SEARCH_TOLERANCE, atol=0)
    _assert_survives_pgd(model, images, chunked, radii, 0)


def test_unknown_bound_lists_the_valid_ones():
    build, shape = ENCODERS["toy"]
    with pytest.raises(ValueError, match="crown"):
        f2i_radius(build(0), torch.rand(1, *shape), torch.ones(1), bound="nope")
    assert DEFAULT_BOUND in BOUNDS_OFFERED


# -- the "auto" default --------------------------------------------------------------------------------------------


def _pca_like(seed: int) -> torch.nn.Module:
    """Flatten + Linear with orthonormal rows (a PCA-16 stand-in on 1x8x8): affine, L = 1."""
    rows = torch.linalg.qr(torch.randn(64, 16, generator=torch.Generator().manual_seed(seed))).Q.T.contiguous()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16))
    with torch.no_grad():
        model[1].weight.copy_(rows)
        model[1].bias.uniform_(-1, 1)
    return model.eval()


def _aol_maxmin(seed: int) -> tuple[torch.nn.Module, float]:
    """A materialized AOL + MaxMin MLP on 1x8x8 and a sound L (the product of its layers' exact norms)."""
    from bounds.layers import MaxMin
    from bounds.lipschitz_layers import AOLLinear, materialize
    from bounds.spectral import matrix_norm_upper

    torch.manual_seed(seed)
    model = materialize(torch.nn.Sequential(torch.nn.Flatten(), AOLLinear(64, 32), MaxMin(), AOLLinear(32, 32),
                                            MaxMin(), AOLLinear(32, 8)))
    lipschitz = 1.0
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            lipschitz *= float(matrix_norm_upper(layer.weight.detach()))
    return model, lipschitz


def _assert_survives_pgd(model, images, result, feature_radii, seed):
    attacked, _ = pgd_feature_distance(model, images, result.image_radius.float(), steps=100, restarts=5,
                                       generator=torch.Generator().manual_seed(seed))
    assert (attacked < feature_radii.double()).all(), (attacked, feature_radii)


def test_auto_is_the_default_and_every_old_bound_name_stays_valid():
    assert DEFAULT_BOUND == "auto"
    assert {"lipschitz", "ibp", "crown", "crown_spectral", "local_lipschitz", "best", "best_ibp"} < set(BOUNDS_OFFERED)


@pytest.mark.parametrize("build", [_pca_like, lambda seed: torch.nn.Sequential(torch.nn.Flatten()).eval()])
def test_auto_on_an_affine_encoder_is_the_closed_form_with_no_search(build):
    model = build(0)
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    feature_radii = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0, 3.0])
    lipschitz = global_lipschitz_upper(model, (1, 8, 8))
    result = f2i_radius(model, images, feature_radii)
    expected = feature_radii.double() * (1 - SAFETY_MARGIN) / lipschitz
    assert torch.equal(result.image_radius, expected)
    assert result.bound == ("lipschitz",) * 6 and int(result.search_steps.sum()) == 0
    _assert_survives_pgd(model, images, result, feature_radii.clamp(min=1e-12), 0)


def test_auto_where_local_bounds_pay_gives_the_best_ibp_radius():
    build, shape = ENCODERS["toy"]  # untrained ReLU net: ||J(x)|| far below its global bound
    model = build(3)
    images = torch.rand(3, *shape, generator=torch.Generator().manual_seed(3))
    feature_radii = torch.tensor([0.1, 0.5, 1.0])
    auto = f2i_radius(model, images, feature_radii)
    best_ibp = f2i_radius(model, images, feature_radii, bound="best_ibp")
    # the same search on the same bound, run twice: equal up to a probe that rounding tips (the search tolerance)
    torch.testing.assert_close(auto.image_radius, best_ibp.image_radius, rtol=2 * SEARCH_TOLERANCE, atol=0)
    assert auto.bound == best_ibp.bound and (auto.search_steps > 0).all()
    _assert_survives_pgd(model, images, auto, feature_radii, 3)


def test_auto_radius_survives_pgd_on_the_demo_encoder():
    from robust_pretrain import load_demo_encoder

    demo = load_demo_encoder()
    images = torch.rand(2, *demo.metadata.input_shape, generator=torch.Generator().manual_seed(1))
    feature_radii = torch.tensor([0.05, 0.5])
    result = f2i_radius(demo.model, images, feature_radii, lipschitz_upper=demo.metadata.lipschitz_upper)
    _assert_survives_pgd(demo.model, images, result, feature_radii, 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_auto_closed_form_on_an_aol_maxmin_net_survives_pgd(seed):
    model, lipschitz = _aol_maxmin(seed)
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    feature_radii = torch.tensor([0.01, 0.1, 0.5, 1.0])
    # a tolerance the random net's ||J(x)|| / L clears, so every image is decided without the bound graph
    result = f2i_radius(model, images, feature_radii, lipschitz_upper=lipschitz, tolerance=0.2)
    assert result.bound == ("lipschitz",) * 4 and int(result.search_steps.sum()) == 0
    _assert_survives_pgd(model, images, result, feature_radii, seed)


def test_auto_on_an_aol_maxmin_net_at_the_default_tolerance_survives_pgd():
    model, lipschitz = _aol_maxmin(2)
    try:
        build_graph(model, (1, 8, 8))
    except UnsupportedLayerError:
        pytest.skip("MaxMin is not in the bounds vocabulary yet (branch wip-bounds)")
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    feature_radii = torch.tensor([0.01, 0.1, 0.5])
    result = f2i_radius(model, images, feature_radii, lipschitz_upper=lipschitz)
    assert (result.image_radius >= feature_radii.double() * (1 - SAFETY_MARGIN) / lipschitz).all()
    _assert_survives_pgd(model, images, result, feature_radii, 2)


def test_jacobian_norm_lower_never_exceeds_the_exact_norm():
    from bounds.pointwise_jacobian import jacobian_norm_lower
    from bounds.spectral import matrix_norm_upper

    build, shape = ENCODERS["mnist_cnn"]
    model = build(0)
    images = torch.rand(3, *shape, generator=torch.Generator().manual_seed(0))
    exact = torch.stack([
        matrix_norm_upper(torch.autograd.functional.jacobian(model, image.unsqueeze(0)).reshape(32, -1))
        for image in images
    ])
    lower = jacobian_norm_lower(model, images, max_iterations=30, generator=torch.Generator().manual_seed(0))
    assert (lower <= exact).all() and (lower >= 0.9 * exact).all(), (lower, exact)


def test_jacobian_norm_lower_from_many_threads_at_once():
    """The server searches concurrent F2I calls in threads; torch's forward-AD levels are process-global, so
    unguarded jvp calls from several threads break each other (this test failed before the lock)."""
    import threading

    from bounds.pointwise_jacobian import jacobian_norm_lower

    build, shape = ENCODERS["mnist_cnn"]
    model = build(0)
    images = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    alone = jacobian_norm_lower(model, images, generator=torch.Generator().manual_seed(0))
    answers, errors = [], []

    def work() -> None:
        try:
            for _ in range(30):
                answers.append(jacobian_norm_lower(model, images, generator=torch.Generator().manual_seed(0)))
        except Exception as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(torch.equal(answer, alone) for answer in answers)


# -- cancellation --------------------------------------------------------------------------------------------------


def _count_bound_evaluations(monkeypatch) -> list[int]:
    """One entry per bound evaluation the search starts (every search step goes through feature_distance_upper)."""
    started: list[int] = []
    real = bounds.f2i.feature_distance_upper

    def counted(*args, **kwargs):
        started.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bounds.f2i, "feature_distance_upper", counted)
    return started


@pytest.mark.parametrize("bound", ["crown", "best", "auto"])
def test_should_stop_cancels_the_search_within_one_bound_evaluation(monkeypatch, bound):
    build, shape = ENCODERS["toy"]
    model = build(3)  # an untrained ReLU net: "auto" searches here too
    images = torch.rand(3, *shape, generator=torch.Generator().manual_seed(3))
    feature_radii = torch.tensor([0.1, 0.5, 1.0])
    started = _count_bound_evaluations(monkeypatch)
    f2i_radius(model, images, feature_radii, bound=bound)
    uncancelled = len(started)
    assert uncancelled > 3, "the search must need several evaluations for this test to mean anything"

    started.clear()
    flipped_at: list[int] = []

    def should_stop() -> bool:
        # flips once the second evaluation has begun, i.e. while it is in flight
        if len(started) >= 2 and not flipped_at:
            flipped_at.append(len(started))
        return bool(flipped_at)

    with pytest.raises(SearchCancelled):
        f2i_radius(model, images, feature_radii, bound=bound, should_stop=should_stop)
    assert flipped_at == [2]
    assert len(started) - flipped_at[0] <= 1, "evaluations kept starting after should_stop turned true"
    assert len(started) == 2  # in fact none: the one in flight stopped and no other began


def test_one_crown_evaluation_polls_should_stop_between_layers_and_stops_mid_way():
    build, shape = ENCODERS["mnist_cnn"]
    model = build(0)
    graph = build_graph(model, shape)
    images = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    radius = torch.full((2,), 0.5)
    names = ("crown", "local_lipschitz")
    polls: list[int] = []

    def never() -> bool:
        polls.append(1)
        return False

    feature_distance_upper(graph, images, radius, names, lipschitz_upper=1.0, should_stop=never)
    uncancelled = len(polls)
    assert uncancelled >= len(graph.nodes), "polled at least once per layer of the CROWN backward pass"

    polls.clear()

    def halfway() -> bool:
        polls.append(1)
        return len(polls) >= uncancelled // 2

    with pytest.raises(SearchCancelled):
        feature_distance_upper(graph, images, radius, names, lipschitz_upper=1.0, should_stop=halfway)
    assert len(polls) == uncancelled // 2  # it stopped at the first true answer


@pytest.mark.parametrize("bound", ["crown", "best", "auto"])
def test_a_should_stop_that_never_fires_changes_no_result(bound):
    build, shape = ENCODERS["toy"]
    model = build(3)
    images = torch.rand(3, *shape, generator=torch.Generator().manual_seed(3))
    feature_radii = torch.tensor([0.1, 0.5, 1.0])
    plain = f2i_radius(model, images, feature_radii, bound=bound)
    polled = f2i_radius(model, images, feature_radii, bound=bound, should_stop=lambda: False)
    assert torch.equal(plain.image_radius, polled.image_radius)
    assert torch.equal(plain.search_steps, polled.search_steps) and plain.bound == polled.bound
