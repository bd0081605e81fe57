"""Margin heads: the loss is in distance units (no collapse at a large eps), the linear and prototype heads'
certificates are exact (no attack flips them inside R_F, the nearest boundary point just outside does), the
lipschitz head's survives PGD, and every head kind trains on noisy features."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bounds import SAFETY_MARGIN, certify_feature_radius, pgd_margin_attack
from bounds.feature_certification import rounding_allowance
from bounds.layers import ClassMax, MaxMin
from reaas_client.downstream import TrainConfig, accuracy, train_classifier
from reaas_client.heads import HEAD_KINDS, PrototypeHead, lipschitz_margin_loss


def blobs(count: int, seed: int, spacing: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 8 dimensions (centres `spacing` apart along axes, unit noise), shifted off the
    origin so the head's centring matters."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 3
    return 5.0 + spacing * torch.eye(3, 8)[labels] + torch.randn(count, 8, generator=generator), labels


def test_margin_loss_is_in_distance_units() -> None:
    generator = torch.Generator().manual_seed(0)
    logits, weight = torch.randn(7, 4, generator=generator), torch.randn(4, 5, generator=generator)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    loss = lipschitz_margin_loss(logits, labels, weight, margin=0.5, temperature=0.25)
    # scaling W (and with it the logits) moves no certified distance, so not the loss: a head cannot lower it
    # by merging its class rows (the collapse of issue 21)
    torch.testing.assert_close(lipschitz_margin_loss(10 * logits, labels, 10 * weight, margin=0.5, temperature=0.25),
                               loss)
    # by hand for one input: log(1 + sum_j exp((eps - d_j) / t)), d_j = (z_y - z_j) / ||w_y - w_j||
    distance = (logits[0, 0] - logits[0, 1:]) / (weight[0] - weight[1:]).norm(dim=1)
    expected = torch.log1p(torch.exp((0.5 - distance) / 0.25).sum())
    torch.testing.assert_close(lipschitz_margin_loss(logits[:1], labels[:1], weight, margin=0.5, temperature=0.25),
                               expected)
    assert loss > lipschitz_margin_loss(logits, labels, weight, margin=0.0, temperature=0.25)


def test_a_head_at_a_margin_beyond_reach_does_not_collapse_to_one_class() -> None:
    """eps far above what the blobs allow (centres 3 apart, radius <= 1.5 on average): the head must still
    separate the classes rather than merge its rows into one answer."""
    train, labels = blobs(300, 0)
    z, z_labels = blobs(60, 1)
    for head in ("linear", "lipschitz", "orthogonal", "prototype"):
        h = train_classifier(train, labels, 3, TrainConfig(head=head, hidden=(32, 32), margin=6.0, epochs=30,
                                                           lr=None if head == "prototype" else 1e-2))
        with torch.no_grad():
            predicted = h(z).argmax(dim=1)
        assert predicted.unique().numel() == 3, head
        assert accuracy(h, z, z_labels) > 0.8, head


def _exact_linear_radius(layer: nn.Linear, z: torch.Tensor, prediction: torch.Tensor, *, allowance: bool = False):
    """(radius, index of the nearest boundary j, its unit normal) of a linear h, in float64: the distance to where
    a margin reaches 0, or (`allowance`) the certificate's rounding allowance."""
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    logits = z.double() @ w.T + b
    gaps = w[prediction].unsqueeze(1) - w.unsqueeze(0)  # [batch, K, dim]
    shift = rounding_allowance(logits).unsqueeze(1) if allowance else 0.0
    ratios = (logits.gather(1, prediction[:, None]) - logits - shift) / gaps.norm(dim=-1)
    ratios.scatter_(1, prediction[:, None], float("inf"))
    radius, nearest = ratios.min(dim=1)
    normal = gaps[torch.arange(z.shape[0]), nearest]
    return radius, nearest, normal / normal.norm(dim=1, keepdim=True)


