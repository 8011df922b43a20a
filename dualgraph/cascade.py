"""Cascades of provably robust models (the paper's Section 3.3).

Training (:func:`train_cascade`): stage 1 is trained on all training examples; stage
``m + 1`` only on those that stages ``1..m`` do not certify, each against its own
prediction (exact bounds at the target eps). Each stage is a full :func:`dualgraph.train.train`
run in ``OUT/stage<m>/``; ``OUT/cascade.json`` is the manifest (``"kind": "cascade"``,
``"eps"``, ``"stages"``: ONNX paths relative to the manifest), the format of the authors'
released cascade.

Certification (:func:`certify_cascade`): an example goes to the first stage that
certifies it against that stage's own prediction; that prediction is the cascade's, and
the example is robustly correct iff it equals the label. An example no stage certifies
is predicted by the last stage and counts as a robust error. This is the paper's robust
error (its Table 2 and the authors' code): each test point's own routing is certified.

It is not a bound for the cascade as a classifier of perturbed inputs: a point ``x'``
near ``x`` is routed by its own certificates, and may go to another stage than ``x``
(one that certifies ``x'`` but not ``x``, or none, then the last stage), which can
predict another class (found by a review: a stage certifies ``x`` but not ``x' = x -
0.09``, which the last stage classifies otherwise). The report adds the **routed robust
error**, which holds against such an adversary: ``x`` counts iff every stage predicts
its label at ``x`` and the last stage certifies the label on the ball around ``x``.
Whichever stage certifies an ``x'`` in the ball predicts there what it predicts at
``x`` (``x`` is in the ball around ``x'``), and an ``x'`` no stage certifies gets the
last stage's label. (Certifying a stage on the ball of twice the radius would not do:
the bounds are not monotone in the input set, so it does not show that the stage's
certificate holds around every ``x'``.)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .certify import key_value_table
from .data import Dataset
from .errors import DualgraphError
from .files import make_folder


@dataclass
class CascadeReport:
    """Per-example results of a cascade and the cumulative share each stage certifies."""

    n: int
    eps: float
    norm: str
    stages: list[str]
    clean_error: float
    robust_error: float
    cumulative_certified: list[float]
    seconds: float
    stage_of: torch.Tensor = field(repr=False)  # [N] index of the certifying stage, -1 if none
    routed_robust_error: float = 1.0  # against inputs the routing itself depends on (module docstring)

    def to_json(self) -> dict:
        # "robust_error" is a bound, as for a single model: the routed one; the paper's figure is
        # under its own name (a review read it as certified)
        return {"kind": "cascade", "n": self.n, "eps": self.eps, "norm": self.norm, "stages": self.stages,
                "clean_error": round(self.clean_error, 6), "robust_error": round(self.routed_robust_error, 6),
                "paper_robust_error": round(self.robust_error, 6),
                "cumulative_certified": [round(c, 6) for c in self.cumulative_certified],
                "seconds": round(self.seconds, 4)}

    def table(self) -> str:
        rows = [("examples", f"{self.n}"), ("eps", f"{self.eps:g} ({self.norm})")]
        rows += [(f"stage {i} certifies", f"{100 * c:.2f}% (cumulative)  {name}")
                 for i, (c, name) in enumerate(zip(self.cumulative_certified, self.stages))]
        rows += [("clean error", f"{100 * self.clean_error:.2f}%"),
                 ("robust error", f"{100 * self.routed_robust_error:.2f}% (certified: routing moved by the attack too)"),
                 ("paper's robust error", f"{100 * self.robust_error:.2f}% (each point's own routing; not a bound)"),
                 ("time", f"{self.seconds:.2f} s")]
        return key_value_table(rows)


def read_manifest(path: str | Path) -> tuple[list[Path], float | None, str | None]:
    """The stage files (in order), eps and norm of a cascade manifest (``None`` where it names
    none); errors name what is wrong."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except OSError as e:
        raise DualgraphError(f"cannot read cascade manifest {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise DualgraphError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); a cascade manifest "
                             'looks like {"kind": "cascade", "eps": 0.3, "stages": ["a.onnx", "b.onnx"]}') from None
    if not isinstance(manifest, dict) or manifest.get("kind") != "cascade":
        raise DualgraphError(f'{path} is not a cascade manifest (it needs "kind": "cascade")')
    stages = manifest.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, str) for s in stages):
        raise DualgraphError(f'{path}: "stages" must be a non-empty list of ONNX file paths')
    files = [path.parent / s for s in stages]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise DualgraphError(f"{path}: stage file(s) not found: {', '.join(missing)}")
    eps, norm = manifest.get("eps"), manifest.get("norm")
    if eps is not None and (not isinstance(eps, (int, float)) or isinstance(eps, bool)):
        raise DualgraphError(f'{path}: "eps" must be a number')
    if norm is not None and norm not in ("linf", "l2"):
        raise DualgraphError(f'{path}: "norm" must be "linf" or "l2"')
    return files, (float(eps) if eps is not None else None), norm


def load_stages(files: list[Path], config, device="cpu", dtype=torch.float32) -> list:
    """One :class:`~dualgraph.api.Certifier` per stage; all stages must agree on shapes."""
    from .api import Certifier, load_model
    certs = [Certifier(load_model(f), config, device=device, dtype=dtype) for f in files]
    first = certs[0]
    for f, c in zip(files[1:], certs[1:]):
        if c.input.unit_shape != first.input.unit_shape or c.num_outputs != first.num_outputs:
            raise DualgraphError(f"cascade stage {f.name} takes {list(c.input.unit_shape)} -> {c.num_outputs} "
                                 f"outputs but {files[0].name} takes {list(first.input.unit_shape)} -> "
                                 f"{first.num_outputs}; every stage must have the same input and output shapes")
    return certs


