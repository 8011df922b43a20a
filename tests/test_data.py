"""Tests for dualgraph.data: real MNIST when available, synthetic IDX/CIFAR files, digits."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dualgraph.data import (Dataset, load_cifar10, load_dataset, load_digits, load_mnist,
                            split_digits)
from dualgraph.errors import DualgraphError

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"real MNIST not found in {MNIST_DIR}")


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file, independently of the loader's parser."""
    header = bytes((0, 0, 0x08, arr.ndim)) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_mnist(directory: Path, prefix: str, n: int, gz: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
        path = directory / f"{prefix}-{kind}-ubyte{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(idx_bytes(arr)) if gz else idx_bytes(arr))
    return images, labels


def write_cifar(directory: Path, name: str, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / name).open("wb") as f:
        pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, f)
    return data, labels


def check_dataset(ds: Dataset, n: int, chw: tuple[int, int, int]) -> None:
    assert ds.images.shape == (n, *chw) and ds.images.dtype == torch.float32
    assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    assert len(ds) == n


# ---------------------------------------------------------------- real MNIST

@needs_mnist
def test_real_mnist_test_split():
    ds = load_mnist(MNIST_DIR)
    check_dataset(ds, 10000, (1, 28, 28))
    assert ds.name == "mnist" and ds.num_classes == 10
    counts = torch.bincount(ds.labels, minlength=10)
    assert counts.sum() == 10000 and counts.min() > 800 and counts.max() < 1200
    assert ds.images.max() == 1.0 and ds.images.min() == 0.0
    assert 0.1 < ds.images.mean() < 0.15  # MNIST's well-known mean pixel is ~0.133


@needs_mnist
def test_real_mnist_train_falls_back_to_5k():
    ds = load_mnist(MNIST_DIR, split="train")
    check_dataset(ds, 5000, (1, 28, 28))
    assert torch.equal(torch.bincount(ds.labels, minlength=10), torch.full((10,), 500))


@needs_mnist
def test_real_mnist_via_load_dataset_limit():
    ds = load_dataset("MNIST", MNIST_DIR, limit=7)
    full = load_mnist(MNIST_DIR)
    assert torch.equal(ds.images, full.images[:7]) and torch.equal(ds.labels, full.labels[:7])


# ---------------------------------------------------------------- synthetic MNIST

@pytest.mark.parametrize("gz", [True, False])
def test_synthetic_idx_roundtrip(tmp_path, gz):
    images, labels = write_mnist(tmp_path, "t10k", 5, gz)
    ds = load_mnist(tmp_path)
    check_dataset(ds, 5, (1, 28, 28))
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images).float() / 255)
    assert torch.equal(ds.labels, torch.from_numpy(labels).long())


def test_full_train_preferred_over_5k(tmp_path):
    write_mnist(tmp_path, "train", 4, gz=True, seed=1)
    write_mnist(tmp_path, "train-5k", 3, gz=True, seed=2)
    assert len(load_mnist(tmp_path, split="train")) == 4


