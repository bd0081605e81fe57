"""Each reader against tiny files written in the real on-disk format, read back through load_dataset."""

import os
import pickle

import numpy as np
import pytest
import scipy.io
import torch

from robust_pretrain import load_dataset
from robust_pretrain.formats import DatasetFormatError


def _pixels(rng, n, channels, size):
    return rng.integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)


def _as_float(pixels):
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)


def test_cifar10_python_batches(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels, labels = _pixels(rng, 3, 3, 32), rng.integers(0, 10, 3).tolist()
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": pixels.reshape(3, 3072),
            b"filenames": [b"a.png", b"b.png", b"c.png"],
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = (pixels, labels)
    train = load_dataset("cifar10", tmp_path, "train")  # parent folder works too
    assert train.images.shape == (15, 3, 32, 32) and train.num_classes == 10
    assert torch.equal(train.images[3:6], _as_float(written["data_batch_2"][0]))
    assert train.labels[3:6].tolist() == written["data_batch_2"][1]
    test = load_dataset("cifar10", root, "test")
    assert torch.equal(test.images, _as_float(written["test_batch"][0]))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def test_cifar10_reader_refuses_pickles_that_run_code(tmp_path):
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _RunsCode(), b"labels": [0]}))
    with pytest.raises(DatasetFormatError, match="never does"):
        load_dataset("cifar10", tmp_path, "test")


def test_svhn_mat(tmp_path):
    rng = np.random.default_rng(1)
    pixels = _pixels(rng, 4, 3, 32)
    labels = np.array([[10], [1], [9], [10]], dtype=np.uint8)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": pixels.transpose(2, 3, 1, 0), "y": labels})
    test = load_dataset("svhn", tmp_path, "test")
    assert torch.equal(test.images, _as_float(pixels))
    assert test.labels.tolist() == [0, 1, 9, 0]


def test_stl10_binaries_are_column_major(tmp_path):
    rng = np.random.default_rng(2)
    pixels = _pixels(rng, 2, 3, 96)
    root = tmp_path / "stl10_binary"
    root.mkdir()
    pixels.transpose(0, 1, 3, 2).tofile(root / "train_X.bin")
    np.array([1, 10], dtype=np.uint8).tofile(root / "train_y.bin")
    train = load_dataset("stl10", tmp_path, "train")
    assert torch.equal(train.images, _as_float(pixels))
    assert train.labels.tolist() == [0, 9]


def test_stl10_size_mismatch_is_a_format_error(tmp_path):
    np.zeros(100, dtype=np.uint8).tofile(tmp_path / "test_X.bin")
    np.array([1], dtype=np.uint8).tofile(tmp_path / "test_y.bin")
    with pytest.raises(DatasetFormatError):
        load_dataset("stl10", tmp_path, "test")


def test_tiny_imagenet_folders(tmp_path):
    from PIL import Image

    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]  # classes are numbered in sorted order: n01 -> 0, n02 -> 1
    (root).mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    colours = {"n01": (250, 0, 0), "n02": (0, 0, 250)}
    for wnid in wnids:
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (64, 64), colours[wnid]).save(folder / f"{wnid}_{k}.JPEG", quality=100)
    (root / "val" / "images").mkdir(parents=True)
    Image.new("L", (64, 64), 128).save(root / "val" / "images" / "val_0.JPEG", quality=100)
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t63\t63\n")
    train = load_dataset("tiny-imagenet", tmp_path, "train")
    assert train.images.shape == (4, 3, 64, 64) and train.num_classes == 2
    assert train.labels.tolist() == [0, 0, 1, 1]
    red = train.images[0].mean(dim=(1, 2))
    assert red[0] > 0.9 and red[2] < 0.1  # JPEG is lossy; the colour survives
    val = load_dataset("tiny-imagenet", root, "test")
    assert val.labels.tolist() == [1] and val.images.shape == (1, 3, 64, 64)
    assert torch.allclose(val.images, torch.full_like(val.images, 128 / 255), atol=0.02)


def test_missing_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dataset("svhn", tmp_path, "train")
    with pytest.raises(FileNotFoundError):
        load_dataset("cifar10", tmp_path / "nowhere", "train")
