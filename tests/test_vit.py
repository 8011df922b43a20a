"""A vision transformer, exported to ONNX by torch as users export theirs (patch embedding, class
token, position embedding, LayerNormalization, multi-head attention with the qkv permute, Softmax,
GELU written with Erf, a class-token head), certified end to end: every op on the path has a dual
layer, and the certificates hold for points sampled and attacked in the ball."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from end_to_end import assert_certificates_hold, onnxruntime_outputs, train_and_export

from dualgraph.api import Certifier, load_model


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """8x8 digits in 2x2 patches of 4x4 pixels, one block of 2 heads, width 16."""

    def __init__(self, d: int = 16, heads: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 5, d) * 0.1)
        self.block = Block(d, heads)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        p = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), p], 1) + self.pos
        return self.head(self.ln(self.block(x))[:, 0])


def test_a_vision_transformer_certifies_end_to_end(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "vit.onnx"
    net, test = train_and_export(ViT(), path, steps=120, dynamic_batch=False)
    graph = load_model(path)
    assert {"LayerNormalization", "Softmax", "Erf", "MatMul"} <= {n.op_type for n in graph.nodes}

    x, labels = test.images[:40], test.labels[:40]
    cert = Certifier(graph, dtype=torch.float64)   # float32 bound arithmetic is too coarse here (README)
    np.testing.assert_allclose(cert.forward(x).numpy(), onnxruntime_outputs(path, x), rtol=1e-4, atol=1e-4)
    result = cert.certify(x, labels, 1e-3)
    assert result.sound and int(result.certified.sum()) >= 10, int(result.certified.sum())
    assert_certificates_hold(net, result, x, labels, 1e-3, None)
