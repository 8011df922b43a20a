"""Scaling benchmark: one robust-loss step, exact bounds vs random projections (Section 3.2).

What is measured: the time and peak memory of **one forward + backward pass of the robust
loss** (:func:`dualgraph.training.robust_loss`, batch 50, L-inf eps 0.1, no pixel
clipping) on the paper's small convolutional MNIST architecture
(:func:`dualgraph.models.architectures.mnist_small`: Conv(16,4,s2)-ReLU-Conv(32,4,s2)-ReLU-FC(100)-ReLU-FC(10))
as it grows, for exact intermediate bounds and for random projections with ``r = 10`` and
``r = 50``; the same configurations are run with ``convex_adversarial`` (the authors'
code, PyPI 0.4.4) in its projection mode (``proj=r, norm_type='l1_median'``). Exact bounds
are measured twice: the library's default (``BoundConfig()``: the direction is chosen by an
operation count; for these networks the backward direction, with convolution patches that
make a convolutional unit's bound cost independent of the image size) and the paper's
Appendix F forward pass (``direction="forward"``: the identity columns of the input and of
every crossing unit pushed forward, quadratic in the size). Inputs are
uniform random images in [0, 1] with random labels: the timing does not depend on the
data (apart from the size of the crossing sets, which random data makes realistic enough).

Two ways to grow the network (``--sweep``):

* ``spatial`` (default): the input side grows (12 ... 140 pixels) with the channel counts
  fixed, 1k to 118k hidden units (``6 s^2 + 100`` for side ``s``). One forward pass then
  costs a fixed amount per hidden unit, so the cost of the bounds shows the paper's claim
  directly: exact = (input dim + hidden units) columns, each a pass -> quadratic;
  projections = ``r`` columns per source -> linear.
* ``width``: 28x28 inputs, every layer's channel count scaled by ``k``
  (``mnist_small(width=k)``, fractional ``k`` rounds the channel counts): ``4804 k`` hidden
  units. Here a single forward pass already costs ``O(k^2)`` (the weights grow
  quadratically), so expect projections ~2 and exact ~3 in the hidden-unit count; each
  row also reports ``plain_seconds`` (an ordinary cross-entropy step) to separate the two.

Every configuration runs in a **fresh subprocess**, single-threaded by default
(``--threads``; on a shared 2-core machine one thread gives far steadier timings, and both
libraries get the same): one untimed warm-up step on 2 examples (lowering, dual graphs),
then up to ``repeats`` timed steps on the full batch (no further one once 20 s were spent);
``seconds`` is the fastest timed step, ``peak_mb`` the peak resident memory during the steps
minus the resident memory just before them (Linux: the high-water mark is reset through
``/proc/self/clear_refs``; on CUDA: ``torch.cuda.max_memory_allocated`` minus the
allocation before). A method stops growing when a size fails or is predicted (from the
measured growth) to exceed the time or memory limit; the report says where and why.

Run: ``dualgraph bench scaling [--quick] [--json] [--sweep spatial|width] [--out bench]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

SPATIAL_FULL = (12, 20, 28, 40, 56, 80, 140)
SPATIAL_QUICK = (12, 20)
WIDTH_FULL = (0.25, 0.5, 1, 2, 4, 8, 16)
WIDTH_QUICK = (0.25, 0.5)
PROJ_DIMS = (10, 50)
BATCH, EPS = 50, 0.1
MB = 1 << 20
RESULT_MARK = "DUALGRAPH_BENCH_RESULT "


# ---- one configuration (runs in a worker process) -------------------------------------------

@dataclass
class Spec:
    """One measured configuration."""

    library: str            # "dualgraph" or "convex_adversarial"
    method: str             # "exact" or "proj"
    r: int | None
    sweep: str              # "spatial" or "width"
    size: float             # input side (spatial) or width factor (width)
    batch: int = BATCH
    eps: float = EPS
    repeats: int = 2
    device: str = "cpu"
    seed: int = 0
    threads: int = 1        # CPU threads (1: stable timings on a shared machine)
    variant: str = ""       # "forward": exact bounds by the Appendix F forward pass
    budget_s: float = 20.0  # no further timed step once the timed steps took this long


def build_model(sweep: str, size: float):
    """The benchmark network and its per-example input shape."""
    from torch import nn
    from dualgraph.models.architectures import mnist_small
    if sweep == "spatial":
        side = int(size)
        if side % 4:
            raise ValueError(f"input side must be a multiple of 4, got {side}")
        return mnist_small(1, in_size=side), (1, side, side)
    if sweep != "width":
        raise ValueError(f"unknown sweep '{sweep}'")
    if float(size).is_integer():
        return mnist_small(int(size)), (1, 28, 28)
    c1, c2, h = (max(1, round(c * size)) for c in (16, 32, 100))
    return nn.Sequential(nn.Conv2d(1, c1, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(c2 * 7 * 7, h), nn.ReLU(), nn.Linear(h, 10)), (1, 28, 28)


def rss_kb(field_name: str) -> int | None:
    """A memory figure of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in KB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the peak resident memory (``VmHWM``) to the current level; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def measure(spec: Spec) -> dict:
    """Run one configuration in this process; returns the row (seconds, peak_mb, ...)."""
    import resource

    import torch
    from dualgraph.models.architectures import hidden_units

    torch.manual_seed(spec.seed)
    threads = torch.get_num_threads()
    if spec.threads > 0:
        torch.set_num_threads(spec.threads)
    dev = torch.device(spec.device)
    model, shape = build_model(spec.sweep, spec.size)
    model = model.to(dev)
    gen = torch.Generator().manual_seed(spec.seed)
    x = torch.rand((spec.batch, *shape), generator=gen).to(dev)
    y = torch.randint(0, 10, (spec.batch,), generator=gen).to(dev)
    units = hidden_units(model, x)
    info: dict = {}

    if spec.library == "dualgraph":
        from dualgraph.scheduler import BoundConfig
        from dualgraph.training import lower_module, robust_loss
        config = (BoundConfig(proj=spec.r, proj_seed=spec.seed) if spec.method == "proj" else
                  BoundConfig(direction=spec.variant or "auto"))

        def step(n=None):
            loss, _ = robust_loss(model, x[:n], y[:n], spec.eps, config)
            loss.backward()
    elif spec.library == "convex_adversarial":
        import warnings

        from convex_adversarial import robust_loss as ca_robust_loss
        warnings.filterwarnings("ignore")

        def step(n=None):
            kw = dict(proj=spec.r, norm_type="l1_median") if spec.method == "proj" else {}
            loss, _ = ca_robust_loss(model, spec.eps, x[:n], y[:n], bounded_input=False, **kw)
            loss.backward()
    else:
        raise ValueError(f"unknown library '{spec.library}'")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn) -> float:
        model.zero_grad(set_to_none=True)
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    if dev.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(dev)
        base_bytes = torch.cuda.memory_allocated(dev)
    base_kb = rss_kb("VmRSS")
    reset = reset_peak()
    if not reset:
        base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    warm = timed(lambda: step(2))  # lowering, dual graphs, first allocations: not timed
    times: list[float] = []
    while len(times) < max(1, spec.repeats) and sum(times) < spec.budget_s:
        times.append(timed(step))
    if dev.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(dev) - base_bytes) / MB
        memory_kind = "cuda max_memory_allocated"
    else:
        hwm = rss_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = max(0.0, (hwm - base_kb) / 1024) if hwm is not None and base_kb is not None else float("nan")
        memory_kind = "rss high-water mark" if reset else "ru_maxrss (not reset)"

    def plain():
        torch.nn.functional.cross_entropy(model(x), y).backward()
    plain_s = min(timed(plain) for _ in range(3))
    used_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    if spec.library == "dualgraph":
        low = lower_module(model, x)
        sched = low.scheduler(config)
        info["direction"] = "proj" if spec.method == "proj" else ("forward" if sched.uses_forward else "backward")
    return {**asdict(spec), "hidden_units": units, "seconds": min(times), "seconds_all": times,
            "warmup_seconds": warm, "peak_mb": peak_mb, "memory": memory_kind, "plain_seconds": plain_s,
            "threads": used_threads, "status": "ok", **info}


