"""``dualgraph bench gpu``: the device check of the training issue, one prepared run.

On synthetic data of the real sizes (MNIST 1x28x28, CIFAR-10 3x32x32, labels at random):

* a projected (``--proj``, default r = 50) robust training step of the paper's small MNIST
  model and of its CIFAR ResNet: images per second, and the seconds an epoch of the real
  training set (60,000 / 50,000 images) would take at that rate;
* exact certification throughput (images per second) of the small MNIST model, with the
  authors' released weights when ``../shared`` has them (random weights otherwise).

Timings synchronise the device and skip warm-up steps; medians over ``--steps``. It runs on
the CPU too (``--device cpu``), which is how the test suite checks it. For reference, the
paper's Table 1 gives 74 s per MNIST-small epoch (about 810 images/s) on a GTX 1080 Ti.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from . import shared_dir

EPOCH_IMAGES = {"mnist-small": 60_000, "cifar-resnet": 50_000}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to measure (default cuda when available, else cpu)")
    p.add_argument("--proj", type=int, default=50, help="projection dimension of the training steps")
    p.add_argument("--batch-size", type=int, default=50, help="examples per step (default 50)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement (after 2 warm-up steps)")
    p.add_argument("--certify-batches", type=int, default=10, help="batches of exact certification timed (default 10)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, steps: int, device: torch.device) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def training_rate(arch: str, shape: tuple[int, ...], args, device: torch.device) -> dict:
    """Images per second of one projected robust-loss step (loss, backward, Adam)."""
    from dualgraph.bound_config import BoundConfig
    from dualgraph.models.architectures import build_architecture
    from dualgraph.training import robust_loss
    torch.manual_seed(0)
    model = build_architecture(arch, shape, 10).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(args.batch_size, *shape, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    config = BoundConfig(proj=args.proj, proj_seed=0, rounding_allowance=False, proj_estimator="lower-median")

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = robust_loss(model, x, y, 0.1 if shape[0] == 1 else 2 / 255, config, clip=(0.0, 1.0))
        loss.backward()
        opt.step()
    seconds = _median_seconds(step, args.steps, device)
    rate = args.batch_size / seconds
    name = "mnist-small" if arch == "small" else "cifar-resnet"
    return {"what": f"train {name} r={args.proj}", "images_per_second": round(rate, 1),
            "epoch_seconds": round(EPOCH_IMAGES[name] / rate, 1), "step_seconds": round(seconds, 4)}


def certify_rate(args, device: torch.device) -> dict:
    """Images per second of exact, sound certification of the small MNIST model at eps 0.1."""
    from dualgraph.api import Certifier, load_model
    from dualgraph.models.architectures import mnist_small
    path = shared_dir(args) / "paper_models" / "mnist_small_0_3_stage0.onnx"
    if path.exists():
        graph, weights = load_model(path), "released"
    else:
        torch.manual_seed(0)
        graph, weights = load_model(mnist_small().eval(), torch.zeros(2, 1, 28, 28)), "random"
    cert = Certifier(graph, device=device)
    x = torch.rand(args.batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (args.batch_size,))
    seconds = _median_seconds(lambda: cert.certify(x, y, 0.1, clip=(0.0, 1.0)), args.certify_batches, device)
    return {"what": f"certify mnist-small exact ({weights} weights)",
            "images_per_second": round(args.batch_size / seconds, 1), "batch_seconds": round(seconds, 4)}


def main(args: argparse.Namespace) -> int:
    from dualgraph.commands import check_device
    check_device(args.device)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    rows = [training_rate("small", (1, 28, 28), args, device),
            training_rate("resnet", (3, 32, 32), args, device),
            certify_rate(args, device)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if args.json:
        print(json.dumps({"device": name, "batch_size": args.batch_size, "rows": rows}))
    else:
        for r in rows:
            print("  ".join(f"{k} {v}" for k, v in r.items()))
        print(f"device: {name}; batch {args.batch_size}; torch {torch.__version__}", file=sys.stderr)
    return 0