def cascade_certified(certs: list, x: torch.Tensor, eps: float, norm: str, clip) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stage_of [B], prediction [B])``: the first stage certifying each example against
    its own prediction (-1: none; the prediction is then the last stage's)."""
    n = x.shape[0]
    stage_of = torch.full((n,), -1, dtype=torch.long)
    prediction = torch.zeros(n, dtype=torch.long)
    open_ = torch.ones(n, dtype=torch.bool)
    for m, cert in enumerate(certs):
        idx = torch.nonzero(open_).flatten()
        if idx.numel() == 0:
            break
        xs = x[idx]
        with torch.no_grad():
            own = cert.forward(xs).argmax(1).cpu()
        result = cert.certify(xs, own, eps, norm, clip)
        prediction[idx] = own
        done = idx[result.certified]
        stage_of[done] = m
        open_[done] = False
    return stage_of, prediction


def routed_robust(certs: list, x: torch.Tensor, labels: torch.Tensor, eps: float, norm: str, clip) -> torch.Tensor:
    """``[B]`` bool: the examples the cascade classifies robustly even where an attack moves
    the routing (module docstring): every stage predicts the label at ``x``, and the last
    stage certifies it on the ball."""
    agree = torch.ones(x.shape[0], dtype=torch.bool)
    for cert in certs:
        with torch.no_grad():
            agree &= cert.forward(x).argmax(1).cpu() == labels
    robust = torch.zeros_like(agree)
    idx = torch.nonzero(agree).flatten()
    if idx.numel():
        robust[idx] = certs[-1].certify(x[idx], labels[idx], eps, norm, clip).certified.cpu()
    return robust


def certify_cascade(certs: list, names: list[str], data: Dataset, eps: float, norm: str = "linf",
                    clip=(0.0, 1.0), batch_size: int = 50, progress: bool = True) -> CascadeReport:
    """Certify ``data`` with the cascade (module docstring); ``names`` label the stages."""
    if batch_size < 1:
        raise DualgraphError(f"batch size must be at least 1, got {batch_size}")
    if data.num_classes != certs[0].num_outputs:
        raise DualgraphError(f"the dataset has {data.num_classes} classes but the cascade's models have "
                             f"{certs[0].num_outputs} outputs")
    start = time.perf_counter()
    stages, preds, routed = [], [], []
    with tqdm(total=len(data), unit="img", desc="certifying cascade", disable=not progress, leave=False) as bar:
        for i in range(0, len(data), batch_size):
            x = data.images[i:i + batch_size]
            s, p = cascade_certified(certs, x, eps, norm, clip)
            stages.append(s)
            preds.append(p)
            routed.append(routed_robust(certs, x, data.labels[i:i + batch_size], eps, norm, clip))
            bar.update(len(s))
    stage_of, prediction = torch.cat(stages), torch.cat(preds)
    labels = data.labels
    robust = (stage_of >= 0) & (prediction == labels)
    cumulative = [float(((stage_of >= 0) & (stage_of <= m)).double().mean()) for m in range(len(certs))]
    return CascadeReport(len(data), eps, norm, names, float((prediction != labels).double().mean()),
                         1 - float(robust.double().mean()), cumulative, time.perf_counter() - start, stage_of,
                         1 - float(torch.cat(routed).double().mean()))


def train_cascade(config, stages: int, train_set: Dataset, test_set: Dataset, out: str | Path, *,
                  resume: bool = False, progress: bool = True) -> Path:
    """Train a ``stages``-model cascade into ``out`` (module docstring); returns the manifest path."""
    from .api import Certifier, load_model
    from .scheduler import BoundConfig
    from .train import train
    if stages < 1:
        raise DualgraphError(f"--cascade needs at least 1 stage, got {stages}")
    out = make_folder(out, "--out")
    remaining = train_set
    files: list[Path] = []
    for m in range(stages):
        stage_dir = out / f"stage{m}"
        if progress:
            print(f"cascade stage {m}: training on {len(remaining)} examples", flush=True)
        # a finished stage resumes too: its checkpoint must have been made with these settings on
        # these examples (train checks both), and it is exported again from that checkpoint
        train(config, remaining, test_set, stage_dir, resume=resume and (stage_dir / "checkpoint.pt").exists(),
              progress=progress, seed_offset=m)
        files.append(stage_dir / "model.onnx")
        certs = [Certifier(load_model(files[-1]), BoundConfig())]
        keep = []
        for i in range(0, len(remaining), config.batch_size):
            s, _ = cascade_certified(certs, remaining.images[i:i + config.batch_size], config.eps, config.norm,
                                     config.clip)
            keep.append(s < 0)
        keep = torch.cat(keep)
        remaining = Dataset(remaining.images[keep], remaining.labels[keep], remaining.name, remaining.num_classes)
        if len(remaining) == 0 and m + 1 < stages:
            if progress:
                print(f"cascade: every training example is certified after stage {m}; stopping", flush=True)
            break
    manifest = {"kind": "cascade", "eps": config.eps, "norm": config.norm,
                "stages": [str(f.relative_to(out)) for f in files]}
    path = out / "cascade.json"
    from .distributed import barrier, world
    w = world(config.device)
    if w.is_main:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, path)
    barrier(w)
    return path
