"""``dualgraph bench train``: robust training against the reference implementation.

Trains the paper's small model on MNIST (``../shared/data/mnist``: its 5,000 training
images; the test set for evaluation) at eps 0.1 with each bound mode (``exact``, or ``R``
random projections), with dualgraph's robust loss and with ``convex_adversarial.robust_loss``
(0.4.4, the paper's code, ``bounded_input=True`` as in its MNIST script: the L∞ ball ∩ [0,1])
through **the same loop** (:func:`dualgraph.train.train` with a ``loss_fn``): the same
initial weights, batch order, epsilon schedule and optimiser. ``--impls`` adds
``reference-fixed``, the reference with its projected bounded objective made the bounded
one (see :func:`reference_loss`), and ``--no-clip`` trains every implementation on the plain
ball. Reports per mode the median training seconds per epoch of each and the ratio (a resumed
run's epochs from before the kill count as they were timed), and the test robust error
(exact, sound bounds, dualgraph's certifier for every model) and clean error at the end.
Runs go to ``--out`` (default ``runs/bench-train``), one folder per implementation and mode,
with the usual ``metrics.csv`` and ``model.onnx``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import torch

from . import shared_dir

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="MNIST folder (default ../shared/data/mnist)")
    p.add_argument("--modes", default="10,50", help="comma-separated bound modes: exact or a projection "
                                                   "dimension (default 10,50)")
    p.add_argument("--eps", type=float, default=0.1, help="target L-inf radius (default 0.1)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per run (default 20)")
    p.add_argument("--ramp-epochs", type=int, default=7, help="epochs of the eps ramp (default 7)")
    p.add_argument("--lr-halve-every", type=int, default=4, help="halve the learning rate every N epochs after the ramp (default 4)")
    p.add_argument("--limit", type=int, help="training examples (default: all)")
    p.add_argument("--test-limit", type=int, help="test examples for the final evaluation (default: all)")
    p.add_argument("--eval-limit", type=int, default=500, help="test examples certified after each epoch")
    p.add_argument("--impls", default="dualgraph,reference",
                   help="comma-separated implementations: dualgraph, reference (convex-adversarial as released), "
                        "reference-fixed (the same with its projected bounded objective made the bounded one; "
                        "diagnostic). Default dualgraph,reference")
    p.add_argument("--no-reference", action="store_true", help="only dualgraph (same as --impls dualgraph)")
    p.add_argument("--no-clip", action="store_true",
                   help="train both on the plain L-inf ball (the reference with bounded_input=False); the final "
                        "evaluation still certifies the ball intersected with [0,1]")
    p.add_argument("--proj-estimator", default="lower-median",
                   help="dualgraph's estimator of the projected L1 terms (default lower-median, the training default)")
    p.add_argument("--resume", action="store_true",
                   help="continue each run from its checkpoint in --out where there is one (a finished run is "
                        "only re-evaluated)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and projections (default 0)")
    p.add_argument("--out", default="runs/bench-train", help="folder of the runs (default runs/bench-train)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of lines")


IMPLS = ("dualgraph", "reference", "reference-fixed")


def reference_loss(proj: int | None, bounded_input: bool = True, fixed: bool = False):
    """``convex_adversarial.robust_loss`` as a ``loss_fn`` of :func:`dualgraph.train.train`.

    With ``proj`` and ``bounded_input`` the reference's intermediate bounds use the box, but
    its final objective is that of the *unclipped* ball: ``InfBallProjBounded`` inherits
    ``InfBall.objective``, a looser loss than the exact bounded one. ``fixed`` gives it
    ``InfBallBounded.objective`` (the bounded one, which reads the same ``l``/``u``) for the
    duration of each call, to show how much of a difference in results that accounts for.
    ``--no-clip`` compares the two on the plain ball, where both bound the same set."""
    from convex_adversarial import robust_loss
    from convex_adversarial.dual_inputs import InfBallBounded, InfBallProjBounded

    def loss_fn(model, x, y, eps):
        released = InfBallProjBounded.objective
        if fixed:
            InfBallProjBounded.objective = InfBallBounded.objective
        try:
            loss, err = robust_loss(model, eps, x, y, proj=proj, norm_type="l1_median" if proj else "l1",
                                    bounded_input=bounded_input)
        finally:
            InfBallProjBounded.objective = released
        return loss, float(err)
    return loss_fn


def main(args: argparse.Namespace) -> int:
    from dualgraph.api import Certifier, load_model
    from dualgraph.certify import certify_dataset
    from dualgraph.data import load_mnist
    from dualgraph.errors import DualgraphError
    from dualgraph.train import TrainConfig, train

    from . import parse_list

    def mode(text: str) -> str:
        if text != "exact" and int(text) < 1:
            raise ValueError(text)
        return text

    modes = parse_list(args.modes, mode, "--modes", "exact,10,50")
    torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir) if args.data_dir else shared_dir(args) / "data" / "mnist"
    if not data_dir.exists():
        raise DualgraphError(f"MNIST not found at {data_dir}; pass --data-dir")
    train_set, test_set = load_mnist(data_dir, "train"), load_mnist(data_dir, "test")
    if args.limit:
        train_set = train_set.take(args.limit)
    final_test = test_set.take(args.test_limit) if args.test_limit else test_set
    impls = ["dualgraph"] if args.no_reference else [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown or not impls:
        raise DualgraphError(f"unknown --impls {', '.join(unknown) or '(none)'}; choose from {', '.join(IMPLS)}")
    if any(i.startswith("reference") for i in impls):
        try:
            import convex_adversarial  # noqa: F401
        except ImportError:
            raise DualgraphError("the reference needs convex-adversarial 0.4.4 (pip install "
                                 "'dualgraph[bench]'), or pass --no-reference") from None
    rows = []
    for mode in modes:
        proj = None if mode == "exact" else int(mode)
        config = TrainConfig(model="small", eps=args.eps, epochs=args.epochs, ramp_epochs=args.ramp_epochs,
                             lr_halve_every=args.lr_halve_every, proj=proj, seed=args.seed,
                             eval_limit=args.eval_limit, clip=None if args.no_clip else (0.0, 1.0),
                             proj_estimator=args.proj_estimator)
        row = {"mode": mode}
        for impl in impls:
            out = Path(args.out) / f"{impl}-{mode}"
            resume = args.resume and (out / "checkpoint.pt").exists()
            loss_fn = None if impl == "dualgraph" else reference_loss(proj, not args.no_clip, impl == "reference-fixed")
            model = train(config, train_set, test_set, out, progress=False, resume=resume, loss_fn=loss_fn)
            with open(out / "metrics.csv") as f:
                seconds = [float(r["train_seconds"]) for r in csv.DictReader(f)]
            report = certify_dataset(Certifier(load_model(out / "model.onnx")), final_test, args.eps,
                                     clip=(0.0, 1.0), progress=False)
            row.update({f"{impl}_s_per_epoch": round(statistics.median(seconds), 2),
                        f"{impl}_robust_error": round(report.robust_error, 4),
                        f"{impl}_clean_error": round(report.clean_error, 4)})
            del model
        if "reference_s_per_epoch" in row and "dualgraph_s_per_epoch" in row:
            row["speedup"] = round(row["reference_s_per_epoch"] / row["dualgraph_s_per_epoch"], 2)
        rows.append(row)
        print(json.dumps(row) if args.json else _line(row), flush=True)
    print(f"machine: {torch.get_num_threads()} torch threads, {sys.platform}; {len(train_set)} training images, "
          f"{len(final_test)} test images, {args.epochs} epochs", file=sys.stderr)
    return 0


def _line(row: dict) -> str:
    return "  ".join(f"{k} {v}" for k, v in row.items())
