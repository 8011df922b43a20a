"""A small U-Net exported by torch (a transposed-convolution decoder, a bilinear Resize branch,
a skip connection by concatenation), certified end to end: interpreter = onnxruntime, and every
certificate survives sampling and PGD."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

from dualgraph.api import Certifier, load_model
from dualgraph.attack import pgd_attack
from dualgraph.data import split_digits


class UNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Conv2d(1, 4, 3, padding=1)
        self.enc2 = nn.Conv2d(4, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.dec = nn.Conv2d(8, 4, 3, padding=1)
        self.side = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        c1 = F.relu(self.enc1(x))                                  # [4, 8, 8]
        c2 = F.relu(self.enc2(F.max_pool2d(c1, 2)))                # [8, 4, 4]
        d = F.relu(self.dec(torch.cat([self.up(c2), c1], 1)))      # [4, 8, 8]
        side = self.side(F.interpolate(c2, scale_factor=2, mode="bilinear", align_corners=False))
        return self.head((d + side).flatten(1))


def test_a_unet_with_conv_transpose_and_resize_certifies_end_to_end(tmp_path):
    torch.manual_seed(0)
    net = UNet()
    train, test = split_digits()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(80):
        opt.zero_grad()
        F.cross_entropy(net(train.images), train.labels).backward()
        opt.step()
    net.eval()
    path = tmp_path / "unet.onnx"
    torch.onnx.export(net, (test.images[:1],), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    graph = load_model(path)
    assert {"ConvTranspose", "Resize", "Concat", "MaxPool"} <= {n.op_type for n in graph.nodes}

    x, labels = test.images[:40], test.labels[:40]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    cert = Certifier(graph)
    np.testing.assert_allclose(cert.forward(x).numpy(), want, rtol=1e-4, atol=1e-4)

    eps = 0.01
    result = cert.certify(x, labels, eps, clip=(0.0, 1.0))
    assert result.sound and int(result.certified.sum()) >= 10, int(result.certified.sum())
    gen = torch.Generator().manual_seed(0)
    for i in torch.nonzero(result.certified).flatten().tolist():
        lo, hi = (x[i] - eps).clamp(0, 1), (x[i] + eps).clamp(0, 1)
        pts = lo + (hi - lo) * torch.rand(200, 1, 8, 8, generator=gen)
        assert (net(pts).argmax(1) == labels[i]).all()
        c = torch.eye(10)[labels[i]] - torch.eye(10)                 # margins y_label - y_j <= 0 is unsafe
        unsafe = [(c[j:j + 1], torch.zeros(1)) for j in range(10) if j != labels[i]]
        found = pgd_attack(lambda z: net(z.reshape(-1, 1, 8, 8)), lo.reshape(-1), hi.reshape(-1), unsafe,
                           steps=30, restarts=4, seed=i)
        assert not bool(found.found[0]), f"example {i}: a counterexample to a certificate"
