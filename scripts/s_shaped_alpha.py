"""Optimised lines of Sigmoid and Tanh: certified images with ``crown`` vs ``alpha``.

Usage (from the repository root; needs ``../shared/data/mnist``)::

    python scripts/s_shaped_alpha.py [--eps 0.015] [--images 100] [--threads 1]

trains two MLPs 784-100-100-10 (Sigmoid, Tanh), seed 0, normally (no robust loss: the
nets real users export), 3 epochs of Adam on the 5,000 MNIST training images, exports each
to ONNX, loads it back the way the CLI does and certifies the first ``--images`` test images
in an L-inf ball clipped to [0, 1] with ``--relaxation crown`` (the chord's parallel lines)
and ``alpha`` (both lines of every unit free, tangent lines parametrised by their slopes,
intermediate bounds optimised too). Prints one row per model and relaxation: clean accuracy,
certified images, robust error, the mean over the images of the bound of their worst margin
(higher is tighter; every image's rows optimised, where certification stops at a certificate)
and the certification's images per second.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from dualgraph.api import Certifier, load_model, margin_spec
from dualgraph.bound_config import BoundConfig
from dualgraph.certify import certify_dataset
from dualgraph.data import load_mnist


def train(activation: type[nn.Module], data, epochs: int = 3) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 100), activation(), nn.Linear(100, 100), activation(),
                        nn.Linear(100, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(data))
        for i in range(0, len(data), 50):
            batch = order[i:i + 50]
            loss = nn.functional.cross_entropy(net(data.images[batch]), data.labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared", help="the project's shared folder (MNIST)")
    parser.add_argument("--eps", type=float, default=0.015)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mnist = Path(args.shared) / "data" / "mnist"
    train_set, test_set = load_mnist(mnist, "train"), load_mnist(mnist, "test").take(args.images)
    print(f"| model | relaxation | clean | certified | robust error | mean worst margin bound | images/s |  "
          f"(eps {args.eps}, first {args.images} test images, {args.threads} thread(s))")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for activation in (nn.Sigmoid, nn.Tanh):
            net = train(activation, train_set)
            path = Path(tmp) / f"{activation.__name__}.onnx"
            torch.onnx.export(net, torch.zeros(1, 1, 28, 28), str(path), dynamo=False)
            graph = load_model(str(path))
            for relaxation in ("crown", "alpha"):
                certifier = Certifier(graph, BoundConfig(relu_relaxation=relaxation))
                report = certify_dataset(certifier, test_set, args.eps, progress=False)
                # the bound of every image's worst margin, all optimised (certify stops at a certificate)
                box = certifier.input_set(test_set.images, args.eps, "linf", (0.0, 1.0))
                worst = certifier.lower_bounds(box, margin_spec(test_set.labels, 10)).amin(1)
                n = report.n
                print(f"| {activation.__name__} | {relaxation} | {int(report.correct.sum())}/{n} | "
                      f"{int(report.certified.sum())}/{n} | {100 * report.robust_error:.0f}% | "
                      f"{float(worst.mean()):.3f} | {report.images_per_second:.1f} |")

if __name__ == "__main__":
    main()
