"""``dualgraph bench certify``: exact certification throughput against the reference code.

Certifies MNIST test images with the paper's small model (the authors' released
``mnist_small_0_3_stage0`` weights when ``../shared`` is present, eps 0.3, L∞ ∩ [0,1],
batch 50) with dualgraph and with ``convex-adversarial`` 0.4.4 (the paper's code, when
installed), alternating batch by batch so both see the same machine load. Reports the
median seconds per batch, images/s, the speed-up, whether both certify the same images
and the largest difference between their margin bounds (the reference has no rounding
allowance, so that comparison runs dualgraph without it too; the timed run and the
"certified" count are the sound default, and the allowance's cost is shown beside them:
time without it, images it uncertifies, its largest size), and the peak memory of each
(measured in a fresh subprocess per method: peak resident memory during certification
above the level before it, sampled every 2 ms).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import shared_dir

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="ONNX file of the small MNIST model (default: the authors' stage-0 model "
                                   "from ../shared/paper_models)")
    p.add_argument("--data-dir", help="MNIST folder (default ../shared/data/mnist; random images if absent)")
    p.add_argument("--eps", type=float, default=0.3, help="L-inf radius (default 0.3, the paper model's)")
    p.add_argument("--batch-size", type=int, default=50, help="examples per batch (default 50)")
    p.add_argument("--batches", type=int, default=10, help="batches per method (default 10)")
    p.add_argument("--quick", action="store_true", help="3 batches, no memory measurement")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    p.add_argument("--worker", choices=["dualgraph", "reference"], help=argparse.SUPPRESS)


def _setup(args):
    from dualgraph.errors import DualgraphError
    from dualgraph.models.architectures import mnist_small
    shared = shared_dir(args)
    for flag, given in (("--model", args.model), ("--data-dir", args.data_dir)):
        if given and not Path(given).exists():
            raise DualgraphError(f"{flag} {given} does not exist")
    model_path = Path(args.model) if args.model else shared / "paper_models" / "mnist_small_0_3_stage0.onnx"
    data_dir = Path(args.data_dir) if args.data_dir else shared / "data" / "mnist"
    torch.manual_seed(0)
    n = args.batch_size * args.batches
    if data_dir.exists():
        from dualgraph.data import load_mnist
        data = load_mnist(data_dir)
        x, y = data.images[:n], data.labels[:n]
    else:
        print(f"dualgraph bench certify: no MNIST at {data_dir}: timing on random images", file=sys.stderr)
        x, y = torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,))
    module = mnist_small().eval()
    if model_path.exists():  # the reference code needs the torch module: load the ONNX weights into it
        import onnx
        from onnx import numpy_helper
        weights = {t.name: torch.tensor(numpy_helper.to_array(t).copy())
                   for t in onnx.load(str(model_path)).graph.initializer}
        try:
            module.load_state_dict(weights)  # names are the state-dict keys ("0.weight", ...)
        except RuntimeError:
            raise DualgraphError(f"{model_path} is not the paper's small MNIST model (its weights do not fit "
                                 "the architecture the reference implementation runs); pass that model") from None
    else:
        print(f"dualgraph bench certify: no model at {model_path}: timing a randomly initialised one",
              file=sys.stderr)
    return module, model_path, x, y


def _ours(module, model_path, x, **config):
    from dualgraph.api import Certifier, load_model
    from dualgraph.scheduler import BoundConfig
    graph = load_model(model_path) if model_path.exists() else load_model(module, x[:2])
    return Certifier(graph, BoundConfig(**config))


def _reference_margins(module, x, y, eps):
    from convex_adversarial import DualNetwork
    dn = DualNetwork(module, x, eps, bounded_input=True)
    c = torch.eye(10)[y].unsqueeze(1) - torch.eye(10).unsqueeze(0)
    J = dn(c)
    return J[~torch.nn.functional.one_hot(y, 10).bool()].view(len(y), 9)


class _RssSampler:
    """Peak resident memory above the level at start, sampled every 2 ms from /proc (Linux).

    ``ru_maxrss`` cannot do this: it keeps the peak of the whole process, including
    loading the data and the model, which can exceed the peak of certification itself.
    """

    def __init__(self) -> None:
        import threading
        self._page = resource.getpagesize()
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_mb(self) -> float:
        return round((self.peak - self.start) / 2**20, 1)


def _worker(args) -> int:
    """Certify all batches with one method and print its peak memory above the baseline."""
    module, model_path, x, y = _setup(args)
    cert = _ours(module, model_path, x) if args.worker == "dualgraph" else None
    with torch.no_grad(), _RssSampler() as rss:
        for i in range(0, len(y), args.batch_size):
            xb, yb = x[i:i + args.batch_size], y[i:i + args.batch_size]
            if cert is not None:
                cert.certify(xb, yb, args.eps, clip=(0.0, 1.0))
            else:
                _reference_margins(module, xb, yb, args.eps)
    print(json.dumps({"peak_mb": rss.peak_mb}))
    return 0


def _peak_mb(args, method: str) -> float | None:
    cmd = [sys.executable, "-m", "dualgraph.cli", "bench", "certify", "--worker", method,
           "--eps", str(args.eps), "--batch-size", str(args.batch_size), "--batches", str(min(args.batches, 3)),
           "--threads", str(args.threads)]
    if args.model:
        cmd += ["--model", args.model]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if args.shared:
        cmd += ["--shared", args.shared]
    out = subprocess.run(cmd, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"] if out.returncode == 0 else None


def main(args: argparse.Namespace) -> int:
    from ..commands import check_counts
    check_counts(args, batches=1, batch_size=1, threads=1)
    torch.set_num_threads(args.threads)
    if args.worker:
        return _worker(args)
    if args.quick:
        args.batches = min(args.batches, 3)
    module, model_path, x, y = _setup(args)
    cert = _ours(module, model_path, x)
    raw_cert = _ours(module, model_path, x, rounding_allowance=False)
    try:
        import convex_adversarial  # noqa: F401
        have_ref = True
    except ImportError:
        have_ref = False
    ours_t, raw_t, ref_t, agree, max_diff, certified, raw_certified, allowance = [], [], [], True, 0.0, 0, 0, 0.0
    with torch.no_grad():
        for i in range(0, len(y), args.batch_size):
            xb, yb = x[i:i + args.batch_size], y[i:i + args.batch_size]
            t = time.perf_counter()
            result = cert.certify(xb, yb, args.eps, clip=(0.0, 1.0))
            ours_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            raw = raw_cert.certify(xb, yb, args.eps, clip=(0.0, 1.0))
            raw_t.append(time.perf_counter() - t)
            certified += int(result.certified.sum())
            raw_certified += int(raw.certified.sum())
            allowance = max(allowance, float((raw.margins - result.margins).max()))
            if have_ref:
                t = time.perf_counter()
                ref = _reference_margins(module, xb, yb, args.eps)
                ref_t.append(time.perf_counter() - t)
                agree &= bool(((ref > 0).all(1) == raw.certified).all())
                max_diff = max(max_diff, float((ref - raw.margins).abs().max()))
    b = args.batch_size
    row = {"machine": f"{torch.get_num_threads()} torch threads, {sys.platform}", "images": len(y), "eps": args.eps,
           "batch_size": b, "dualgraph_s_per_batch": round(statistics.median(ours_t), 4),
           "dualgraph_images_per_s": round(b / statistics.median(ours_t), 1), "certified": certified,
           "without_allowance_s_per_batch": round(statistics.median(raw_t), 4),
           "certified_without_allowance": raw_certified, "max_allowance": round(allowance, 6)}
    if have_ref:
        row.update({"reference_s_per_batch": round(statistics.median(ref_t), 4),
                    "reference_images_per_s": round(b / statistics.median(ref_t), 1),
                    "speedup": round(statistics.median(ref_t) / statistics.median(ours_t), 2),
                    "same_certified_set_without_allowance": agree, "max_margin_difference": max_diff})
    if not args.quick:
        row["dualgraph_peak_mb"] = _peak_mb(args, "dualgraph")
        if have_ref:
            row["reference_peak_mb"] = _peak_mb(args, "reference")
    if args.json:
        print(json.dumps(row))
    else:
        width = max(map(len, row))
        print("\n".join(f"{k:<{width}}  {v}" for k, v in row.items()))
    return 0
