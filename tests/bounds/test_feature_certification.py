"""BC certificates: closed form for linear h; no perturbation inside the certified radius flips an MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bounds import certify_feature_radius


def _linear_radius_reference(layer: nn.Linear, z: torch.Tensor) -> torch.Tensor:
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    logits = z.double() @ w.T + b
    pred = logits.argmax(dim=1)
    radii = []
    for i in range(z.shape[0]):
        y = int(pred[i])
        ratios = [(logits[i, y] - logits[i, j]) / (w[y] - w[j]).norm() for j in range(w.shape[0]) if j != y]
        radii.append(min(ratios))
    return torch.stack(radii)


def test_linear_classifier_radius_is_the_exact_distance_to_the_boundary():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    z = torch.randn(16, 8)
    cert = certify_feature_radius(nn.Sequential(layer), z)
    reference = _linear_radius_reference(layer, z)
    assert (cert.feature_radius <= reference).all()
    torch.testing.assert_close(cert.feature_radius, reference, rtol=2e-4, atol=1e-6)


def _worst_margin(mlp: nn.Module, z: torch.Tensor, pred: torch.Tensor, radius: torch.Tensor, generator) -> torch.Tensor:
    """PGD minimising the margin h_y - max_{j != y} h_j on the l2 ball; returns the smallest margin found."""
    best = torch.full((z.shape[0],), float("inf"))
    for _ in range(3):
        delta = torch.randn(z.shape, generator=generator)
        delta = delta * (radius / delta.norm(dim=1)).unsqueeze(1)
        for step in range(40):
            delta.requires_grad_(True)
            logits = mlp(z + delta)
            own = logits.gather(1, pred.unsqueeze(1)).squeeze(1)
            others = logits.scatter(1, pred.unsqueeze(1), float("-inf")).max(dim=1).values
            margin = own - others
            best = torch.minimum(best, margin.detach())
            (grad,) = torch.autograd.grad(margin.sum(), delta)
            with torch.no_grad():
                delta = delta - (0.3 * (1 - step / 40) + 0.02) * radius.unsqueeze(1) * grad / grad.norm(
                    dim=1, keepdim=True).clamp(min=1e-30)
                delta = delta * torch.clamp(radius / delta.norm(dim=1).clamp(min=1e-30), max=1.0).unsqueeze(1)
    return best


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
    worst = _worst_margin(mlp, z[certified], cert.prediction[certified], radius, torch.Generator().manual_seed(seed))
    assert (worst > 0).all()


def test_crown_certifies_at_least_as_much_as_ibp_on_average():
    torch.manual_seed(4)
    mlp = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    z = torch.randn(32, 6)
    crown = certify_feature_radius(mlp, z, method="crown").feature_radius
    ibp = certify_feature_radius(mlp, z, method="ibp").feature_radius
    assert crown.mean() >= ibp.mean()