def run_isolated(spec, timeout: float, module: str = "dualgraph.bench.scaling") -> dict:
    """:func:`measure` in a fresh Python process (honest peak memory); failures become rows.

    ``module`` runs as ``python -m module --worker SPEC_JSON`` and prints its row after
    :data:`RESULT_MARK` (other benchmarks reuse this with their own spec dataclass)."""
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(asdict(spec))]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**asdict(spec), "status": "timeout", "reason": f"took longer than {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
    status = "oom" if proc.returncode in (-9, 137) or "MemoryError" in proc.stderr or "out of memory" in proc.stderr \
        else "error"
    return {**asdict(spec), "status": status, "reason": f"exit code {proc.returncode}: {tail}"}


# ---- the sweep --------------------------------------------------------------------------------

@dataclass
class Plan:
    sweep: str
    sizes: tuple
    methods: list[tuple[str, str, int | None, str]]
    repeats: int
    timeout: float
    memory_limit_mb: float
    device: str
    batch: int = BATCH
    in_process: bool = False
    threads: int = 1
    notes: list[str] = field(default_factory=list)


def available_mb() -> float:
    """The memory available now (``MemAvailable``), in MB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 8192.0


def _predict(rows: list[dict], units: int, key: str, default_power: float) -> float | None:
    """Extrapolate ``key`` to ``units`` from the last two successful rows (power law)."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get(key, 0) > 0]
    if not ok:
        return None
    last = ok[-1]
    power = default_power
    if len(ok) >= 2 and ok[-2]["hidden_units"] < last["hidden_units"]:
        power = max(default_power, math.log(last[key] / ok[-2][key]) /
                    math.log(last["hidden_units"] / ok[-2]["hidden_units"]))
    return last[key] * (units / last["hidden_units"]) ** power