def test_linear_head_certificate_is_exact() -> None:
    train, labels = blobs(300, 0)
    h = train_classifier(train, labels, 3, TrainConfig(head="linear", margin=1.0, epochs=30, lr=1e-2))
    assert len(h) == 1 and isinstance(h[0], nn.Linear)
    z, z_labels = blobs(60, 1)
    assert accuracy(h, z, z_labels) > 0.9
    cert = certify_feature_radius(h, z)
    radius, _, normal = _exact_linear_radius(h[0], z, cert.prediction)
    certified_boundary, _, _ = _exact_linear_radius(h[0], z, cert.prediction, allowance=True)
    assert (cert.feature_radius <= certified_boundary).all()
    torch.testing.assert_close(cert.feature_radius, certified_boundary, rtol=2 * SAFETY_MARGIN, atol=1e-7)
    # the allowance costs little: under 1e-3 feature units (features ~5 from the origin, ||W|| ~1)
    assert (cert.feature_radius >= radius - 1e-3).all()
    worst, _ = pgd_margin_attack(h, z, cert.prediction, cert.feature_radius.float(), steps=50, restarts=2,
                                 generator=torch.Generator().manual_seed(0))
    assert (worst > 0).all()
    # 0.1 % beyond R_F towards the nearest boundary the label changes: nothing is left on the table
    beyond = (z.double() - 1.001 * radius[:, None] * normal).float()
    with torch.no_grad():
        assert (h(beyond).argmax(dim=1) != cert.prediction).all()


@pytest.mark.parametrize("head", ["lipschitz", "orthogonal"])
def test_lipschitz_head_is_servable_and_its_certificate_survives_pgd(head: str) -> None:
    train, labels = blobs(300, 0)
    config = TrainConfig(head=head, hidden=(32, 32), margin=1.0, epochs=30, lr=1e-2)
    h = train_classifier(train, labels, 3, config)
    # materialised: plain layers bounds/ certifies, no parametrisation left behind
    assert all(type(m) in (nn.Linear, MaxMin) for m in h)
    body_norms = [float(torch.linalg.matrix_norm(m.weight.detach().double(), 2)) for m in h[:-1] if isinstance(m, nn.Linear)]
    assert max(body_norms) <= 1 + 1e-5
    if head == "orthogonal":  # an isometry, not merely 1-Lipschitz: every singular value is 1
        assert all(float(torch.linalg.svdvals(m.weight.detach().double()).min()) > 1 - 1e-5
                   for m in h[:-1] if isinstance(m, nn.Linear))
    z, z_labels = blobs(60, 1)
    assert accuracy(h, z, z_labels) > 0.9
    cert = certify_feature_radius(h, z)
    certified = cert.feature_radius > 0
    assert cert.feature_radius[certified].mean() > 0.5
    worst, _ = pgd_margin_attack(h, z[certified], cert.prediction[certified], cert.feature_radius[certified].float(),
                                 steps=100, restarts=5, generator=torch.Generator().manual_seed(0))
    assert (worst > 0).all()


