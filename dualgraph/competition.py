"""The competition runner: every instance of a VNN-COMP instances CSV
(``onnx,vnnlib,timeout``) answered by :func:`dualgraph.verification.verify_instance`,
models loaded once per ONNX file, results written as the competition expects."""

from __future__ import annotations

import csv
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import DualgraphError
from .verification import ANSWERS, VerifyConfig, VerifyModel, verify_instance


def write_result(path: str | Path, text: str) -> None:
    """Write a competition result file (``text`` from :meth:`VerifyResult.result_text`)."""
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise DualgraphError(f"cannot write results file {path}: {e.strerror}") from None


@dataclass
class InstanceRow:
    instance: str
    onnx: str
    vnnlib: str
    answer: str
    seconds: float
    message: str = ""
    timeout: float = float("inf")

    @property
    def overrun(self) -> float:
        """Seconds past the instance's time limit (0 when within it)."""
        return max(0.0, self.seconds - self.timeout)


@dataclass
class RunSummary:
    rows: list[InstanceRow]
    total_seconds: float
    load_seconds: float

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(r.answer for r in self.rows)
        return {a: c.get(a, 0) for a in ANSWERS}

    @property
    def median_seconds(self) -> float:
        return statistics.median(r.seconds for r in self.rows) if self.rows else 0.0

    def text(self) -> str:
        import resource
        counts = ", ".join(f"{a} {n}" for a, n in self.counts.items())
        inst = sum(r.seconds for r in self.rows)
        worst = max((r.overrun for r in self.rows), default=0.0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return (f"{len(self.rows)} instances: {counts}\n"
                f"time: total {self.total_seconds:.1f} s (instances {inst:.1f} s, model loading "
                f"{self.load_seconds:.1f} s), median {self.median_seconds:.2f} s per instance, "
                f"slowest {max((r.seconds for r in self.rows), default=0.0):.2f} s, worst overrun of a time "
                f"limit {worst:.2f} s; peak resident memory {peak:.0f} MB")


def read_instances(csv_path: str | Path, root: str | Path | None = None) -> list[tuple[Path, Path, float]]:
    """Rows ``onnx,vnnlib,timeout`` of a competition instances CSV, paths resolved against
    ``root`` (default: the CSV's folder); every timeout a positive number of seconds."""
    import math
    from .files import read_text
    csv_path = Path(csv_path)
    text = read_text(csv_path, "VNN-COMP instances CSV")
    base = Path(root) if root is not None else csv_path.parent
    rows = []
    for i, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) != 3:
            raise DualgraphError(f"{csv_path}:{i}: expected 'onnx,vnnlib,timeout', got {','.join(row)!r}")
        try:
            timeout = float(row[2])
        except ValueError:
            hint = " (a header row? VNN-COMP instance files have none: remove it)" if not rows else ""
            raise DualgraphError(f"{csv_path}:{i}: timeout {row[2]!r} is not a number{hint}") from None
        if not (timeout > 0 and math.isfinite(timeout)):
            raise DualgraphError(f"{csv_path}:{i}: timeout {row[2]!r} must be a positive number of seconds")
        rows.append((base / row[0].strip(), base / row[1].strip(), timeout))
    if not rows:
        raise DualgraphError(f"{csv_path} lists no instances (expected lines 'onnx,vnnlib,timeout')")
    return rows


def run_instances(csv_path: str | Path, root: str | Path | None = None, out: str | Path | None = None,
                  config: VerifyConfig = VerifyConfig(), *, results_dir: str | Path | None = None,
                  max_timeout: float | None = None, limit: int | None = None,
                  progress: bool = True) -> RunSummary:
    """Answer every instance of a CSV; models are loaded once per ONNX file.

    Writes the results CSV (``instance,onnx,vnnlib,answer,seconds``) to ``out`` and, with
    ``results_dir``, one competition result file per instance. An instance that fails
    (bad file, unsupported op) is answered ``error`` and the run goes on.
    """
    import math
    from tqdm import tqdm
    from .files import check_writable, make_folder
    t0 = time.monotonic()
    if limit is not None and limit < 1:
        raise DualgraphError(f"--limit must be a positive number of instances, got {limit}")
    if max_timeout is not None and not (max_timeout > 0 and math.isfinite(max_timeout)):
        raise DualgraphError(f"--max-timeout must be a positive number of seconds, got {max_timeout}")
    if root is not None and not Path(root).is_dir():
        raise DualgraphError(f"--root '{root}' is not a folder; give the folder the CSV's paths are relative to")
    instances = read_instances(csv_path, root)[:limit]
    if out is not None:  # before the run: its answers must not be lost at the end
        check_writable(out, "results CSV")
    if results_dir is not None:
        make_folder(results_dir, "--results-dir")
    models: dict[Path, VerifyModel | Exception] = {}
    load_seconds = 0.0
    rows: list[InstanceRow] = []
    bar = tqdm(instances, desc="instances", unit="inst", disable=not progress, file=sys.stderr)
    taken: set[str] = set()
    for onnx_path, vnnlib_path, timeout in bar:
        timeout = min(timeout, max_timeout) if max_timeout is not None else timeout
        # files of the same names in other folders: numbered, so no result file overwrites another
        stems, k = f"{onnx_path.stem}__{vnnlib_path.stem}", 1
        while (stems + (suffix := f"__{k}" if k > 1 else "")) in taken:
            k += 1
        taken.add(stems + suffix)
        name = f"{onnx_path.stem}/{vnnlib_path.stem}" + suffix.replace("__", "#")
        key = onnx_path.resolve()
        if key not in models:
            t = time.monotonic()
            try:
                models[key] = VerifyModel(onnx_path, config.device, config.max_memory)
            except DualgraphError as exc:
                models[key] = exc
            load_seconds += time.monotonic() - t
        model = models[key]
        t = time.monotonic()
        try:
            if isinstance(model, Exception):
                raise model
            result = verify_instance(onnx_path, vnnlib_path, timeout, config, model=model)
            row = InstanceRow(name, str(onnx_path), str(vnnlib_path), result.answer, result.seconds, timeout=timeout)
            text = result.result_text()
        except Exception as exc:  # noqa: BLE001 -- one bad instance must not stop the run
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if not isinstance(exc, DualgraphError):
                message = f"{type(exc).__name__}: {message} (a bug: please report it)"
            tqdm.write(f"dualgraph: error: {name}: {message}", file=sys.stderr)
            row = InstanceRow(name, str(onnx_path), str(vnnlib_path), "error", time.monotonic() - t, message,
                              timeout=timeout)
            text = "error\n"
        rows.append(row)
        if results_dir is not None:
            write_result(Path(results_dir) / f"{stems}{suffix}.txt", text)
        bar.set_postfix(Counter(r.answer for r in rows), refresh=False)
    summary = RunSummary(rows, time.monotonic() - t0, load_seconds)
    if out is not None:
        write_results_csv(out, rows)
    return summary


def write_results_csv(path: str | Path, rows: Sequence[InstanceRow]) -> None:
    try:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["instance", "onnx", "vnnlib", "answer", "seconds"])
            for r in rows:
                w.writerow([r.instance, r.onnx, r.vnnlib, r.answer, f"{r.seconds:.3f}"])
    except OSError as e:
        raise DualgraphError(f"cannot write results CSV {path}: {e.strerror}") from None