def _units_of(sweep: str, size: float) -> int:
    if sweep == "spatial":
        s = int(size)
        return 4 * s * s + 2 * s * s + 100
    c1, c2, h = (max(1, round(c * size)) for c in (16, 32, 100))
    return c1 * 196 + c2 * 49 + h


def run_sweep(plan: Plan, progress=None) -> list[dict]:
    rows: list[dict] = []
    for library, method, r, variant in plan.methods:
        done: list[dict] = []
        stopped = None
        for size in plan.sizes:
            spec = Spec(library, method, r, plan.sweep, size, batch=plan.batch, repeats=plan.repeats,
                        device=plan.device, threads=plan.threads, variant=variant)
            units = _units_of(plan.sweep, size)
            if stopped is None:
                power = 2.0 if method == "exact" else 1.0
                t = _predict(done, units, "seconds", power)
                m = _predict(done, units, "peak_mb", power)
                steps = 1 if t is None or t >= spec.budget_s else plan.repeats
                if t is not None and t * steps + 10 > plan.timeout:
                    stopped = (f"predicted {t:.0f} s per step at {units} hidden units "
                               f"(> the {plan.timeout:.0f} s limit per configuration)")
                elif m is not None and m > plan.memory_limit_mb:
                    stopped = (f"predicted {m:.0f} MB peak at {units} hidden units "
                               f"(> the {plan.memory_limit_mb:.0f} MB memory limit)")
            if stopped is not None:
                rows.append({**asdict(spec), "hidden_units": units, "status": "skipped", "reason": stopped})
                continue
            if progress:
                progress(f"{_label(asdict(spec)):<32} size={size:<5} ({units} hidden units) ...")
            row = measure(spec) if plan.in_process else run_isolated(spec, plan.timeout)
            row.setdefault("hidden_units", units)
            rows.append(row)
            if row["status"] == "ok":
                done.append(row)
                if progress:
                    progress(f"    {row['seconds']:.3f} s, {row['peak_mb']:.0f} MB")
            else:
                stopped = f"{row['status']} at {units} hidden units ({row.get('reason', '')})"
                if progress:
                    progress("    " + stopped)
    return rows


