"""Dataset loaders for ``dualgraph certify --dataset mnist|cifar10|digits``.

Every loader returns a :class:`Dataset` with images as float32 ``[N, C, H, W]`` in
``[0, 1]`` and labels as int64 ``[N]``. Files are read in their original distribution
formats (MNIST IDX, CIFAR-10 "python version" batches) so no torchvision is needed, and
anything missing or malformed is reported as a one-line :class:`DualgraphError`.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dualgraph.errors import DualgraphError

KNOWN_DATASETS = ("mnist", "cifar10", "digits")
_MNIST_HINT = ("get them from https://yann.lecun.com/exdb/mnist/ or with "
               "torchvision.datasets.MNIST(root=DIR, download=True)")
_CIFAR_HINT = ("download and unpack https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz "
               "(the CIFAR-10 python version)")


@dataclass(frozen=True)
class Dataset:
    """Images ``[N, C, H, W]`` float32 in [0, 1], labels ``[N]`` int64, and metadata."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str
    num_classes: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, n: int) -> Dataset:
        """Return a dataset holding the first ``n`` examples (all of them if fewer)."""
        return Dataset(self.images[:n], self.labels[:n], self.name, self.num_classes)


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise DualgraphError(f"unknown split {split!r}; use 'train' or 'test'")


def _require_dir(data_dir: str | Path | None, what: str, hint: str) -> Path:
    if data_dir is None:
        raise DualgraphError(f"{what} needs a data directory; pass --data-dir DIR ({hint})")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        state = "is a file, not a folder" if path.exists() else "does not exist"
        raise DualgraphError(f"{what} data directory {path} {state}; "
                             f"pass --data-dir pointing at the folder with the {what} files ({hint})")
    return path


# ---------------------------------------------------------------- MNIST (IDX format)

def _read_bytes(path: Path) -> bytes:
    """Read a file, decompressing it if it is gzip; damaged archives become DualgraphError."""
    try:
        with path.open("rb") as f:
            gz = f.read(2) == b"\x1f\x8b"  # sniff the gzip magic rather than trust the suffix
        with (gzip.open(path, "rb") if gz else path.open("rb")) as f:
            return f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DualgraphError(f"cannot read {path}: {exc}; re-download the file") from exc


def _parse_idx(path: Path, ndim: int, shape: tuple[int, ...] = ()) -> np.ndarray:
    """Parse an unsigned-byte IDX file with ``ndim`` dims whose trailing dims are ``shape``.

    IDX layout: magic ``00 00 08 ndim`` (0x08 = uint8), then ``ndim`` big-endian uint32
    sizes, then the data. Every field is checked, so a truncated download or a swapped
    images/labels file fails here instead of producing garbage tensors.
    """
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    magic = bytes(raw[:4])
    # Magic before length: a swapped or non-IDX file (e.g. an HTML error page saved under
    # the IDX name) is then reported as such rather than as "truncated".
    if len(raw) >= 4 and magic != bytes((0, 0, 0x08, ndim)):
        raise DualgraphError(f"{path} is not a uint8 IDX file with {ndim} dims (magic "
                             f"{magic.hex()}, expected 000008{ndim:02x}); check the file name "
                             f"or re-download it")
    if len(raw) < header:
        raise DualgraphError(f"{path} is truncated ({len(raw)} bytes, shorter than its "
                             f"IDX header); re-download it")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if shape and dims[1:] != shape:
        raise DualgraphError(f"{path} holds items of shape {dims[1:]}, expected {shape}; "
                             f"it is not MNIST")
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DualgraphError(f"{path} is truncated or corrupt: header promises {expected} "
                             f"data bytes, file has {len(raw) - header}; re-download it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(dirs: list[Path], name: str) -> Path | None:
    """First of ``name`` or ``name.gz`` in ``dirs`` (raw wins: it is what was unpacked)."""
    for d in dirs:
        for candidate in (d / name, d / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def load_mnist(data_dir: str | Path, split: str = "test") -> Dataset:
    """Load MNIST from IDX files (raw or ``.gz``) in ``data_dir`` or ``data_dir/MNIST/raw``.

    ``split="test"`` reads ``t10k-*``; ``split="train"`` reads the full ``train-*`` files
    and falls back to the 5,000-image ``train-5k-*`` subset when those are absent.
    Returns images ``[N, 1, 28, 28]`` in [0, 1].
    """
    _check_split(split)
    root = _require_dir(data_dir, "MNIST", _MNIST_HINT)
    dirs = [root, root / "MNIST" / "raw"]  # the second is torchvision's download layout
    prefixes = ["t10k"] if split == "test" else ["train", "train-5k"]
    for prefix in prefixes:
        img_path = _find(dirs, f"{prefix}-images-idx3-ubyte")
        lbl_path = _find(dirs, f"{prefix}-labels-idx1-ubyte")
        if img_path is not None and lbl_path is not None:
            break
    else:
        wanted = " or ".join(f"{p}-images-idx3-ubyte[.gz] + {p}-labels-idx1-ubyte[.gz]"
                             for p in prefixes)
        raise DualgraphError(f"MNIST {split} files not found: expected {wanted} in "
                             f"{' or '.join(map(str, dirs))}; {_MNIST_HINT}")
    images = _parse_idx(img_path, 3, (28, 28))
    labels = _parse_idx(lbl_path, 1)
    if len(images) != len(labels):
        raise DualgraphError(f"{img_path} has {len(images)} images but {lbl_path} has "
                             f"{len(labels)} labels; re-download the pair")
    if labels.size and labels.max() > 9:
        raise DualgraphError(f"{lbl_path} has label {labels.max()} outside 0..9; "
                             f"re-download it")
    x = torch.from_numpy(images.astype(np.float32) / np.float32(255)).unsqueeze(1)
    return Dataset(x, torch.from_numpy(labels.astype(np.int64)), "mnist", 10)


# ---------------------------------------------------------------- CIFAR-10 (python batches)

def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # pickle is used ONLY on the official CIFAR-10 "python version" batch files, looked up
    # by their exact names; that format is a pickled dict and has no other reader. It is
    # loaded with encoding='bytes' because the batches were written by Python 2.
    try:
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:  # any unpickling/format failure means a damaged download
        raise DualgraphError(f"{path} is not a valid CIFAR-10 python batch ({exc}); "
                             f"re-download it: {_CIFAR_HINT}") from exc
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise DualgraphError(f"{path} has data {data.shape} and labels {labels.shape}, "
                             f"expected [N, 3072] and [N]; re-download it")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DualgraphError(f"{path} has labels outside 0..9; re-download it")
    return data, labels


def load_cifar10(data_dir: str | Path, split: str = "test") -> Dataset:
    """Load CIFAR-10 python batches from ``data_dir`` or ``data_dir/cifar-10-batches-py``.

    ``split="test"`` reads ``test_batch``; ``split="train"`` reads ``data_batch_1..5``.
    Returns images ``[N, 3, 32, 32]`` (channel-major, as stored) in [0, 1].
    """
    _check_split(split)
    root = _require_dir(data_dir, "CIFAR-10", _CIFAR_HINT)
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    dirs = [root, root / "cifar-10-batches-py"]  # the tarball unpacks into the subfolder
    found = next((d for d in dirs if all((d / n).is_file() for n in names)), None)
    if found is None:
        raise DualgraphError(f"CIFAR-10 {split} files not found: expected {', '.join(names)} "
                             f"in {' or '.join(map(str, dirs))}; {_CIFAR_HINT}")
    parts = [_read_cifar_batch(found / n) for n in names]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255))
    return Dataset(x, torch.from_numpy(labels), "cifar10", 10)


