"""Client-side augmentation: copies stay in the value range, are seeded, are the identity at zero strength, and a
held-out input's copies never reach the rows h is fitted on."""

from __future__ import annotations

import pytest
import torch

from reaas_client.augment import ElasticShift, augmented_copies
from reaas_client.downstream import training_rows


def digits() -> torch.Tensor:
    images = torch.zeros(3, 1, 28, 28)
    images[:, :, 8:20, 12:16] = 1.0  # a bar, far from the frame
    return images * torch.tensor([0.5, 0.8, 1.0]).view(3, 1, 1, 1)


def test_copies_are_input_major_seeded_and_in_range() -> None:
    images = digits()
    first = augmented_copies(images, 4, torch.Generator().manual_seed(0))
    again = augmented_copies(images, 4, torch.Generator().manual_seed(0))
    other = augmented_copies(images, 4, torch.Generator().manual_seed(1))
    assert first.shape == (12, 1, 28, 28) and torch.equal(first, again) and not torch.equal(first, other)
    assert first.min() >= 0 and first.max() <= 1
    # copies move the bar but keep its brightness: copy i * 4 + k of image i has image i's peak value
    peaks = first.flatten(1).max(dim=1).values.view(3, 4)
    assert torch.allclose(peaks, images.flatten(1).max(dim=1).values.view(3, 1).expand(3, 4), atol=0.05)
    assert ((first - images.repeat_interleave(4, 0)).flatten(1).norm(dim=1) > 0.1).all()


def test_zero_shift_and_strength_is_the_identity() -> None:
    images = digits()
    still = augmented_copies(images, 2, torch.Generator().manual_seed(0), spec=ElasticShift(0.0, 0.0, 4.0))
    assert torch.allclose(still, images.repeat_interleave(2, 0), atol=1e-5)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="copies"):
        augmented_copies(digits(), 0, torch.Generator())
    with pytest.raises(ValueError, match="float images"):
        augmented_copies(torch.zeros(3, 28, dtype=torch.int64), 1, torch.Generator())
    with pytest.raises(ValueError, match="smoothness"):
        ElasticShift(smoothness=0.0)


def test_training_rows_keep_copies_with_their_input() -> None:
    features = torch.arange(4, dtype=torch.float32).view(4, 1)
    labels = torch.tensor([0, 1, 0, 1])
    views = features.view(4, 1, 1) + torch.tensor([0.1, 0.2]).view(1, 2, 1)  # [4, 2, 1]
    rows, row_labels = training_rows(features, labels, views, torch.tensor([1, 3]))
    assert rows.flatten().tolist() == pytest.approx([1, 3, 1.1, 1.2, 3.1, 3.2])
    assert row_labels.tolist() == [1, 1, 1, 1, 1, 1]
    assert training_rows(features, labels)[0] is features