def fit_exponents(rows: list[dict]) -> list[dict]:
    """Least-squares slope of log(seconds) and log(peak_mb) against log(hidden units), per method:
    over all sizes (``*_exponent``) and over the largest three (``*_exponent_top``), where fixed
    per-step overheads no longer flatten the curve."""
    import numpy as np
    fits = []
    def group(x):
        return x["library"], x["method"], x["r"], x.get("variant", "")
    keys = sorted({group(r) for r in rows}, key=lambda k: (k[0], k[1], k[2] or 0, k[3]))
    for k in keys:
        ok = [x for x in rows if group(x) == k and x["status"] == "ok"]
        fit = {"library": k[0], "method": k[1], "r": k[2], "variant": k[3], "points": len(ok)}
        if len(ok) >= 2:
            u = np.log([x["hidden_units"] for x in ok])
            for key in ("seconds", "peak_mb", "plain_seconds"):
                v = np.array([x[key] for x in ok], dtype=float)
                if (v > 0).all():
                    fit[f"{key}_exponent"] = float(np.polyfit(u, np.log(v), 1)[0])
                    if len(ok) >= 3:
                        fit[f"{key}_exponent_top"] = float(np.polyfit(u[-3:], np.log(v[-3:]), 1)[0])
            fit["max_hidden_units"] = ok[-1]["hidden_units"]
        fits.append(fit)
    return fits


def compare(rows: list[dict]) -> list[dict]:
    """convex_adversarial seconds / dualgraph seconds at the largest size both finished, per r."""
    out = []
    for r in sorted({x["r"] for x in rows if x["method"] == "proj"}):
        ours = {x["hidden_units"]: x for x in rows if x["library"] == "dualgraph" and x["method"] == "proj"
                and x["r"] == r and x["status"] == "ok"}
        ref = {x["hidden_units"]: x for x in rows if x["library"] == "convex_adversarial"
               and x["method"] == "proj" and x["r"] == r and x["status"] == "ok"}
        common = sorted(set(ours) & set(ref))
        if common:
            u = common[-1]
            out.append({"r": r, "hidden_units": u, "dualgraph_seconds": ours[u]["seconds"],
                        "convex_adversarial_seconds": ref[u]["seconds"],
                        "speedup": ref[u]["seconds"] / ours[u]["seconds"],
                        "dualgraph_peak_mb": ours[u]["peak_mb"], "convex_adversarial_peak_mb": ref[u]["peak_mb"]})
    return out


def machine_info(device: str) -> dict:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "memory_mb": round(available_mb())}
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    try:
        import convex_adversarial  # noqa: F401
        from importlib.metadata import version
        info["convex_adversarial"] = version("convex_adversarial")
    except Exception:
        info["convex_adversarial"] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def make_plan(args) -> Plan:
    import torch
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from ..errors import DualgraphError
        raise DualgraphError("--device cuda was asked for but no CUDA GPU is available")
    if args.sizes:
        from . import parse_list
        if args.sweep == "width":
            sizes = tuple(parse_list(args.sizes, float, "--sizes", "0.5,1,2"))
        else:
            sizes = tuple(parse_list(args.sizes, int, "--sizes", "8,16,32"))
            if any(side < 4 or side % 4 for side in sizes):
                from ..errors import DualgraphError
                raise DualgraphError(f"--sizes: input sides must be positive multiples of 4, got {args.sizes}")
    elif args.sweep == "spatial":
        sizes = SPATIAL_QUICK if args.quick else SPATIAL_FULL
    else:
        sizes = WIDTH_QUICK if args.quick else WIDTH_FULL
    methods: list[tuple[str, str, int | None, str]] = [("dualgraph", "exact", None, ""),
                                                       ("dualgraph", "exact", None, "forward")]
    methods += [("dualgraph", "proj", r, "") for r in PROJ_DIMS]
    reference = not args.no_reference
    if reference:
        try:
            import convex_adversarial  # noqa: F401
        except ImportError:
            reference = False
    if reference:
        methods += [("convex_adversarial", "proj", r, "") for r in PROJ_DIMS]
    timeout = args.timeout or (40.0 if args.quick else 150.0)
    memory = 0.6 * available_mb() if not device.startswith("cuda") else \
        0.8 * torch.cuda.get_device_properties(torch.device(device)).total_memory / MB
    plan = Plan(args.sweep, sizes, methods, repeats=1 if args.quick else 2, timeout=timeout,
                memory_limit_mb=memory, device=device, batch=args.batch, in_process=args.in_process,
                threads=args.threads)
    if not reference and not args.no_reference:
        plan.notes.append("convex_adversarial is not installed: no reference figures (pip install convex-adversarial)")
    return plan


