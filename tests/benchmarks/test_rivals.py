"""bench-rivals' pieces on a few digits: the pixel network's certificate survives PGD, the consistency-trained LeNet
trains and certifies, and a smoothed row counts wrong or abstained digits as radius 0."""

from __future__ import annotations

import torch

from benchmarks.rivals import deterministic_row, smoothed_row, train_noisy_lenet
from reaas_client.downstream import TrainConfig, train_classifier
from robust_pretrain import load_embedded_mnist


def digits(count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    splits = load_embedded_mnist()
    train, test = splits.downstream_train, splits.downstream_test
    return (train.images[:count].flatten(1), train.labels[:count], test.images[:40].flatten(1), test.labels[:40])


def test_pixel_network_certificate_survives_pgd() -> None:
    images, labels, test, test_labels = digits(400)
    h = train_classifier(images, labels, 10, TrainConfig(head="lipschitz", hidden=(64, 64), margin=2.0, epochs=15,
                                                         batch_size=64, lr=1e-2))
    row = deterministic_row("pixel", h, test, test_labels, queries="0", train_s=0.0, note="", steps=50, restarts=2,
                            seed=0)
    certified = int((row.radius > 0).sum())
    assert certified > 10 and row.pgd_flips == f"0 of {certified}"
    assert (row.radius[~row.correct] == 0).all()


def test_consistency_lenet_trains_and_its_smoothed_row_zeroes_wrong_digits() -> None:
    images, labels, test, test_labels = digits(300)
    model = train_noisy_lenet(images, labels, 0.5, consistency=5.0, epochs=8, batch_size=64, lr=3e-3)
    row = smoothed_row("lenet", model, test[:10], test_labels[:10], 0.5, 500, 0, queries="0", train_s=0.0, note="")
    assert row.correct.float().mean() > 0.5  # better than chance (0.1) after a few epochs on 300 digits
    assert (row.radius[~row.correct] == 0).all() and (row.radius[row.correct] >= 0).all()
