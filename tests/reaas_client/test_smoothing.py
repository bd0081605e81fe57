"""The smoothing core against closed forms: a linear two-class h in feature space has an exact p_A."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from reaas_client.smoothing import ABSTAIN, GaussianFeatureSamples, Smooth, label_classifier


def linear_h(weight: torch.Tensor, bias: float) -> torch.nn.Module:
    """Two-class linear h: logits (0, w.z + b), so class 1 iff w.z + b > 0."""
    layer = torch.nn.Linear(weight.numel(), 2)
    with torch.no_grad():
        layer.weight.copy_(torch.stack([torch.zeros_like(weight), weight]))
        layer.bias.copy_(torch.tensor([0.0, bias]))
    return layer


def exact_p_a(weight: torch.Tensor, bias: float, z: torch.Tensor, sigma: float) -> float:
    """P(w.(z + e) + b > 0) for e ~ N(0, sigma^2 I): Phi(margin / (sigma ||w||))."""
    return float(norm.cdf(float(weight @ z + bias) / (sigma * float(weight.norm()))))


def true_radius(weight: torch.Tensor, bias: float, z: torch.Tensor) -> float:
    """For a linear two-class h the smoothed classifier equals h: its radius is the hyperplane distance."""
    return abs(float(weight @ z + bias)) / float(weight.norm())


@pytest.fixture
def setup() -> tuple[torch.Tensor, float, torch.Tensor]:
    torch.manual_seed(0)
    weight = torch.randn(8)
    z = torch.randn(8)
    bias = 0.3 * float(weight.norm()) - float(weight @ z)  # distance 0.3 to the hyperplane, class 1
    return weight, bias, z


def test_certify_matches_closed_form_on_linear_h(setup) -> None:
    weight, bias, z = setup
    sigma = 0.5
    smooth = Smooth(label_classifier(linear_h(weight, bias)), num_classes=2, sigma=sigma)
    cert = smooth.certify(GaussianFeatureSamples(z, sigma), n0=100, n=100_000, alpha=0.001,
                          generator=torch.Generator().manual_seed(1))
    p_a = exact_p_a(weight, bias, z, sigma)
    assert cert.prediction == 1
    assert cert.samples == 100_100
    # The lower bound lies below the exact p_A, by at most a few CP half-widths at n = 1e5.
    assert cert.p_a_lower <= p_a
    assert p_a - cert.p_a_lower < 4 * math.sqrt(p_a * (1 - p_a) / 100_000)
    assert cert.radius == pytest.approx(sigma * norm.ppf(cert.p_a_lower))
    assert cert.radius <= true_radius(weight, bias, z)
    assert cert.radius > 0.9 * true_radius(weight, bias, z)


def test_abstains_at_the_decision_boundary(setup) -> None:
    weight, _, z = setup
    bias = -float(weight @ z)  # z on the hyperplane: p_A = 1/2 exactly
    smooth = Smooth(label_classifier(linear_h(weight, bias)), num_classes=2, sigma=0.5)
    gen = torch.Generator().manual_seed(2)
    cert = smooth.certify(GaussianFeatureSamples(z, 0.5), n0=100, n=10_000, alpha=0.001, generator=gen)
    assert cert.prediction == ABSTAIN and cert.radius == 0.0
    assert smooth.predict(GaussianFeatureSamples(z, 0.5), n=10_000, alpha=0.001, generator=gen).prediction == ABSTAIN


def test_predict_returns_the_smoothed_class(setup) -> None:
    weight, bias, z = setup
    smooth = Smooth(label_classifier(linear_h(weight, bias)), num_classes=2, sigma=0.5)
    pred = smooth.predict(GaussianFeatureSamples(z, 0.5), n=1000, alpha=0.001,
                          generator=torch.Generator().manual_seed(3))
    assert pred.prediction == 1 and pred.samples == 1000


def test_over_claim_rate_stays_below_alpha(setup) -> None:
    """Over many seeded runs, the fraction of certificates that claim more than the true radius (or the
    wrong class) stays near or below alpha: the guarantee Clopper-Pearson gives."""
    weight, bias, z = setup
    sigma, alpha, trials = 0.5, 0.05, 400
    smooth = Smooth(label_classifier(linear_h(weight, bias)), num_classes=2, sigma=sigma)
    radius_true = true_radius(weight, bias, z)
    gen = torch.Generator().manual_seed(4)
    over_claims = 0
    for _ in range(trials):
        cert = smooth.certify(GaussianFeatureSamples(z, sigma), n0=20, n=200, alpha=alpha, generator=gen)
        if cert.prediction != ABSTAIN and (cert.prediction != 1 or cert.radius > radius_true):
            over_claims += 1
    assert over_claims / trials <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)


def test_same_seed_same_certificate(setup) -> None:
    weight, bias, z = setup
    smooth = Smooth(label_classifier(linear_h(weight, bias)), num_classes=2, sigma=0.5)
    certs = [smooth.certify(GaussianFeatureSamples(z, 0.5), n0=50, n=500, alpha=0.01,
                            generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert certs[0] == certs[1]


def test_short_sample_source_is_an_error(setup) -> None:
    weight, bias, z = setup
    smooth = Smooth(label_classifier(linear_h(weight, bias)), num_classes=2, sigma=0.5)

    def short_source(num: int, generator: torch.Generator):
        yield from GaussianFeatureSamples(z, 0.5)(num - 1, generator)

    with pytest.raises(RuntimeError, match="yielded"):
        smooth.certify(short_source, n0=10, n=100, alpha=0.01, generator=torch.Generator())


def test_a_million_feature_samples_in_bounded_batches() -> None:
    """REaaS-SC samples cost no query, so N = 10^6 is a normal setting: the source hands h at most `batch_size`
    samples at a time (memory independent of N) and the certificate approaches the exact radius."""
    weight, bias, z, sigma = torch.tensor([1.0, -2.0, 0.5]), 0.3, torch.tensor([1.0, 0.2, 0.4]), 0.5
    sizes: list[int] = []
    base = label_classifier(linear_h(weight, bias))

    def counting(batch: torch.Tensor) -> torch.Tensor:
        sizes.append(batch.shape[0])
        return base(batch)

    certificate = Smooth(counting, 2, sigma).certify(GaussianFeatureSamples(z, sigma, batch_size=50_000), 100,
                                                     1_000_000, 0.001, torch.Generator().manual_seed(0))
    assert sum(sizes) == 1_000_100 and max(sizes) <= 50_000
    exact = sigma * norm.ppf(exact_p_a(weight, bias, z, sigma))
    assert 0.98 * exact < certificate.radius < exact