def run_benchmark(args, progress=None) -> dict:
    """The whole benchmark as one JSON-able object (rows, fits, comparison, machine, command)."""
    plan = make_plan(args)
    start = time.perf_counter()
    machine = machine_info(plan.device)
    rows = run_sweep(plan, progress)
    if hasattr(os, "getloadavg"):
        machine["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    return {"benchmark": "scaling", "sweep": plan.sweep, "device": plan.device, "batch": plan.batch, "eps": EPS,
            "quick": bool(args.quick), "repeats": plan.repeats, "threads": plan.threads, "timeout_s": plan.timeout,
            "memory_limit_mb": round(plan.memory_limit_mb), "rows": rows, "fits": fit_exponents(rows),
            "comparison": compare(rows), "machine": machine, "notes": plan.notes,
            "total_seconds": round(time.perf_counter() - start, 1),
            "command": "dualgraph bench scaling " + " ".join(getattr(args, "argv", []) or [])}


# ---- output -----------------------------------------------------------------------------------

def _label(row: dict) -> str:
    lib = "dualgraph" if row["library"] == "dualgraph" else "convex_adversarial"
    label = f"{lib} {row['method']}" + (f" r={row['r']}" if row["method"] == "proj" else "")
    return label + (" (Appendix F forward)" if row.get("variant") == "forward" else "")


