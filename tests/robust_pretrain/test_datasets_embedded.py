import hashlib

import pytest
import torch

from robust_pretrain import load_dataset, load_embedded_mnist


@pytest.fixture(scope="module")
def splits():
    return load_embedded_mnist()


def _row_hashes(images: torch.Tensor) -> set[str]:
    return {hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in images}


def test_embedded_split_is_disjoint_class_balanced_and_in_range(splits):
    parts = (splits.pretrain, splits.downstream_train, splits.downstream_test)
    assert [len(p) for p in parts] == [2000, 2000, 1000]
    for part, per_class in zip(parts, (200, 200, 100), strict=True):
        assert part.images.shape[1:] == (1, 28, 28)
        assert part.images.dtype == torch.float32 and part.labels.dtype == torch.int64
        assert part.images.min() >= 0.0 and part.images.max() <= 1.0
        assert torch.equal(torch.bincount(part.labels, minlength=10), torch.full((10,), per_class))
    hashes = [_row_hashes(p.images) for p in parts]
    assert sum(len(h) for h in hashes) == len(set().union(*hashes)) == 5000


def test_embedded_split_is_deterministic(splits):
    again = load_embedded_mnist()
    assert torch.equal(again.pretrain.images, splits.pretrain.images)
    assert torch.equal(again.downstream_test.labels, splits.downstream_test.labels)


def test_load_dataset_names_embedded_parts(splits):
    assert torch.equal(load_dataset("mnist-embedded", None, "test").images, splits.downstream_test.images)
    assert torch.equal(load_dataset("mnist-embedded", None, "pretrain").labels, splits.pretrain.labels)
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset("mnist-embedded", None, "validation")
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("imagenet", "/nowhere", "train")
