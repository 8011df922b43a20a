"""Shared steps of the end-to-end tests (a vision transformer, a U-Net): train a torch model on the
bundled digits, export it to ONNX as users do, and check that every certificate holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

from dualgraph.attack import pgd_attack
from dualgraph.data import split_digits


def train_and_export(net: nn.Module, path: Path, steps: int, dynamic_batch: bool) -> tuple[nn.Module, object]:
    """Full-batch Adam on the digits training split, then ``torch.onnx.export`` (opset 17);
    returns the trained module (eval mode) and the test split."""
    train, test = split_digits()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(train.images), train.labels).backward()
        opt.step()
    net.eval()
    axes = {"dynamic_axes": {"x": {0: "N"}, "y": {0: "N"}}} if dynamic_batch else {}
    torch.onnx.export(net, (test.images[:1],), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], **axes)
    return net, test


def onnxruntime_outputs(path: Path, x: torch.Tensor) -> np.ndarray:
    """The model in onnxruntime, one example at a time (works for batch-1 exports too)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": x[i:i + 1].numpy()})[0] for i in range(len(x))])


def assert_certificates_hold(net: nn.Module, result, x: torch.Tensor, labels: torch.Tensor, eps: float,
                             clip: tuple[float, float] | None) -> None:
    """No sampled point and no PGD attack changes the class of a certified example."""
    gen = torch.Generator().manual_seed(0)
    for i in torch.nonzero(result.certified).flatten().tolist():
        lo, hi = x[i] - eps, x[i] + eps
        if clip is not None:
            lo, hi = lo.clamp(*clip), hi.clamp(*clip)
        pts = lo + (hi - lo) * torch.rand(200, *x.shape[1:], generator=gen)
        with torch.no_grad():
            assert (net(pts).argmax(1) == labels[i]).all(), f"example {i}: a sampled point changes class"
        c = torch.eye(10)[labels[i]] - torch.eye(10)                 # y_label - y_j <= 0 is unsafe
        unsafe = [(c[j:j + 1], torch.zeros(1)) for j in range(10) if j != labels[i]]
        found = pgd_attack(lambda z: net(z.reshape(-1, *x.shape[1:])), lo.reshape(-1), hi.reshape(-1), unsafe,
                           steps=30, restarts=4, seed=i)
        assert not bool(found.found[0]), f"example {i}: a counterexample to a certificate"