def format_table(result: dict) -> str:
    lines = ["| method | size | hidden units | seconds | peak MB | plain step s | status |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        ok = r["status"] == "ok"
        lines.append(f"| {_label(r)} | {r['size']:g} | {r['hidden_units']} | "
                     f"{r['seconds']:.3f} | {r['peak_mb']:.0f} | {r['plain_seconds']:.4f} | ok |" if ok else
                     f"| {_label(r)} | {r['size']:g} | {r['hidden_units']} | - | - | - | "
                     f"{r['status']}: {r.get('reason', '')} |")
    lines += ["", "| method | points | time exponent (all / largest 3) | memory exponent (all / largest 3) | "
                  "plain-step exponent (all / largest 3) | largest size |", "|---|---:|---:|---:|---:|---:|"]
    for f in result["fits"]:
        def e(k):
            return (f"{f[k]:.2f}" if k in f else "-") + " / " + (f"{f[k + '_top']:.2f}" if k + "_top" in f else "-")
        lines.append(f"| {_label(f)} | {f['points']} | {e('seconds_exponent')} | {e('peak_mb_exponent')} | "
                     f"{e('plain_seconds_exponent')} | {f.get('max_hidden_units', '-')} |")
    if result["comparison"]:
        lines += ["", "| r | hidden units | dualgraph s | convex_adversarial s | speed-up | dualgraph MB | "
                      "convex_adversarial MB |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for c in result["comparison"]:
            lines.append(f"| {c['r']} | {c['hidden_units']} | {c['dualgraph_seconds']:.3f} | "
                         f"{c['convex_adversarial_seconds']:.3f} | {c['speedup']:.2f}x | "
                         f"{c['dualgraph_peak_mb']:.0f} | {c['convex_adversarial_peak_mb']:.0f} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Log-log plot of seconds and peak memory against hidden units, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    groups: dict[str, list[dict]] = {}
    for r in result["rows"]:
        if r["status"] == "ok":
            groups.setdefault(_label(r), []).append(r)
    colors: dict[tuple, str] = {}  # one colour per (method, r, variant); the library sets the line style
    for label, rs in groups.items():
        r0 = rs[0]
        color = colors.setdefault((r0["method"], r0["r"], r0.get("variant", "")), f"C{len(colors)}")
        ls = "-" if r0["library"] == "dualgraph" else "--"
        u = [r["hidden_units"] for r in rs]
        axes[0].loglog(u, [r["seconds"] for r in rs], ls, color=color, marker="o", label=label)
        axes[1].loglog(u, [max(r["peak_mb"], 1e-1) for r in rs], ls, color=color, marker="o", label=label)
    plain: dict[int, float] = {}
    for rs in groups.values():
        for r in rs:
            plain[r["hidden_units"]] = min(plain.get(r["hidden_units"], math.inf), r["plain_seconds"])
    if plain:
        u = sorted(plain)
        axes[0].loglog(u, [plain[k] for k in u], ":", color="gray", label="plain CE step")
        # guides: slopes 1 and 2, starting between the plain step and the fastest robust step
        low = math.sqrt(plain[u[0]] * min(r["seconds"] for rs in groups.values() for r in rs))
        for power, style in ((1, (0, (1, 3))), (2, (0, (5, 5)))):
            axes[0].loglog(u, [low * (k / u[0]) ** power for k in u], color="black", lw=0.8,
                           linestyle=style, alpha=0.5, label=f"slope {power} (guide)")
    axes[0].set_ylabel("seconds per robust-loss step (forward + backward)")
    axes[1].set_ylabel("peak memory above baseline (MB)")
    for ax in axes:
        ax.set_xlabel("hidden units")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"robust-loss step, batch {result['batch']}, {result['sweep']} sweep, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_markdown(result: dict, png_name: str) -> str:
    m = result["machine"]
    comp = result["comparison"]
    stops = [f"- {_label(r)}: stopped at {r['hidden_units']} hidden units: {r['status']} ({r.get('reason', '')})"
             for i, r in enumerate(result["rows"]) if r["status"] != "ok" and
             not any(_label(q) == _label(r) and q["status"] != "ok" for q in result["rows"][:i])]
    # the load average counts this benchmark's own thread(s): flag clearly more than that
    busy = result.get("threads", 1) + 0.25 * (m.get("cores") or 1)
    shared = max(m.get("load_average_start", [0])[0], m.get("load_average_end", [0])[0]) > busy
    lines = [
        "# Scaling benchmark: exact bounds vs random projections",
        "",
        "One forward + backward pass of the robust loss (`dualgraph.training.robust_loss`; "
        "`convex_adversarial.robust_loss` for the reference) on the paper's small MNIST convolutional "
        f"architecture, batch {result['batch']}, L-inf eps {result['eps']} without pixel clipping, "
        "uniform random inputs in [0, 1] with random labels (timing does not depend on the data). "
        f"Sweep: **{result['sweep']}** "
        + ("(the input side grows, channels fixed, `mnist_small(in_size=s)`: the cost of one ordinary "
           "forward pass grows linearly with the hidden units)." if result["sweep"] == "spatial" else
           "(28x28 inputs, every channel count scaled by k, `mnist_small(width=k)`: the cost of one ordinary "
           "forward pass grows quadratically with the width).")
        + " *exact* is `BoundConfig()` (the library's exact path; direction chosen automatically, "
          "recorded per row in the JSON: here backward, with convolution patches), *exact (Appendix F "
          "forward)* is `BoundConfig(direction='forward')` (identity columns of the input and of every "
          "crossing unit pushed forward: the paper's quadratic method), *proj* is `BoundConfig(proj=r)`: intermediate bounds by Cauchy "
          "projections with the median estimator, final `J(C)` exact; convex_adversarial runs "
          "`robust_loss(..., proj=r, norm_type='l1_median', bounded_input=False)`."
        + f" Every configuration runs in a fresh process with {result['threads']} CPU thread(s): one untimed "
          f"warm-up step on 2 examples, then up to {result['repeats']} timed step(s) on the full batch (one only "
          "once 20 s were spent); *seconds* is the fastest timed step, *peak MB* the peak resident memory during the steps "
          "minus the resident memory before them"
        + (" (CUDA: `max_memory_allocated` minus the allocation before)." if result["device"] != "cpu" else ".")
        + " *plain step s* is an ordinary cross-entropy forward + backward of the same network and batch.",
        "",
        f"![scaling]({png_name})",
        "",
        format_table(result),
        "",
        "## Growth exponents",
        "",
    ]
    for f in result["fits"]:
        if "seconds_exponent" in f:
            top = (f"; over the largest three sizes time ~ units^{f['seconds_exponent_top']:.2f}, memory ~ "
                   f"units^{f.get('peak_mb_exponent_top', float('nan')):.2f}" if "seconds_exponent_top" in f else "")
            lines.append(f"- {_label(f)}: time ~ units^{f['seconds_exponent']:.2f}, "
                         f"memory ~ units^{f.get('peak_mb_exponent', float('nan')):.2f} "
                         f"({f['points']} sizes up to {f['max_hidden_units']} hidden units{top})")
    lines += ["", "## convex_adversarial comparison (same r, largest size both finished)", ""]
    if comp:
        for c in comp:
            lines.append(f"- r = {c['r']} at {c['hidden_units']} hidden units: dualgraph {c['dualgraph_seconds']:.3f} s, "
                         f"convex_adversarial {c['convex_adversarial_seconds']:.3f} s: **{c['speedup']:.2f}x** "
                         f"(peak memory {c['dualgraph_peak_mb']:.0f} MB vs {c['convex_adversarial_peak_mb']:.0f} MB)")
    else:
        lines.append("- not run (convex_adversarial not installed, or --no-reference)")
    lines += ["", "## Where methods stopped", ""]
    lines += stops or ["- every method ran every size"]
    lines += ["", "## Machine", "",
              f"- {m['cpu']}, {m['cores']} cores, {m['memory_mb']} MB available at the start, torch {m['torch']} "
              f"(measured with {result.get('threads', '?')} intra-op thread(s); default {m['torch_threads']}), "
              f"Python {m['python']}, {m['platform']}",
              f"- device: {result['device']}" + (f" ({m['gpu']})" if "gpu" in m else ""),
              f"- convex_adversarial {m.get('convex_adversarial')}",
              f"- load average at start {m.get('load_average_start')}, at end {m.get('load_average_end')}"
              + (": **the machine was shared with other work during the measurement**; timings are noisy "
                 "(the fastest of the timed steps is reported)" if shared else ""),
              f"- whole sweep: {result['total_seconds']:.0f} s",
              "", "## Command", "", f"```\n{result['command']}\n```", ""]
    lines += [f"Note: {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a reduced sweep (about a minute on 2 cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object (rows, exponent fits, comparison)")
    p.add_argument("--sweep", choices=["spatial", "width"], default="spatial",
                   help="grow the input side (default; per-pass cost linear in the hidden units) or the "
                        "channel width at 28x28 (per-pass cost quadratic)")
    p.add_argument("--sizes", help="comma-separated sizes instead of the default sweep: input sides (spatial, "
                                   "multiples of 4) or width factors (width)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"batch size (default {BATCH})")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per configuration (default 1: steady timings on a shared machine; "
                        "0: torch's default)")
    p.add_argument("--timeout", type=float, help="seconds per configuration (default 150; 40 with --quick)")
    p.add_argument("--no-reference", action="store_true", help="skip the convex_adversarial reference runs")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process instead of a fresh one per configuration (faster; peak "
                        "memory is then less reliable)")
    p.add_argument("--out", help="folder for scaling.png, scaling.json and scaling_report.md")


def main(args: argparse.Namespace) -> int:
    args.argv = _argv_of(args)
    progress = None if args.json else (lambda s: print(s, file=sys.stderr, flush=True))
    result = run_benchmark(args, progress)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        suffix = "" if args.sweep == "spatial" else f"_{args.sweep}"
        png = f"scaling{suffix}.png"
        plot(result, os.path.join(args.out, png))
        with open(os.path.join(args.out, f"scaling{suffix}.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, f"scaling{suffix}_report.md"), "w") as f:
            f.write(report_markdown(result, png))
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
        if args.out:
            print(f"\nwrote {args.out}/: plot, JSON and report")
    return 0


def _argv_of(args) -> list[str]:
    out = []
    for flag in ("quick", "json", "no_reference", "in_process"):
        if getattr(args, flag, False):
            out.append("--" + flag.replace("_", "-"))
    for opt in ("sweep", "sizes", "device", "threads", "timeout", "out"):
        v = getattr(args, opt, None)
        if v is not None and (opt, v) not in (("sweep", "spatial"), ("device", "cpu"), ("threads", 1)):
            out += [f"--{opt}", str(v)]
    if getattr(args, "batch", BATCH) != BATCH:
        out += ["--batch", str(args.batch)]
    return out


def _worker_main(argv: list[str]) -> int:
    from dualgraph.allocator import tune_allocator
    tune_allocator()  # as the command line does (cli.main)
    spec = Spec(**json.loads(argv[argv.index("--worker") + 1]))
    row = measure(spec)
    print(RESULT_MARK + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv))
