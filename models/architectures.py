"""Architectures of the paper (Wong et al. 2018, Appendix), as torch modules.

``mnist_small`` is the model of ``../shared/paper_models`` (Conv(1->16,4,s2,p1), ReLU,
Conv(16->32,4,s2,p1), ReLU, Flatten, Linear(1568->100), ReLU, Linear(100->10)); the
``width`` factor scales every hidden layer, which the scaling benchmark uses to sweep
network sizes. ``digits_small`` is the same shape for 8x8 inputs (the embedded default).
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
