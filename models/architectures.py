"""Architectures of the paper (Wong et al. 2018, Appendix), as torch modules.

``mnist_small`` is the model of ``../shared/paper_models`` (Conv(1->16,4,s2,p1), ReLU,
Conv(16->32,4,s2,p1), ReLU, Flatten, Linear(1568->100), ReLU, Linear(100->10)); the
``width`` factor scales every hidden layer, which the scaling benchmark uses to sweep
network sizes. ``digits_small`` is the same shape for 8x8 inputs (the embedded default).
The paper's CIFAR models are the same families on 3x32x32 inputs ("small", "large") and
:func:`cifar_resnet`. :data:`ARCHITECTURES` names them for ``dualgraph train --model``:
each builder takes the dataset's input shape ``(C, H, W)`` and class count.
"""

from __future__ import annotations

import torch
from torch import nn


def mnist_small(width: int = 1, in_channels: int = 1, in_size: int = 28, classes: int = 10) -> nn.Sequential:
    c1, c2, h = 16 * width, 32 * width, 100 * width
    side = in_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * side * side, h), nn.ReLU(),
        nn.Linear(h, classes))


def mnist_large(in_channels: int = 1, in_size: int = 28, classes: int = 10) -> nn.Sequential:
    """The paper's 'large' MNIST/CIFAR model: four convolutions and two hidden linear layers."""
    side = in_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * side * side, 512), nn.ReLU(),
        nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, classes))


class ResidualBlock(nn.Module):
    """``relu(skip(x) + conv_k(relu(conv_first(x))))``: the paper's CIFAR residual block
    (convex-adversarial's ``Dense`` layers), downsampling by 2 when ``downsample``."""

    def __init__(self, c_in: int, c_out: int, downsample: bool) -> None:
        super().__init__()
        k_first, stride, k_skip = (4, 2, 2) if downsample else (3, 1, 1)
        self.first = nn.Conv2d(c_in, c_out, k_first, stride=stride, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, k_skip, stride=stride, padding=0)
        self.second = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1)

    def forward(self, x):
        return torch.relu(self.skip(x) + self.second(torch.relu(self.first(x))))


def cifar_resnet(in_channels: int = 3, in_size: int = 32, classes: int = 10, blocks: int = 1,
                 factor: int = 1) -> nn.Sequential:
    """The paper's CIFAR ResNet (``blocks=1, factor=1``: residual blocks of 16, 16, 32 and 64
    filters, then Linear(64*8*8 -> 1000) and Linear(1000 -> classes))."""
    f16, f32, f64 = 16 * factor, 32 * factor, 64 * factor
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, stride=1, padding=1), nn.ReLU(),
                               ResidualBlock(16, f16, False)]
    layers += [ResidualBlock(f16, f16, False) for _ in range(blocks)]
    layers += [ResidualBlock(f16, f32, True)] + [ResidualBlock(f32, f32, False) for _ in range(blocks - 1)]
    layers += [ResidualBlock(f32, f64, True)] + [ResidualBlock(f64, f64, False) for _ in range(blocks - 1)]
    side = in_size // 4
    layers += [nn.Flatten(), nn.ReLU(), nn.Linear(f64 * side * side, 1000), nn.ReLU(), nn.Linear(1000, classes)]
    return nn.Sequential(*layers)


def mlp(in_features: int, classes: int = 10, hidden: tuple[int, ...] = (100, 100)) -> nn.Sequential:
    """A fully connected ReLU network on the flattened input (for tests and small data)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, classes))


class ResidualMLP(nn.Module):
    """``x -> relu(W0 x) -> [h + W2 relu(W1 h)] * blocks -> Linear``: a small residual network."""

    def __init__(self, in_features: int, classes: int = 10, width: int = 64, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
                                    for _ in range(blocks))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = torch.relu(h + block(h))
        return self.head(h)


def _flat(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


ARCHITECTURES = {
    "small": ("the paper's small model: Conv 16, Conv 32 (4x4, stride 2), Linear 100",
              lambda shape, k: mnist_small(in_channels=shape[0], in_size=shape[1], classes=k)),
    "large": ("the paper's large model: Conv 32, 32, 64, 64, Linear 512, 512",
              lambda shape, k: mnist_large(in_channels=shape[0], in_size=shape[1], classes=k)),
    "resnet": ("the paper's CIFAR ResNet: residual blocks of 16, 16, 32, 64 filters, Linear 1000",
               lambda shape, k: cifar_resnet(in_channels=shape[0], in_size=shape[1], classes=k)),
    "mlp": ("a fully connected network, 2 hidden layers of 100", lambda shape, k: mlp(_flat(shape), k)),
    "residual-mlp": ("a fully connected residual network, width 64, 2 blocks",
                     lambda shape, k: ResidualMLP(_flat(shape), k)),
}
"""Architectures by name: (description, builder(input_shape (C, H, W), classes))."""


def build_architecture(name: str, input_shape: tuple[int, ...], classes: int) -> nn.Module:
    """The architecture ``name`` for inputs of ``input_shape`` and ``classes`` outputs."""
    from dualgraph.errors import DualgraphError
    if name not in ARCHITECTURES:
        raise DualgraphError(f"unknown architecture '{name}'; choose one of {', '.join(ARCHITECTURES)} "
                             "(see 'dualgraph models')")
    if name in ("small", "large", "resnet") and (len(input_shape) != 3 or input_shape[1] % 4 or
                                                  input_shape[1] != input_shape[2]):
        raise DualgraphError(f"architecture '{name}' needs square images with a side divisible by 4, "
                             f"got input shape {tuple(input_shape)}")
    return ARCHITECTURES[name][1](tuple(input_shape), classes)


def digits_small(width: int = 1) -> nn.Sequential:
    """``mnist_small`` for scikit-learn's 8x8 digits."""
    return mnist_small(width, in_channels=1, in_size=8, classes=10)


def hidden_units(model: nn.Module, example: torch.Tensor) -> int:
    """Number of ReLU units per example (what the paper calls the network's size)."""
    total = 0

    def count(_m, _i, out):
        nonlocal total
        total += out[0].numel()
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        model(example[:1])
    for hk in hooks:
        hk.remove()
    return total
