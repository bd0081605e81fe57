"""Downstream MLP training and the class-balanced subsets the CLI, demo and benchmark certify."""

from __future__ import annotations

import torch
from torch import nn

from reaas_client.downstream import TrainConfig, accuracy, build_mlp, stratified_subset, train_classifier


def blobs(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated Gaussian blobs in 8 dimensions (centres 4 apart, unit noise)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 3
    centres = 4.0 * torch.eye(3, 8)
    return centres[labels] + torch.randn(count, 8, generator=generator), labels


def test_mlp_is_made_of_linear_and_relu_only() -> None:
    """bounds.certify_feature_radius accepts exactly Sequential(Linear, ReLU, ...)."""
    model = build_mlp(16, 10, (32, 32))
    assert all(isinstance(m, nn.Linear | nn.ReLU) for m in model)
    assert model(torch.zeros(2, 16)).shape == (2, 10)


def test_training_separates_blobs_with_and_without_feature_noise() -> None:
    train, train_labels = blobs(300, 0)
    test, test_labels = blobs(300, 1)
    for sigma in (0.0, 1.0):
        model = train_classifier(train, train_labels, 3, TrainConfig(hidden=(32,), epochs=20, lr=1e-2, noise_sigma=sigma))
        assert accuracy(model, test, test_labels) > 0.95


def test_training_is_deterministic_given_the_seed() -> None:
    train, labels = blobs(90, 0)
    config = TrainConfig(hidden=(16,), epochs=3, noise_sigma=0.5, seed=3)
    first, second = (train_classifier(train, labels, 3, config) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                 strict=True))


def test_stratified_subset_prefixes_are_class_balanced() -> None:
    labels = torch.arange(10).repeat_interleave(50)  # sorted by class, like the embedded test split
    subset = stratified_subset(labels, 30, seed=1)
    assert torch.bincount(labels[subset], minlength=10).tolist() == [3] * 10
    everything = stratified_subset(labels, 0, seed=1)
    assert sorted(everything.tolist()) == list(range(500))


def test_training_is_invariant_to_the_feature_scale() -> None:
    """Encoders' feature scales differ by orders of magnitude; h trains in normalised units and the
    normalisation is folded into its first layer, so raw features of any scale classify alike."""
    train, labels = blobs(300, 0)
    test, test_labels = blobs(300, 1)
    config = TrainConfig(hidden=(32,), epochs=20, lr=1e-2)
    small = train_classifier(1e-3 * train, labels, 3, config)
    large = train_classifier(train, labels, 3, config)
    assert accuracy(small, 1e-3 * test, test_labels) > 0.95
    with torch.no_grad():
        agreement = (small(1e-3 * test).argmax(1) == large(test).argmax(1)).float().mean()
    assert agreement > 0.98  # same training up to float rounding
