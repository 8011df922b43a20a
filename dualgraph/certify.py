"""Certify a model on a dataset: robust and clean error over an L-inf / L2 ball.

The robust error is the fraction of examples for which some margin ``logit[y] - logit[j]``
(``j != y``) is not proved positive over the whole input set; the clean error is the
fraction misclassified at the unperturbed input (a misclassified example is never
certified).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .api import Certifier
from .deadline import NEVER, Deadline, DeadlineExceeded
from .data import Dataset
from .errors import DualgraphError


@dataclass
class CertifyReport:
    """Aggregate result of :func:`certify_dataset`; ``certified`` is per example."""

    n: int
    eps: float
    norm: str
    clean_error: float
    robust_error: float
    seconds: float
    certified: torch.Tensor = field(repr=False)
    correct: torch.Tensor = field(repr=False)
    requested: int | None = None  # examples asked for, when a timeout stopped the run early

    @property
    def images_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")

    def to_json(self) -> dict:
        out = {"n": self.n, "eps": self.eps, "norm": self.norm, "clean_error": round(self.clean_error, 6),
               "robust_error": round(self.robust_error, 6), "certified": int(self.certified.sum()),
               "seconds": round(self.seconds, 4), "images_per_second": round(self.images_per_second, 2)}
        if self.requested is not None:
            out.update(timed_out=True, requested=self.requested)
        return out

    def table(self) -> str:
        rows = [("examples", f"{self.n}"), ("eps", f"{self.eps:g} ({self.norm})"),
                ("clean error", f"{100 * self.clean_error:.2f}%"),
                ("robust error", f"{100 * self.robust_error:.2f}%"),
                ("certified", f"{int(self.certified.sum())} / {self.n}"
                              + (f" (timed out: {self.n} of {self.requested} examples done)"
                                 if self.requested is not None else "")),
                ("time", f"{self.seconds:.2f} s ({self.images_per_second:.1f} images/s)")]
        return key_value_table(rows)


def certify_dataset(certifier: Certifier, data: Dataset, eps: float, norm: str = "linf",
                    clip: tuple[float, float] | None = (0.0, 1.0), batch_size: int = 50,
                    progress: bool = True, deadline: Deadline = NEVER) -> CertifyReport:
    """Certify every example of ``data`` in batches; see the module docstring for the errors.

    Under ``torchrun`` each rank certifies a contiguous slice and every rank returns the
    report of the whole set (:mod:`dualgraph.distributed`). When ``deadline`` passes, the
    run stops and the report covers the examples finished (``requested`` says how many
    were asked for)."""
    from .distributed import gather, world
    w = world(certifier.device.type)
    full = len(data)
    if w.size > 1:
        part = w.share(full)
        data = Dataset(data.images[part], data.labels[part], data.name, data.num_classes)
        progress = progress and w.is_main
    if batch_size < 1:
        raise DualgraphError(f"batch size must be at least 1, got {batch_size}")
    if data.num_classes != certifier.num_outputs:
        raise DualgraphError(f"the dataset has {data.num_classes} classes but the model has "
                             f"{certifier.num_outputs} outputs; pick the matching dataset or model")
    n = len(data)
    certified, correct = [], []
    start = time.perf_counter()
    with tqdm(total=n, unit="img", desc="certifying", disable=not progress, leave=False) as bar:
        for i in range(0, n, batch_size):
            x, y = data.images[i:i + batch_size], data.labels[i:i + batch_size]
            certifier.scheduler.deadline = deadline
            try:
                result = certifier.certify(x, y, eps, norm, clip if norm == "linf" else None)
            except DeadlineExceeded:
                break
            finally:
                certifier.scheduler.deadline = NEVER
            certified.append(result.certified)
            correct.append(result.correct)
            bar.update(len(y))
            bar.set_postfix(certified=f"{int(torch.cat(certified).sum())}/{bar.n}")
    seconds = time.perf_counter() - start
    cert, corr = torch.cat(certified) if certified else torch.zeros(0, dtype=torch.bool), \
        torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    if w.size > 1:
        cert, corr = gather(cert, w), gather(corr, w)
        seconds = float(gather(torch.tensor([seconds]), w).max())
    done = len(cert)
    if done == 0 and full > 0:
        raise DualgraphError("the time limit passed before the first batch was certified; allow more time "
                             "(--timeout) or use a smaller --batch-size")
    return CertifyReport(done, eps, norm, 1 - corr.double().mean().item(), 1 - cert.double().mean().item(),
                         seconds, cert, corr, requested=full if done < full else None)


def key_value_table(rows: list[tuple[str, str]]) -> str:
    """The CLI's report layout: one ``key  value`` line per row, keys padded to one width."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
