"""Readers for the on-disk formats users already hold; each returns an ``ImageSet`` in [0, 1].

* CIFAR-10 "python version": ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` (pickled dicts). They are
  read with an unpickler that only admits the numpy array constructors, so a tampered file cannot run code.
* SVHN cropped digits: ``{train,test}_32x32.mat`` (``X`` [32, 32, 3, N] uint8, ``y`` [N, 1], 10 = digit 0).
* STL-10 binaries: ``stl10_binary/{train,test}_{X,y}.bin`` (uint8, images column-major 3x96x96, labels 1..10).
* Tiny-ImageNet: ``tiny-imagenet-200/`` with ``wnids.txt``, ``train/<wnid>/images/*.JPEG``, ``val/images`` and
  ``val/val_annotations.txt``;
  our "test" split is the labelled ``val`` folder, classes are numbered in sorted-wnid order.

``path`` may be the folder that holds the files or its parent holding the standard folder name.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from robust_pretrain.datasets import ImageSet


class DatasetFormatError(ValueError):
    """Files exist but are not in the format their data set uses."""


def read_cifar10(path: Path, split: str) -> ImageSet:
    root = _standard_folder(path, "cifar-10-batches-py", "test_batch")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        with open(root / name, "rb") as handle:
            batch = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
        try:
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        except (KeyError, ValueError) as error:
            raise DatasetFormatError(f"{root / name} is not a CIFAR-10 python batch: {error}") from error
    return _image_set(np.concatenate(images), np.concatenate(labels), f"cifar10/{split}", 10)


def read_svhn(path: Path, split: str) -> ImageSet:
    from scipy.io import loadmat

    file = path if path.is_file() else path / f"{split}_32x32.mat"
    if not file.is_file():
        raise FileNotFoundError(f"svhn: no {split}_32x32.mat under {path}")
    contents = loadmat(file)
    if "X" not in contents or "y" not in contents:
        raise DatasetFormatError(f"{file} lacks the SVHN arrays X and y")
    images = np.transpose(contents["X"], (3, 2, 0, 1))  # [32, 32, 3, N] -> [N, 3, 32, 32]
    labels = contents["y"].reshape(-1).astype(np.int64) % 10  # SVHN writes digit 0 as label 10
    return _image_set(images, labels, f"svhn/{split}", 10)


def read_stl10(path: Path, split: str) -> ImageSet:
    root = _standard_folder(path, "stl10_binary", f"{split}_X.bin")
    pixels = np.fromfile(root / f"{split}_X.bin", dtype=np.uint8)
    labels = np.fromfile(root / f"{split}_y.bin", dtype=np.uint8).astype(np.int64) - 1
    if pixels.size != labels.size * 3 * 96 * 96:
        raise DatasetFormatError(
            f"stl10: {pixels.size} pixels for {labels.size} labels (expected 3x96x96 each)"
        )
    # Each image is stored column-major: channel, then column, then row.
    images = pixels.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    return _image_set(images, labels, f"stl10/{split}", 10)


def read_tiny_imagenet(path: Path, split: str) -> ImageSet:
    root = _standard_folder(path, "tiny-imagenet-200", "wnids.txt")
    wnids = sorted((root / "wnids.txt").read_text().split())
    class_of = {wnid: index for index, wnid in enumerate(wnids)}
    files: list[tuple[Path, int]] = []
    if split == "train":
        for wnid in wnids:
            files += [
                (file, class_of[wnid]) for file in sorted((root / "train" / wnid / "images").glob("*.JPEG"))
            ]
    else:
        for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
            name, wnid = line.split("\t")[:2]
            files.append((root / "val" / "images" / name, class_of[wnid]))
    if not files:
        raise DatasetFormatError(f"tiny-imagenet: no images for split {split!r} under {root}")
    images = np.stack([_read_rgb(file) for file, _ in files])
    labels = np.array([label for _, label in files], dtype=np.int64)
    return _image_set(images, labels, f"tiny-imagenet/{split}", len(wnids))


def _read_rgb(file: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(file) as image:  # a few Tiny-ImageNet files are greyscale
        return np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)


def _standard_folder(path: Path, folder: str, marker: str) -> Path:
    for root in (path, path / folder):
        if (root / marker).exists():
            return root
    raise FileNotFoundError(f"no {marker} in {path} or {path / folder}")


def _image_set(pixels: np.ndarray, labels: np.ndarray, name: str, num_classes: int) -> ImageSet:
    """uint8 [N, C, H, W] -> float32 in [0, 1]."""
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
        raise DatasetFormatError(f"{name}: labels outside [0, {num_classes})")
    images = torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32).div_(255.0)
    return ImageSet(images, torch.from_numpy(labels), name, num_classes)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR-10 batch needs (numpy arrays and dtypes); anything else is an error."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise DatasetFormatError(
                f"CIFAR-10 batch refers to {module}.{name}, which a real batch never does"
            )
        return super().find_class(module, name)
