"""A small U-Net exported by torch (a transposed-convolution decoder, a bilinear Resize branch,
a skip connection by concatenation), certified end to end: interpreter = onnxruntime, and every
certificate survives sampling and PGD."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from end_to_end import assert_certificates_hold, onnxruntime_outputs, train_and_export

from dualgraph.api import Certifier, load_model


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
    path = tmp_path / "unet.onnx"
    net, test = train_and_export(UNet(), path, steps=80, dynamic_batch=True)
    graph = load_model(path)
    assert {"ConvTranspose", "Resize", "Concat", "MaxPool"} <= {n.op_type for n in graph.nodes}

    x, labels = test.images[:40], test.labels[:40]
    cert = Certifier(graph)
    np.testing.assert_allclose(cert.forward(x).numpy(), onnxruntime_outputs(path, x), rtol=1e-4, atol=1e-4)
    result = cert.certify(x, labels, 0.01, clip=(0.0, 1.0))
    assert result.sound and int(result.certified.sum()) >= 10, int(result.certified.sum())
    assert_certificates_hold(net, result, x, labels, 0.01, (0.0, 1.0))
