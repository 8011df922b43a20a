"""Train the zoo's ``digits-small`` model robustly and export it to ONNX.

Usage (from the repository root)::

    python scripts/train_digits.py --out models/digits_small.onnx

trains :func:`dualgraph.models.architectures.digits_small` on the train part of
:func:`dualgraph.data.split_digits` (scikit-learn's bundled 8x8 digits, seed 0) with the
paper's robust training (Wong et al. 2018, Section 4; DESIGN.md "Training"):

* robust loss: cross-entropy on ``-J(C)``, where row ``j`` of ``C`` is ``e_y - e_j`` and
  ``J`` is the dual bound of Theorem 1. With ``f_j = -J_j`` (``j != y``) and ``f_y = 0``
  (the bound of the ``j = y`` row is exactly 0), ``CE(f, y) = log(1 + sum_j exp(-J_j))``;
* epsilon ramped linearly (per batch) from 0.01 to the target over the first epochs;
* Adam, learning rate 1e-3, batch 50; exact bounds (8x8 inputs are small enough);
  30 epochs with the ramp over the first 10 (the paper's 20 of 60), about 4 minutes on
  one busy CPU core.

The loss is the library's own :func:`dualgraph.training.robust_loss` (the module lowered
through torch.fx once, its IR constants bound to the live parameters, so ``J`` is a
differentiable function of the weights and ``loss.backward()`` trains the module).

The exported file is then certified with the same path the CLI uses
(``dualgraph.api.load_model`` on the ONNX file, then ``certify_dataset``) on the test
part, and the numbers go into ``<out>.json`` next to the model, which ``tests/test_zoo.py``
checks. ``--eval-only`` re-measures an existing ONNX file without training.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dualgraph.api import Certifier
from dualgraph.data import split_digits
from dualgraph.models.architectures import digits_small
from dualgraph.scheduler import BoundConfig
from dualgraph.training import robust_loss

HERE = Path(__file__).resolve().parent


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(args) -> nn.Module:
    seed_everything(args.seed)
    train_set, _ = split_digits(seed=args.split_seed)
    model = digits_small()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    n = len(train_set)
    steps_per_epoch = (n + args.batch_size - 1) // args.batch_size
    ramp_steps = max(1, args.ramp_epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)
    step = 0
    start = time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=gen)
        tot_loss = tot_rob = tot_err = 0.0
        for i in range(0, n, args.batch_size):
            idx = perm[i:i + args.batch_size]
            x, y = train_set.images[idx], train_set.labels[idx]
            eps = args.eps_start + (args.eps - args.eps_start) * min(1.0, step / ramp_steps)
            model.train()
            loss, robust_err = robust_loss(model, x, y, eps, BoundConfig(), clip=(0.0, 1.0))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            with torch.no_grad():
                tot_loss += float(loss) * len(y)
                tot_rob += robust_err * len(y)
                tot_err += float((model(x).argmax(1) != y).sum())
        print(f"epoch {epoch + 1:3d}/{args.epochs}  eps {eps:.4f}  robust loss {tot_loss / n:.4f}  "
              f"train robust err {tot_rob / n:.4f}  train err {tot_err / n:.4f}  "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    model.eval()
    return model


def export(model: nn.Module, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 1, 8, 8)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), str(out), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)


def check_export(model: nn.Module, out: Path, x: torch.Tensor) -> float:
    """Largest difference between the ONNX file (onnxruntime) and the torch module on ``x``."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    return float(np.abs(got - ref).max())


def evaluate(onnx_path: Path, eps: float, split_seed: int, batch_size: int = 50) -> dict:
    """Clean and robust error of the ONNX file on the digits test part, the CLI's way."""
    from dualgraph.api import load_model
    from dualgraph.certify import certify_dataset
    _, test_set = split_digits(seed=split_seed)
    cert = Certifier(load_model(str(onnx_path)))
    report = certify_dataset(cert, test_set, eps, "linf", (0.0, 1.0), batch_size, progress=False)
    return {"clean_error": round(report.clean_error, 6), "robust_error": round(report.robust_error, 6),
            "n_test": report.n, "correct": int(report.correct.sum()),
            "certified": int(report.certified.sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "digits_small.onnx")
    p.add_argument("--eps", type=float, default=0.1, help="target L-inf eps on [0,1] pixels")
    p.add_argument("--eps-start", type=float, default=0.01)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--ramp-epochs", type=int, default=10, help="epochs over which eps ramps up")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling")
    p.add_argument("--split-seed", type=int, default=0, help="seed of split_digits (0: the CLI's split)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: the small kernels here gain nothing from more, and lose a lot on a busy machine)")
    p.add_argument("--eval-only", action="store_true", help="only re-measure --out and rewrite its json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    json_path = args.out.with_suffix(".json")
    if args.eval_only:
        meta = json.loads(json_path.read_text()) if json_path.exists() else {}
    else:
        model = train(args)
        export(model, args.out)
        _, test_set = split_digits(seed=args.split_seed)
        diff = check_export(model, args.out, test_set.images)
        print(f"exported {args.out} ({args.out.stat().st_size} bytes); onnxruntime vs torch: {diff:.2e}")
        if diff > 1e-4:
            raise SystemExit(f"the exported model disagrees with torch by {diff}")
        meta = {"seed": args.seed, "split_seed": args.split_seed, "epochs": args.epochs,
                "ramp_epochs": args.ramp_epochs, "eps_start": args.eps_start, "batch_size": args.batch_size,
                "lr": args.lr,
                "command": "python scripts/train_digits.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    meta["eps"] = args.eps if not args.eval_only else meta.get("eps", args.eps)
    metrics = evaluate(args.out, meta["eps"], meta.get("split_seed", args.split_seed))
    meta.update(metrics, norm="linf", clip=[0.0, 1.0], dataset="digits", split="test",
                measured_with="dualgraph.api.load_model(onnx) + dualgraph.certify.certify_dataset, batch 50")
    json_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"test: clean error {100 * metrics['clean_error']:.2f}%  robust error "
          f"{100 * metrics['robust_error']:.2f}% at eps {meta['eps']} (n={metrics['n_test']}); wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
