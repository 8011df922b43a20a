"""Provably robust training (the paper's Section 4 recipe) with checkpoints and export.

:func:`train` minimises the robust loss of :func:`dualgraph.training.robust_loss`
(cross-entropy on ``-J(C)``, ``C`` the margin rows ``e_y - e_j``) with the paper's
schedule: epsilon ramped linearly, per batch, from ``eps_start`` to ``eps`` over the first
``ramp_epochs`` epochs; then the learning rate halved every ``lr_halve_every`` epochs.
Recipes (``recipe``): ``mnist`` (and the bundled digits) Adam 1e-3, ``eps_start`` 0.01;
``cifar`` SGD 0.05, momentum 0.9, weight decay 5e-4, ``eps_start`` 0.001; both batch 50,
60 epochs, ramp 20, halving every 10. With ``proj = r`` the intermediate bounds are random
projections during training (Section 3.2); evaluation is always exact.

Every epoch writes, atomically, ``checkpoint.pt`` (weights, optimiser, the shuffling and
projection generators, metrics), ``metrics.csv`` (epoch, eps, lr, train loss / robust
error / error, test error / robust error at the target eps, seconds) and ``metrics.png``.
``resume=True`` continues from the checkpoint; nothing in an epoch depends on the total
number of epochs, so a resumed run ends with the same weights as an uninterrupted one.
At the end ``model.onnx`` is exported and checked against the module in onnxruntime.
Under ``torchrun`` the batches are shared by the ranks and the gradients summed
(:mod:`dualgraph.distributed`); rank 0 writes the files.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .data import Dataset
from .errors import DualgraphError
from .files import make_folder
from .input_sets import check_eps
from .scheduler import BoundConfig

RECIPES = {
    "mnist": dict(optimizer="adam", lr=1e-3, eps_start=0.01),
    "cifar": dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, eps_start=0.001),
}
"""The paper's optimiser recipes; ``TrainConfig`` fields left at None take them."""

