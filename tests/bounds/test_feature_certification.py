"""BC certificates: closed form for linear h; no perturbation inside the certified radius flips an MLP or a MaxMin
head; the Lipschitz-margin radius is exact for a linear h and never above what is certified for a ReLU MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bounds import SAFETY_MARGIN, certify_feature_radius, lipschitz_margin_radius, pgd_margin_attack
from bounds.feature_certification import body_lipschitz_upper, rounding_allowance
from bounds.layers import MaxMin
from bounds.lipschitz_layers import AOLLinear, materialize


def _linear_radius_reference(layer: nn.Linear, z: torch.Tensor) -> torch.Tensor:
    """The exact distance to where a margin reaches the certificate's rounding allowance."""
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    logits = z.double() @ w.T + b
    pred = logits.argmax(dim=1)
    allowance = rounding_allowance(logits)
    radii = []
    for i in range(z.shape[0]):
        y = int(pred[i])
        ratios = [(logits[i, y] - logits[i, j] - allowance[i]) / (w[y] - w[j]).norm() for j in range(w.shape[0])
                  if j != y]
        radii.append(min(ratios))
    return torch.stack(radii)


def test_linear_classifier_radius_is_the_exact_distance_to_the_boundary():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    z = torch.randn(16, 8)
    cert = certify_feature_radius(nn.Sequential(layer), z)
    reference = _linear_radius_reference(layer, z)
    assert (cert.feature_radius <= reference.clamp(min=0)).all()
    torch.testing.assert_close(cert.feature_radius, reference.clamp(min=0), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["crown", "ibp"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mlp_certificate_never_flips_under_attack(method, seed):
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 5)).eval()
    z = torch.randn(24, 6)
    cert = certify_feature_radius(mlp, z, method=method)
    assert torch.equal(cert.prediction, mlp(z).argmax(dim=1))
    assert (cert.feature_radius > 0).any()
    certified = cert.feature_radius > 0
    radius = cert.feature_radius[certified].float()
    worst, _ = pgd_margin_attack(mlp, z[certified], cert.prediction[certified], radius, steps=40, restarts=3,
                                 generator=torch.Generator().manual_seed(seed))
    assert (worst > 0).all()


def test_crown_certifies_at_least_as_much_as_ibp_on_average():
    torch.manual_seed(4)
    mlp = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    z = torch.randn(32, 6)
    crown = certify_feature_radius(mlp, z, method="crown").feature_radius
    ibp = certify_feature_radius(mlp, z, method="ibp").feature_radius
    assert crown.mean() >= ibp.mean()


def test_lipschitz_margin_radius_of_a_linear_h_is_the_closed_form():
    torch.manual_seed(1)
    layer = nn.Linear(8, 4)
    z = torch.randn(16, 8)
    prediction = layer(z).argmax(dim=1)
    torch.testing.assert_close(lipschitz_margin_radius(nn.Sequential(layer), z, prediction),
                               _linear_radius_reference(layer, z).clamp(min=0), rtol=1e-9, atol=0)


def _maxmin_head(seed: int, dim: int = 6, width: int = 16, classes: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    trainable = nn.Sequential(AOLLinear(dim, width, weight=torch.randn(width, dim)), MaxMin(),
                              AOLLinear(width, width, weight=torch.randn(width, width)), MaxMin(),
                              nn.Linear(width, classes))
    return materialize(trainable)


@pytest.mark.parametrize("seed", [0, 1])
def test_maxmin_head_certificate_survives_pgd(seed):
    """The Lipschitz-margin radius of an AOL/MaxMin head (its body constant at most 1 by AOL): a 100-step x
    5-restart l2 PGD finds no label change inside it."""
    head = _maxmin_head(seed)
    body = nn.Sequential(*list(head)[:-1])
    assert body_lipschitz_upper(body, 6) <= 1 + 1e-5
    z = 3 * torch.randn(32, 6, generator=torch.Generator().manual_seed(seed))
    cert = certify_feature_radius(head, z)
    assert torch.equal(cert.prediction, head(z).argmax(dim=1))
    # CROWN through MaxMin (wip-bounds) searches upward from the Lipschitz-margin radius: never below it
    margin_radius = lipschitz_margin_radius(head, z, cert.prediction)
    assert (cert.feature_radius >= margin_radius * (1 - SAFETY_MARGIN) * (1 - 1e-12)).all()
    certified = cert.feature_radius > 0
    assert certified.sum() > 16
    worst, _ = pgd_margin_attack(head, z[certified], cert.prediction[certified],
                                 cert.feature_radius[certified].float(), steps=100, restarts=5,
                                 generator=torch.Generator().manual_seed(seed))
    assert (worst > 0).all()


def test_relu_mlp_certificate_is_at_least_the_lipschitz_margin_radius():
    torch.manual_seed(5)
    mlp = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5)).eval()
    z = torch.randn(24, 6)
    cert = certify_feature_radius(mlp, z)
    margin_radius = lipschitz_margin_radius(mlp, z, cert.prediction)
    assert (margin_radius > 0).any()
    assert (cert.feature_radius >= margin_radius * (1 - SAFETY_MARGIN) * (1 - 1e-12)).all()


def test_float32_evaluation_never_flips_inside_the_radius_even_at_tiny_margins():
    """Points put on (nearly) the decision boundary: an exact margin of ~1e-7 is a tie for float32 h. The
    certificate must give them radius 0 (or one float32 PGD cannot break), never a radius that a float32 attack
    flips."""
    torch.manual_seed(3)
    layer = nn.Linear(8, 3)
    h = nn.Sequential(layer).eval()
    z = torch.randn(64, 8, dtype=torch.float64)
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    gap = w[0] - w[1]
    offset = (z @ gap + b[0] - b[1]) / gap.dot(gap)
    z = z - (offset - 1e-7)[:, None] * gap  # margin between classes 0 and 1 is now ~1e-7 * ||gap||^2
    z = z.float()
    cert = certify_feature_radius(h, z)
    worst, _ = pgd_margin_attack(h, z, cert.prediction, cert.feature_radius.float().clamp(min=1e-12), steps=50,
                                 restarts=2, generator=torch.Generator().manual_seed(0))
    certified = cert.feature_radius > 0
    assert bool((worst[certified] > 0).all())


def test_auto_certifies_a_maxmin_head_by_its_margin_and_a_relu_mlp_by_crown():
    head = _maxmin_head(5)
    z = torch.randn(24, 6)
    auto = certify_feature_radius(head, z, method="auto")
    margin = certify_feature_radius(head, z, method="margin")
    torch.testing.assert_close(auto.feature_radius, margin.feature_radius)
    torch.manual_seed(6)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    torch.testing.assert_close(certify_feature_radius(mlp, z, method="auto").feature_radius,
                               certify_feature_radius(mlp, z, method="crown").feature_radius)
    worst, _ = pgd_margin_attack(head, z, margin.prediction, margin.feature_radius.float().clamp(min=1e-12),
                                 steps=50, restarts=2, generator=torch.Generator().manual_seed(0))
    assert bool((worst[margin.feature_radius > 0] > 0).all())