def test_torchvision_layout(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw", "t10k", 3, gz=False)
    assert len(load_dataset("mnist", tmp_path)) == 3


def test_truncated_raw_idx(tmp_path):
    write_mnist(tmp_path, "t10k", 3, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DualgraphError, match="truncated or corrupt"):
        load_mnist(tmp_path)


def test_truncated_gzip(tmp_path):
    write_mnist(tmp_path, "t10k", 3, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DualgraphError, match="cannot read .*re-download"):
        load_mnist(tmp_path)


def test_header_only_fragment(tmp_path):
    write_mnist(tmp_path, "t10k", 3, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00")
    with pytest.raises(DualgraphError, match="shorter than its IDX header"):
        load_mnist(tmp_path)


def test_wrong_magic(tmp_path):
    write_mnist(tmp_path, "t10k", 3, gz=False)
    # A labels file put where the images belong: magic says 1 dim, not 3.
    labels = (tmp_path / "t10k-labels-idx1-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(labels)
    with pytest.raises(DualgraphError, match="magic 00000801, expected 00000803"):
        load_mnist(tmp_path)


def test_not_idx_at_all(tmp_path):
    write_mnist(tmp_path, "t10k", 3, gz=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(DualgraphError, match="not a uint8 IDX file"):
        load_mnist(tmp_path)


def test_wrong_image_dims(tmp_path):
    write_mnist(tmp_path, "t10k", 2, gz=False)
    arr = np.zeros((2, 32, 32), dtype=np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(arr))
    with pytest.raises(DualgraphError, match=r"expected \(28, 28\)"):
        load_mnist(tmp_path)


def test_count_mismatch(tmp_path):
    write_mnist(tmp_path, "t10k", 3, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(DualgraphError, match="3 images but .* 2 labels"):
        load_mnist(tmp_path)


def test_mnist_files_missing(tmp_path):
    with pytest.raises(DualgraphError) as err:
        load_mnist(tmp_path)
    msg = str(err.value)
    assert "t10k-images-idx3-ubyte[.gz]" in msg and str(tmp_path) in msg
    assert str(tmp_path / "MNIST" / "raw") in msg and "torchvision" in msg
    assert "\n" not in msg


def test_mnist_train_missing_names_both_options(tmp_path):
    with pytest.raises(DualgraphError, match="train-images.* or train-5k-images"):
        load_mnist(tmp_path, split="train")


def test_data_dir_missing(tmp_path):
    with pytest.raises(DualgraphError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nope")
    with pytest.raises(DualgraphError, match="does not exist"):
        load_dataset("cifar10", tmp_path / "nope")
    with pytest.raises(DualgraphError, match="--data-dir"):
        load_dataset("mnist")


# ---------------------------------------------------------------- CIFAR-10

def test_cifar_test_batch(tmp_path):
    data, labels = write_cifar(tmp_path, "test_batch", 4)
    ds = load_cifar10(tmp_path)
    check_dataset(ds, 4, (3, 32, 32))
    assert ds.name == "cifar10" and ds.num_classes == 10
    # Row layout is 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
    assert ds.images[1, 2, 0, 5] == pytest.approx(data[1, 2048 + 5] / 255)
    assert ds.images[3, 0, 31, 31] == pytest.approx(data[3, 1023] / 255)
    assert ds.labels.tolist() == labels


def test_cifar_train_subfolder(tmp_path):
    sub = tmp_path / "cifar-10-batches-py"
    expected = [write_cifar(sub, f"data_batch_{i}", 2, seed=i)[1] for i in range(1, 6)]
    ds = load_dataset("cifar10", tmp_path, split="train", limit=100)
    check_dataset(ds, 10, (3, 32, 32))
    assert ds.labels.tolist() == sum(expected, [])


def test_cifar_missing_files(tmp_path):
    write_cifar(tmp_path, "data_batch_1", 2)
    with pytest.raises(DualgraphError, match="data_batch_1, data_batch_2.*cifar-10-python"):
        load_cifar10(tmp_path, split="train")


def test_cifar_corrupt_batch(tmp_path):
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DualgraphError, match="not a valid CIFAR-10 python batch"):
        load_cifar10(tmp_path)


def test_cifar_wrong_shape(tmp_path):
    with (tmp_path / "test_batch").open("wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DualgraphError, match=r"expected \[N, 3072\]"):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------- digits

def test_digits_shape():
    ds = load_digits()
    check_dataset(ds, 1797, (1, 8, 8))
    assert ds.images.max() == 1.0 and ds.num_classes == 10
    assert torch.bincount(ds.labels).min() > 150


def test_digits_split_deterministic_and_disjoint():
    train, test = split_digits()
    assert len(test) == 449 and len(train) + len(test) == 1797
    train2, test2 = split_digits(seed=0)
    assert torch.equal(test.images, test2.images) and torch.equal(train.labels, train2.labels)
    _, other = split_digits(seed=1)
    assert not torch.equal(test.labels, other.labels)
    # Disjoint: the parts together are exactly the full set (compare as sorted rows).
    full = load_digits().images.flatten(1)
    both = torch.cat([train.images, test.images]).flatten(1)
    assert torch.equal(torch.unique(full, dim=0), torch.unique(both, dim=0))
    assert len(torch.unique(both, dim=0)) == len(torch.unique(full, dim=0))


def test_load_dataset_digits_uses_split():
    _, test = split_digits()
    ds = load_dataset("digits", data_dir="/ignored", limit=10)
    assert torch.equal(ds.images, test.images[:10])
    assert len(load_dataset("digits", split="train")) == 1797 - 449


def test_bad_test_fraction():
    with pytest.raises(DualgraphError, match="test_fraction"):
        split_digits(test_fraction=1.0)


# ---------------------------------------------------------------- dispatch errors

def test_unknown_dataset():
    with pytest.raises(DualgraphError, match="unknown dataset 'svhn'; choose one of "
                                             "mnist, cifar10, digits"):
        load_dataset("svhn")


@pytest.mark.parametrize("limit", [0, -3])
def test_bad_limit(limit):
    with pytest.raises(DualgraphError, match="limit must be a positive"):
        load_dataset("digits", limit=limit)


def test_bad_split():
    with pytest.raises(DualgraphError, match="unknown split 'val'"):
        load_dataset("digits", split="val")