METRICS = ("epoch", "eps", "lr", "train_loss", "train_robust_error", "train_error", "test_error",
           "test_robust_error", "train_seconds", "eval_seconds")


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how (None: the recipe's value)."""

    model: str = "small"
    eps: float = 0.1
    norm: str = "linf"
    clip: tuple[float, float] | None = (0.0, 1.0)
    epochs: int = 60
    ramp_epochs: int = 20
    lr_halve_every: int = 10
    batch_size: int = 50
    recipe: str = "mnist"
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    eps_start: float | None = None
    proj: int | None = None
    proj_estimator: str = "lower-median"
    seed: int = 0
    device: str = "cpu"
    eval_limit: int | None = 1000

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise DualgraphError(f"unknown recipe '{self.recipe}'; choose one of {', '.join(RECIPES)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise DualgraphError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.ramp_epochs < 0 or self.lr_halve_every < 0:
            raise DualgraphError("--ramp-epochs and --lr-halve-every must be >= 0")
        check_eps(self.eps)
        if self.clip is not None and self.eps > self.clip[1] - self.clip[0]:
            raise DualgraphError(f"eps {self.eps} is larger than the data range {self.clip[1] - self.clip[0]:g}: "
                                 "every input would be in the ball; pixels are in [0, 1]")
        if self.optimizer not in (None, "adam", "sgd"):
            raise DualgraphError(f"unknown optimizer '{self.optimizer}'; use adam or sgd")
        if self.proj is not None and self.proj < 1:
            raise DualgraphError(f"--proj must be a positive number of projections, got {self.proj}")
        for name, least, strict in (("lr", 0.0, True), ("momentum", 0.0, False), ("weight_decay", 0.0, False)):
            value = getattr(self, name)  # None: the recipe's value
            if value is not None and not (math.isfinite(value) and (value > least if strict else value >= least)):
                raise DualgraphError(f"--{name.replace('_', '-')} must be a finite number "
                                     f"{'>' if strict else '>='} {least:g}, got {value}")
        if self.eps_start is not None:
            check_eps(self.eps_start)
        if self.epochs < self.ramp_epochs:
            warnings.warn(f"--epochs {self.epochs} ends before the eps ramp (--ramp-epochs {self.ramp_epochs}): "
                          f"training reaches about eps {self.eps_at(self.epochs, 1):g}, not {self.eps:g} (the test "
                          "robust error is measured at the target eps)", UserWarning, stacklevel=3)
        if self.eval_limit is not None and self.eval_limit < 1:
            raise DualgraphError(f"--eval-limit must be a positive number of test examples (0: all), "
                                 f"got {self.eval_limit}")
        from .projections import ESTIMATORS
        if self.proj_estimator not in ESTIMATORS:
            raise DualgraphError(f"unknown --proj-estimator '{self.proj_estimator}'; use {', '.join(ESTIMATORS)}")

    def setting(self, name: str):
        value = getattr(self, name)
        return value if value is not None else RECIPES[self.recipe].get(name, 0.0)

    def eps_at(self, step: int, steps_per_epoch: int) -> float:
        """The training eps after ``step`` batches: the linear ramp of the paper."""
        start = min(float(self.setting("eps_start")), self.eps)
        ramp = self.ramp_epochs * steps_per_epoch
        return self.eps if ramp == 0 else start + (self.eps - start) * min(1.0, step / ramp)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of epoch ``epoch`` (0-based): halved every ``lr_halve_every`` after the ramp."""
        lr = float(self.setting("lr"))
        if self.lr_halve_every:
            lr *= 0.5 ** (max(0, epoch - self.ramp_epochs) // self.lr_halve_every)
        return lr

    def bound_config(self, seed: int) -> BoundConfig:
        """The bounds of the training loss: an objective, not a proof, so without the rounding
        allowance (evaluation after each epoch is exact and sound)."""
        return BoundConfig(proj=self.proj, proj_seed=seed if self.proj else None, rounding_allowance=False,
                           proj_estimator=self.proj_estimator)


def recipe_for(dataset: str) -> str:
    return "cifar" if dataset == "cifar10" else "mnist"


def train(config: TrainConfig, train_set: Dataset, test_set: Dataset, out: str | Path, *,
          resume: bool = False, progress: bool = True, seed_offset: int = 0, loss_fn=None) -> nn.Module:
    """Train ``config.model`` robustly on ``train_set``; see the module docstring for what is
    written to ``out``. Returns the trained module (in eval mode).

    ``loss_fn(model, x, y, eps) -> (loss, robust_error)`` replaces dualgraph's robust loss
    (the training benchmark runs the reference implementation through the same loop: same
    initial weights, batches, schedule and optimiser)."""
    from dualgraph.models.architectures import build_architecture
    from .distributed import all_reduce_gradients, all_reduce_sum, barrier, world
    from .training import robust_loss

    out = Path(out)
    w = world(config.device)
    progress = progress and w.is_main
    seed = config.seed + seed_offset
    torch.manual_seed(seed)
    model = build_architecture(config.model, tuple(train_set.images.shape[1:]), train_set.num_classes)
    model = model.to(config.device)
    opt = _optimizer(config, model)
    shuffle = torch.Generator().manual_seed(seed)
    bound_config = config.bound_config(seed)
    history: list[dict] = []
    first_epoch, projection_state = 0, None
    checkpoint = out / "checkpoint.pt"
    data = _fingerprint(train_set)
    if resume:
        first_epoch, history, projection_state = _load_checkpoint(checkpoint, config, data, model, opt, shuffle)
        if w.is_main:  # the export of an earlier run is not this run's until it ends
            (out / "model.onnx").unlink(missing_ok=True)
    elif w.is_main:
        make_folder(out, "--out")
    n = len(train_set)
    steps = (n + config.batch_size - 1) // config.batch_size
    x_all, y_all = train_set.images, train_set.labels
    for epoch in range(first_epoch, config.epochs):
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = config.lr_at(epoch)
        if projection_state is not None:  # replay the draws of the interrupted run
            _projection_generator(model, x_all, bound_config, config.device).set_state(projection_state)
            projection_state = None
        perm = torch.randperm(n, generator=shuffle)
        totals = np.zeros(3)
        model.train()
        with tqdm(total=n, unit="img", desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress,
                  leave=False) as bar:
            for b in range(steps):
                batch = perm[b * config.batch_size:(b + 1) * config.batch_size]
                idx = batch[w.share(len(batch))]  # this rank's share of the batch
                x, y = x_all[idx].to(config.device), y_all[idx].to(config.device)
                eps = config.eps_at(epoch * steps + b, steps)
                opt.zero_grad(set_to_none=True)
                if len(idx):
                    if loss_fn is None:
                        loss, robust_err = robust_loss(model, x, y, eps, bound_config, config.clip, config.norm)
                    else:
                        loss, robust_err = loss_fn(model, x, y, eps)
                    (loss * (len(idx) / len(batch))).backward()  # summed over ranks: the batch mean
                    with torch.no_grad():
                        err = float((model(x).argmax(1) != y).double().mean())
                    sums = torch.tensor([float(loss.detach()), robust_err, err], dtype=torch.float64) * len(idx)
                else:
                    sums = torch.zeros(3, dtype=torch.float64)
                all_reduce_gradients(model, w)
                opt.step()
                totals += all_reduce_sum(sums, w).numpy()
                bar.update(len(batch))
                bar.set_postfix(loss=f"{totals[0] / max(1, bar.n):.3f}", eps=f"{eps:.3f}")
        model.eval()
        trained = time.perf_counter()
        test_err, test_rob = evaluate(model, test_set, config)
        history.append(dict(zip(METRICS, [epoch + 1, eps, config.lr_at(epoch), *(float(t) for t in totals / n),
                                          test_err, test_rob, trained - start, time.perf_counter() - trained])))
        if progress:
            row = history[-1]
            tqdm.write(f"epoch {epoch + 1}/{config.epochs}: eps {row['eps']:.4f} loss {row['train_loss']:.4f} "
                       f"train robust err {row['train_robust_error']:.4f} test err {test_err:.4f} "
                       f"test robust err {test_rob:.4f} ({row['train_seconds']:.1f} s)")
        generator = _projection_generator(model, x_all, bound_config, config.device)
        if w.is_main:
            _save_checkpoint(checkpoint, config, data, model, opt, shuffle, history, epoch + 1,
                             None if generator is None else generator.get_state())
            write_metrics(out, history)
        barrier(w)
    model.eval()
    if w.is_main:
        export_onnx(model, out / "model.onnx", test_set.images[:8])
    barrier(w)
    return model


def _projection_generator(model: nn.Module, x: torch.Tensor, bound_config: BoundConfig, device: str):
    """The generator of the training loss's random projections (its state is checkpointed)."""
    if bound_config.proj is None:
        return None
    from .training import lower_module
    return lower_module(model, x[:2].to(device)).scheduler(bound_config).projection_generator(device)


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    kind = config.setting("optimizer")
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr_at(0), weight_decay=float(config.setting("weight_decay")))
    return torch.optim.SGD(model.parameters(), lr=config.lr_at(0), momentum=float(config.setting("momentum")),
                           weight_decay=float(config.setting("weight_decay")))


def evaluate(model: nn.Module, data: Dataset, config: TrainConfig) -> tuple[float, float]:
    """Clean error and robust error (exact bounds, target eps) on ``config.eval_limit`` examples."""
    from .api import Certifier, load_model
    from .certify import certify_dataset
    subset = data if config.eval_limit is None else data.take(config.eval_limit)
    with torch.no_grad():
        graph = load_model(model, subset.images[:2].to(config.device), warn_training=False)  # evaluation: inference
    cert = Certifier(graph, device=config.device)
    report = certify_dataset(cert, subset, config.eps, config.norm, config.clip, config.batch_size, progress=False)
    return report.clean_error, report.robust_error


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _fingerprint(data: Dataset) -> dict:
    """What a checkpoint records of its training set: a resumed run must train on the same one."""
    digest = hashlib.sha256(data.images.detach().cpu().contiguous().numpy().tobytes())
    digest.update(data.labels.detach().cpu().contiguous().numpy().tobytes())
    return {"dataset": data.name, "examples": len(data), "sha256": digest.hexdigest()[:16]}


def _save_checkpoint(path: Path, config, data: dict, model, opt, shuffle, history, epoch, projection_state) -> None:
    state = {"config": dataclasses.asdict(config), "data": data, "model": model.state_dict(),
             "optimizer": opt.state_dict(), "shuffle": shuffle.get_state(), "history": history, "epoch": epoch,
             "projection_state": projection_state}
    _atomic_write(path, lambda p: torch.save(state, p))


def _load_checkpoint(path: Path, config, data: dict, model, opt,
                     shuffle) -> tuple[int, list[dict], torch.Tensor | None]:
    """Load ``path`` into ``model``, ``opt`` and ``shuffle`` after checking that it was made with
    ``config`` (``--epochs`` may grow) on the training set ``data`` (:func:`_fingerprint`)."""
    if not path.exists():
        raise DualgraphError(f"--resume: no checkpoint at {path}; start without --resume")
    try:
        state = torch.load(path, weights_only=False)
        saved = state["config"]
    except Exception as exc:  # noqa: BLE001 -- truncated, foreign or corrupt files
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DualgraphError(f"--resume: {path} is not a dualgraph checkpoint (cannot read it: {reason}); "
                             "start without --resume in a new --out folder") from None
    for key, value in dataclasses.asdict(config).items():
        if key not in ("epochs", "device") and _normal(saved.get(key)) != _normal(value):
            raise DualgraphError(f"--resume: the checkpoint in {path.parent} was made with {key}={saved.get(key)!r}, "
                                 f"not {value!r}; use the same settings (only --epochs may grow)")
    if state.get("data", data) != data:  # (checkpoints before the record have none)
        was = state.get("data") or {}
        raise DualgraphError(f"--resume: the checkpoint in {path.parent} was trained on {was.get('examples', '?')} "
                             f"examples of {was.get('dataset', '?')}, not these {data['examples']} of "
                             f"{data['dataset']}; resume with the same --dataset, --data-dir and --limit")
    if int(state["epoch"]) > config.epochs:
        raise DualgraphError(f"--resume: the checkpoint in {path.parent} has {state['epoch']} epochs done; "
                             f"--epochs {config.epochs} would not finish it (only --epochs may grow)")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    shuffle.set_state(state["shuffle"])
    return int(state["epoch"]), list(state["history"]), state.get("projection_state")


def _normal(v):
    return list(v) if isinstance(v, tuple) else v


def write_metrics(out: Path, history: list[dict]) -> None:
    """``metrics.csv`` and ``metrics.png`` (loss and error curves) from the epoch history."""
    def write_csv(p):
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRICS)
            w.writeheader()
            for row in history:
                w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    _atomic_write(out / "metrics.csv", write_csv)
    _atomic_write(out / "metrics.png", lambda p: _plot(history, p))


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in history], label="train robust loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    for key, label in (("train_robust_error", "train robust error"), ("test_robust_error", "test robust error"),
                       ("train_error", "train error"), ("test_error", "test error")):
        ax2.plot(epochs, [r[key] for r in history], label=label)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("error")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    with open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)


def export_onnx(model: nn.Module, path: Path, example: torch.Tensor) -> float:
    """Export ``model`` to ONNX (opset 17, dynamic batch) and check it in onnxruntime against
    the module on ``example``; returns the largest difference (an error above 1e-4)."""
    import onnxruntime as ort
    model = model.cpu().eval()
    example = example.cpu()

    def export(p):
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated but needs no onnxscript
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example[:1],), str(p), input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                              dynamo=False)
    tmp = path.with_name(path.name + ".tmp")
    export(tmp)
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": example.numpy()})[0]
    with torch.no_grad():
        ref = model(example).numpy()
    diff = float(np.abs(got - ref).max())
    if not diff <= 1e-4 * (1 + float(np.abs(ref).max())):
        tmp.unlink(missing_ok=True)
        raise DualgraphError(f"the exported ONNX model disagrees with the module by {diff:.3g}; not written")
    os.replace(tmp, path)
    return diff


def save_config(out: Path, config: TrainConfig, extra: dict) -> None:
    _atomic_write(out / "config.json", lambda p: p.write_text(json.dumps({**dataclasses.asdict(config), **extra},
                                                                           indent=1) + "\n"))
