"""Small deterministic torch models that exercise every op family of the frontends.

Each :class:`ZooModel` builds its module under ``torch.manual_seed`` (so weights are the
same on every run), in eval mode, and knows the shape of one example. :func:`export_onnx`
writes a model with the TorchScript exporter, which emits the Shape/Gather/Concat ->
Reshape sub-graphs the ONNX frontend must fold.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (20, 32, 32, 10)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    """Strided, padded, grouped and dilated convolutions; ``view(size(0), -1)`` flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4)
        self.c3 = nn.Conv2d(8, 16, (3, 2), stride=(1, 2), padding=(1, 0))
        self.fc = nn.Linear(16 * 6 * 3, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        return self.fc(x.view(x.size(0), -1))


class ResidualCNN(nn.Module):
    """Two residual blocks, one with a strided 1x1 projection on the skip path."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.proj = nn.Conv2d(8, 16, 1, stride=2)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.a2(torch.relu(self.a1(x))))
        x = torch.relu(self.proj(x) + self.b2(torch.relu(self.b1(x))))
        return self.fc(torch.flatten(x, 1))


class DenseBlockNet(nn.Module):
    """DenseNet-style concatenations along channels, then along features."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(2, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)
        self.l1 = nn.Linear(12 * 6 * 6, 16)
        self.l2 = nn.Linear(16, 8)
        self.out = nn.Linear(24, 5)

    def forward(self, x):
        x = torch.relu(self.c0(x))
        x = torch.cat([x, torch.relu(self.c1(x))], dim=1)
        x = torch.cat([x, torch.relu(self.c2(x))], dim=1)
        h = torch.relu(self.l1(x.flatten(1)))
        return self.out(torch.cat([h, torch.relu(self.l2(h))], dim=-1))


class AvgPoolCNN(nn.Module):
    """Average pools with padding, count_include_pad on and off, ceil_mode, global pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.p1 = nn.AvgPool2d(2)
        self.p2 = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True)
        self.p3 = nn.AvgPool2d(3, stride=1, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6 + 4 * 4 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = self.p3(self.p2(self.p1(x)))
        g = F.adaptive_avg_pool2d(self.conv2(x), 1).flatten(1)
        return self.fc(torch.cat([g, x.flatten(1)], dim=1))


class MaxPoolCNN(nn.Module):
    """Max pools with padding, ceil_mode and dilation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.p1 = nn.MaxPool2d(2)
        self.p2 = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.p3 = nn.MaxPool2d(2, stride=1, dilation=2)
        self.fc = nn.Linear(4 * 3 * 3, 4)

    def forward(self, x):
        x = self.p3(self.p2(self.p1(torch.relu(self.conv(x)))))
        return self.fc(x.reshape(x.shape[0], -1))


class BatchNormCNN(nn.Module):
    """BatchNorm2d and BatchNorm1d with non-trivial running statistics (eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 6 * 6, 12)
        self.bn1 = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 3)
        for bn in (self.bn, self.bn1):
            with torch.no_grad():
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc2(torch.relu(self.bn1(self.fc1(x.flatten(1)))))


class ActivationZoo(nn.Module):
    """LeakyReLU, Sigmoid, Tanh, clamp (Clip), Hardtanh, ReLU6, Softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.ModuleList(nn.Linear(12, 12) for _ in range(6))
        self.out = nn.Linear(12, 4)

    def forward(self, x):
        x = F.leaky_relu(self.l[0](x), 0.1)
        x = torch.sigmoid(self.l[1](x))
        x = torch.tanh(self.l[2](x))
        x = torch.clamp(self.l[3](x), -0.5, 0.5)
        x = F.hardtanh(self.l[4](x), -0.3, 0.8)
        x = F.relu6(3 * self.l[5](x))
        return torch.softmax(self.out(x), dim=-1)


class Conv1dNet(nn.Module):
    """1-D convolutions with constant and reflect padding (ONNX Pad)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.c2 = nn.Conv1d(4, 4, 3, stride=2, groups=2)
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x):
        x = torch.relu(F.pad(self.c1(x), (1, 2)))
        x = F.pad(torch.relu(self.c2(x)), (2, 1), mode="reflect")
        return self.fc(x.flatten(1))


class StructuralNet(nn.Module):
    """Transpose, slicing with steps, split, concat, unsqueeze/squeeze, arithmetic with constants."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.fc = nn.Linear(2 * 3 * 2 + 2 * 4, 5)
        self.register_buffer("offset", torch.linspace(-1, 1, 6))

    def forward(self, x):                      # x: [batch, 4, 6]
        h = torch.relu(self.lin(x - self.offset)) * 0.5 / 1.5
        t = h.transpose(1, 2)                  # [batch, 6, 4]
        a, b = torch.split(t, [2, 4], dim=1)
        s = b[:, 1:, ::2]                      # [batch, 3, 2]
        u = torch.cat([s.unsqueeze(1), -s.unsqueeze(1)], dim=1)   # [batch, 2, 3, 2]
        v = a.unsqueeze(-1).squeeze(-1)
        return self.fc(torch.cat([u.flatten(1), v.reshape(v.size(0), -1)], dim=1))


@dataclass(frozen=True)
class ZooModel:
    """A zoo entry: how to build the module and what one example looks like."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    low: float = -1.0
    high: float = 1.0
    seed: int = 0

    def build(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return self.factory().eval()

    def inputs(self, batch: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A reproducible random batch in the model's input range."""
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand((batch, *self.input_shape), generator=gen, dtype=torch.float64)
        return (self.low + (self.high - self.low) * x).to(dtype)


ZOO: dict[str, ZooModel] = {m.name: m for m in [
    ZooModel("mlp", MLP, (20,)),
    ZooModel("cnn", CNN, (1, 12, 12), 0.0, 1.0),
    ZooModel("residual_cnn", ResidualCNN, (3, 8, 8)),
    ZooModel("dense_block", DenseBlockNet, (2, 6, 6)),
    ZooModel("avgpool_cnn", AvgPoolCNN, (1, 15, 15)),
    ZooModel("maxpool_cnn", MaxPoolCNN, (1, 16, 16)),
    ZooModel("batchnorm_cnn", BatchNormCNN, (2, 8, 8)),
    ZooModel("activations", ActivationZoo, (12,), -2.0, 2.0),
    ZooModel("conv1d", Conv1dNet, (2, 24)),
    ZooModel("structural", StructuralNet, (4, 6)),
]}


def export_onnx(entry: ZooModel, path: Path, *, dynamic: bool = True, opset: int | None = None) -> Path:
    """Export ``entry`` to ``path`` with the TorchScript exporter.

    ``dynamic``: a symbolic batch axis on input and output; otherwise the model is traced
    with batch 1 and its ONNX input has a fixed leading 1.
    """
    model = entry.build()
    example = entry.inputs(2 if dynamic else 1)
    kwargs = {"dynamic_axes": {"x": {0: "batch"}, "y": {0: "batch"}}} if dynamic else {}
    if opset is not None:
        kwargs["opset_version"] = opset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (example,), str(path), input_names=["x"], output_names=["y"],
                          dynamo=False, **kwargs)
    return path
