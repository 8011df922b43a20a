"""The model zoo: ONNX files shipped with dualgraph, addressable by name.

``dualgraph certify digits-small`` certifies the shipped model on scikit-learn's bundled
digits (no download); ``dualgraph models`` lists the zoo. Each entry names its file, the
dataset it was trained on, the eps it was trained for and the normalisation it expects.
"""

from __future__ import annotations

from pathlib import Path

from dualgraph.errors import DualgraphError

HERE = Path(__file__).resolve().parent

ZOO: dict[str, dict] = {
    "digits-small": {
        "file": "digits_small.onnx",
        "dataset": "digits",
        "eps": 0.1,
        "description": "small CNN (Conv-ReLU-Conv-ReLU-Linear-ReLU-Linear) trained robustly on "
                       "scikit-learn's 8x8 digits for L-inf eps 0.1 (scripts/train_digits.py)",
    },
    "mnist-small-0.1": {
        "file": "mnist_small_0_1.onnx",
        "dataset": "mnist",
        "eps": 0.1,
        "description": "the paper's small MNIST model trained robustly (r = 50 projections) on 5,000 MNIST "
                       "images for L-inf eps 0.1: 14.25% robust / 4.64% clean test error "
                       "(card: models/mnist_small_0_1.json)",
    },
}


def model_info(name) -> dict | None:
    """The zoo entry for ``name`` (None if it is a file path, not a zoo name)."""
    return ZOO.get(str(name))


def resolve_model(name: str) -> Path:
    """Path of the ONNX file of zoo model ``name``."""
    info = ZOO.get(name)
    if info is None:
        raise DualgraphError(f"'{name}' is neither a file nor a zoo model; zoo models: {', '.join(ZOO)}")
    path = HERE / info["file"]
    if not path.exists():
        raise DualgraphError(f"zoo model '{name}' is missing its file {path}; reinstall dualgraph")
    return path