# ---------------------------------------------------------------- scikit-learn digits

def load_digits() -> Dataset:
    """Load scikit-learn's bundled 8x8 digits: 1797 images ``[N, 1, 8, 8]`` in [0, 1].

    The data ships inside the scikit-learn package, so this is the default dataset that
    works offline with no ``--data-dir``. Raw values 0..16 are divided by 16.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise DualgraphError("the digits dataset needs scikit-learn; "
                             "run `pip install scikit-learn`") from exc
    bunch = sk_load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / np.float32(16)).unsqueeze(1)
    return Dataset(x, torch.from_numpy(bunch.target.astype(np.int64)), "digits", 10)


def split_digits(seed: int = 0, test_fraction: float = 0.25) -> tuple[Dataset, Dataset]:
    """Split the digits deterministically into ``(train, test)``.

    A fixed ``numpy.random.default_rng(seed)`` permutation is cut so the test part holds
    ``round(1797 * test_fraction)`` images; the same seed always gives the same split, so
    a model trained on ``train`` can later be certified on the unseen ``test`` part
    (``load_dataset("digits", split=...)`` uses the defaults).
    """
    if not 0.0 < test_fraction < 1.0:
        raise DualgraphError(f"test_fraction must be in (0, 1), got {test_fraction}")
    full = load_digits()
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(full)))
    n_test = int(round(len(full) * test_fraction))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    return (Dataset(full.images[train_idx], full.labels[train_idx], "digits", 10),
            Dataset(full.images[test_idx], full.labels[test_idx], "digits", 10))


# ---------------------------------------------------------------- dispatch

def load_dataset(name: str, data_dir: str | Path | None = None, split: str = "test",
                 limit: int | None = None) -> Dataset:
    """Load dataset ``name`` (mnist, cifar10, digits) and keep its first ``limit`` examples.

    ``data_dir`` is required for mnist and cifar10 and ignored for digits, whose
    ``split`` selects a part of :func:`split_digits` with its default seed.
    """
    if limit is not None and limit <= 0:
        raise DualgraphError(f"limit must be a positive number of examples, got {limit}")
    _check_split(split)
    key = name.lower()
    if key == "mnist":
        ds = load_mnist(data_dir, split)  # type: ignore[arg-type]  # None is reported inside
    elif key == "cifar10":
        ds = load_cifar10(data_dir, split)  # type: ignore[arg-type]
    elif key == "digits":
        train, test = split_digits()
        ds = train if split == "train" else test
    else:
        raise DualgraphError(f"unknown dataset {name!r}; choose one of "
                             f"{', '.join(KNOWN_DATASETS)}")
    if len(ds) == 0:
        raise DualgraphError(f"the {key} {split} set in {data_dir} holds no examples; check the files")
    return ds if limit is None else ds.take(limit)
