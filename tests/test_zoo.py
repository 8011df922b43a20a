"""The shipped zoo model ``digits-small`` loads and reproduces the figures in its json.

``models/digits_small.json`` is written by ``python scripts/train_digits.py`` from the
exported ONNX file, certified the way the CLI does it (``load_model`` + ``certify_dataset``
on the digits test split). These tests re-measure the shipped file: the clean error must
match to 0.5 percentage points and the number of certified examples exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dualgraph.api import Certifier, load_model
from dualgraph.certify import certify_dataset
from dualgraph.data import split_digits
from dualgraph.ir import Graph
from dualgraph.models import HERE, ZOO, resolve_model

INFO = ZOO["digits-small"]
META = json.loads((HERE / "digits_small.json").read_text())


@pytest.fixture(scope="module")
def test_split():
    return split_digits(seed=META.get("split_seed", 0))[1]


@pytest.fixture(scope="module")
def report(test_split):
    cert = Certifier(load_model("digits-small"))
    return certify_dataset(cert, test_split, META["eps"], "linf", (0.0, 1.0), 50, progress=False)


def test_zoo_entry_matches_files():
    path = resolve_model("digits-small")
    assert path.suffix == ".onnx" and path.stat().st_size < 200_000
    assert INFO["dataset"] == "digits"
    assert INFO["eps"] == META["eps"]
    assert "mean" not in INFO and "std" not in INFO  # trained on raw [0, 1] pixels


def test_loads_as_graph():
    graph = load_model("digits-small")
    assert isinstance(graph, Graph)
    assert graph.inputs[0].unit_shape == (1, 8, 8)
    assert graph.outputs[0].unit_shape == (10,)


def test_clean_error_matches_json(report, test_split):
    assert report.n == META["n_test"] == len(test_split)
    assert abs(report.clean_error - META["clean_error"]) <= 0.005


def test_robust_error_matches_json(report):
    assert int(report.certified.sum()) == META["certified"]
    assert report.robust_error == pytest.approx(META["robust_error"], abs=1e-6)
    assert report.robust_error >= report.clean_error


def test_certified_examples_resist_random_corners(report, test_split):
    """Spot check of soundness on the real model: corners of the eps-box (the likeliest
    place for a counterexample of a nearly linear model) keep the label, run by onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(resolve_model("digits-small")), providers=["CPUExecutionProvider"])
    idx = torch.nonzero(report.certified).flatten()[:40]
    x, y = test_split.images[idx], test_split.labels[idx]
    gen = torch.Generator().manual_seed(0)
    eps = META["eps"]
    for _ in range(20):
        signs = torch.randint(0, 2, x.shape, generator=gen).to(x.dtype) * 2 - 1
        xa = (x + eps * signs).clamp(0.0, 1.0)
        logits = sess.run(None, {sess.get_inputs()[0].name: xa.numpy().astype(np.float32)})[0]
        assert (torch.from_numpy(logits).argmax(1) == y).all()


def test_mnist_model_card_figures(shared_dir):
    """The shipped MNIST model reproduces its card on the full test set (exact, sound bounds)."""
    if shared_dir is None or not (shared_dir / "data" / "mnist").exists():
        pytest.skip("../shared/data/mnist not found: the MNIST zoo model's figures need the MNIST test set")
    from dualgraph.data import load_mnist
    card = json.loads((HERE / "mnist_small_0_1.json").read_text())
    assert ZOO["mnist-small-0.1"]["eps"] == card["eps"]
    report = certify_dataset(Certifier(load_model("mnist-small-0.1")), load_mnist(shared_dir / "data" / "mnist"),
                             card["eps"], "linf", (0.0, 1.0), 50, progress=False)
    assert round(report.robust_error, 4) == card["robust_error"]
    assert round(report.clean_error, 4) == card["clean_error"]