def test_prototype_head_is_served_max_affine_and_certified_exactly() -> None:
    train, labels = blobs(300, 0)
    h = train_classifier(train, labels, 3, TrainConfig(head="prototype", prototypes=4, margin=1.5, epochs=40))
    assert len(h) == 2 and isinstance(h[0], nn.Linear) and isinstance(h[1], ClassMax) and h[1].pieces == 4
    centres = h[0].weight.detach().double() / 2  # piece p scores 2 c_p · z - ||c_p||^2
    torch.testing.assert_close(h[0].bias.detach().double(), -centres.square().sum(dim=1), rtol=1e-5, atol=1e-4)
    z, z_labels = blobs(60, 1)
    with torch.no_grad():  # the served form answers the nearest prototype's class
        assert torch.equal(h(z).argmax(dim=1), torch.cdist(z.double(), centres).argmin(dim=1) // 4)
    assert accuracy(h, z, z_labels) > 0.9
    cert = certify_feature_radius(h, z)
    certified = cert.feature_radius > 0
    assert cert.feature_radius[certified].mean() > 0.5
    # the training bound (unsmoothed) is a sound radius the exact certificate can only improve on
    # (less the rounding allowance it keeps every margin above: at most allowance / min ||w_a - w_b|| in distance)
    with torch.no_grad():
        trained = PrototypeHead(centres, 4).certified_distance(z.double(), cert.prediction, softness=0.0)
        allowance = rounding_allowance(h(z)) / (2 * torch.pdist(centres).min())
    assert (cert.feature_radius >= (trained.clamp(min=0) - allowance) * (1 - SAFETY_MARGIN) - 1e-9).all()
    worst, _ = pgd_margin_attack(h.double(), z[certified].double(), cert.prediction[certified],
                                 cert.feature_radius[certified], steps=100, restarts=5,
                                 generator=torch.Generator().manual_seed(0))
    assert (worst > 0).all()
    beyond, _ = pgd_margin_attack(h.double(), z[certified].double(), cert.prediction[certified],
                                  cert.feature_radius[certified] * 1.01, steps=200, restarts=5,
                                  generator=torch.Generator().manual_seed(0))
    assert (beyond < 0).float().mean() > 0.8  # exact: 1 % further out, the label changes


def test_a_larger_margin_certifies_larger_radii() -> None:
    train, labels = blobs(300, 0)
    z, z_labels = blobs(60, 1)
    acr = []
    for margin in (0.0, 1.5):
        h = train_classifier(train, labels, 3, TrainConfig(head="linear", margin=margin, epochs=30, lr=1e-2))
        cert = certify_feature_radius(h, z)
        acr.append(float(torch.where(cert.prediction == z_labels, cert.feature_radius, 0.0).mean()))
    assert acr[1] > acr[0]


@pytest.mark.parametrize("head", HEAD_KINDS)
def test_every_head_trains_on_noisy_features(head: str) -> None:
    train, labels = blobs(300, 0, spacing=4.0)
    test, test_labels = blobs(300, 1, spacing=4.0)
    config = TrainConfig(head=head, hidden=(32,), margin=0.5, epochs=60, lr=1e-2, noise_sigma=1.0, seed=2)
    h = train_classifier(train, labels, 3, config)
    assert accuracy(h, test, test_labels) > 0.9
    again = train_classifier(train, labels, 3, config)  # seeded noise: the same h
    assert all(torch.equal(a, b) for a, b in zip(h.state_dict().values(), again.state_dict().values(), strict=True))


def test_unknown_head_or_odd_lipschitz_width_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown head"):
        TrainConfig(head="resnet")
    with pytest.raises(ValueError, match="even"):
        train_classifier(*blobs(30, 0), 3, TrainConfig(head="lipschitz", hidden=(15,), epochs=1))


def test_consistency_penalty_is_zero_for_agreeing_views_and_positive_otherwise() -> None:
    from reaas_client.heads import consistency_penalty

    same = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]).repeat(2, 1)  # 2 copies of 2 inputs, views agree
    apart = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])
    assert consistency_penalty(same, 2, 1.0, entropy_weight=0.0) < 1e-6
    assert consistency_penalty(apart, 2, 1.0, entropy_weight=0.0) > 1.0
    with pytest.raises(ValueError, match="copies"):
        consistency_penalty(apart, 3, 1.0)


def test_consistency_training_keeps_noisy_heads_accurate() -> None:
    train, labels = blobs(300, 0, spacing=4.0)
    test, test_labels = blobs(300, 1, spacing=4.0)
    for head in ("mlp", "lipschitz"):
        config = TrainConfig(head=head, hidden=(32,), margin=0.5, epochs=40, lr=1e-2, noise_sigma=1.0,
                             consistency=5.0)
        assert accuracy(train_classifier(train, labels, 3, config), test, test_labels) > 0.9, head


def test_copy_views_are_distinct_copies_of_one_input_copy_major() -> None:
    from reaas_client.downstream import copy_views

    inputs = torch.tensor([4, 0, 7])
    rows = copy_views(inputs, 25, 2, torch.Generator().manual_seed(0)).view(2, 3)  # [views, inputs]
    assert bool((rows // 25 == inputs).all())  # each column: copies of its own input
    assert bool((rows[0] != rows[1]).all())  # two different noisy copies


def test_consistency_over_premade_noisy_copies_trains_and_checks_the_grouping() -> None:
    """SEaaS-SC's case: 5 noisy copies per input made before h sees them (no noise added while training)."""
    train, labels = blobs(60, 0, spacing=4.0)
    copies = train.repeat_interleave(5, dim=0) + torch.randn(300, train.shape[1],
                                                            generator=torch.Generator().manual_seed(2))
    test, test_labels = blobs(300, 1, spacing=4.0)
    config = TrainConfig(hidden=(32,), epochs=60, lr=1e-2, consistency=5.0)
    h = train_classifier(copies, labels.repeat_interleave(5), 3, config, copies_per_input=5)
    assert accuracy(h, test, test_labels) > 0.9
    with pytest.raises(ValueError, match="groups of 7"):
        train_classifier(copies, labels.repeat_interleave(5), 3, config, copies_per_input=7)
