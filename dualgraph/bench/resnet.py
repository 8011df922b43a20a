"""``dualgraph bench resnet``: exact bounds on residual convolutional networks (issue 15).

What is measured, per network, relaxation and eps: the seconds to certify one example
(``--batch 1``; a small batch with ``--batch N``, reported per example) with exact bounds,
the **median** of ``--repeats`` timed runs (the dual graphs are built before timing),
split into phases: the intermediate bounds of every bounded value
(``BoundScheduler.phase_seconds``; backward direction only, the forward direction bounds
all values in one pass) and the final objective ``J(C)`` on the 9 margin rows; the peak
resident memory during the runs above the level before them; the direction the scheduler
chose (``BoundScheduler.forward_for``); the share of crossing units (``l < 0 < u``) among
all bounded ReLU inputs, which sets how much stable-unit pruning saves. The reference
implementation ``convex_adversarial`` (0.4.4, the paper's code: exact bounds by its
forward pass, the paper's relaxation only) runs the same networks, converted to its
``DenseSequential``/``Dense`` format with the same weights (:func:`reference_model`), under
its own time limit; its margins are compared with dualgraph's.

The networks, all 3x32x32 inputs and 10 classes, random weights from a fixed seed with a
variance-preserving initialisation (:func:`init_weights`):

* ``resnetK`` (K = 1, 2, 4, 8 by default; any K): a stride-2 stem to 16x16x16, then K of
  the paper's residual blocks at 16 channels, Linear 4096 -> 100 -> 10. Only the depth
  changes, so the fitted exponent is the growth of time with the number of blocks;
* ``paper``: the paper's CIFAR ResNet, ``cifar_resnet()`` (4 residual blocks of 16, 16,
  32, 64 filters at full resolution, then Linear 4096 -> 1000 -> 10). Not in the default
  set: about 1.5 min (``paper``) and 4 min (``crown``) per example on one core;
* ``resnet2b``, ``resnet4b`` (in the default set): the layouts of the VNN-COMP 2021 CIFAR
  ResNets (``resnet_2b``, 112 k parameters; ``resnet_4b``, 124 k) on which issue 15 quotes
  auto_LiRPA's times; the report sets those figures beside these networks' times for the
  benchmark's 48 + 24 properties (:func:`peer_estimates`; run ``--eps 2/255,1/255``).
  Random weights here, not the competition's trained ones;
* ``resnet18``: the standard CIFAR ResNet-18 layout (11.2 M parameters; no BatchNorm).
  Not in the default set: it exceeds the memory limit (see the report).

Every measurement runs in a **fresh subprocess** (:func:`dualgraph.bench.scaling.run_isolated`)
with ``--threads`` CPU threads, so peak memory is the measurement's own; its address space
is capped (``--memory-limit``) and it is stopped after ``--timeout`` seconds, both
reported as the row's status. Inputs are uniform random images in [0, 1] with random
labels; the input set is the L-inf ball of radius eps intersected with [0, 1].

Run: ``dualgraph bench resnet [--nets resnet1,resnet2,paper,...] [--relaxations paper,crown]
[--eps 1/255,2/255] [--batch 1] [--threads 1] [--repeats 3] [--json] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

INPUT_SHAPE = (3, 32, 32)
CLASSES = 10
DEFAULT_NETS = "resnet1,resnet2,resnet4,resnet8,resnet2b,resnet4b"
DEFAULT_EPS = "2/255,1/255"  # the VNN-COMP ResNets' radii (PEER_BENCHMARK)
MB = 1 << 20


# ---- the networks ------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """ResNet's basic block without BatchNorm: ``relu(shortcut(x) + conv2(relu(conv1(x))))``,
    the shortcut the identity, or a strided 1x1 convolution when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x):
        return torch.relu(self.shortcut(x) + self.conv2(torch.relu(self.conv1(x))))


def resnet18(classes: int = CLASSES) -> nn.Sequential:
    """CIFAR ResNet-18: conv 3x3 64, four stages of two basic blocks (64, 128, 256, 512
    channels, strides 1, 2, 2, 2), global average pooling, Linear 512 -> classes."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1), nn.ReLU()]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))


def deep_resnet(blocks: int, channels: int = 16, classes: int = CLASSES) -> nn.Sequential:
    """A stride-2 stem to ``channels`` x 16 x 16, ``blocks`` of the paper's residual blocks,
    Linear -> 100 -> classes: networks that differ in depth only."""
    from dualgraph.models.architectures import ResidualBlock
    return nn.Sequential(nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.ReLU(),
                         *(ResidualBlock(channels, channels, False) for _ in range(blocks)),
                         nn.Flatten(), nn.Linear(channels * 16 * 16, 100), nn.ReLU(), nn.Linear(100, classes))


COMPETITION_RESNETS = {"resnet2b": (8, (16,)), "resnet4b": (16, (32, 32))}
"""VNN-COMP 2021 ``cifar10_resnet`` layouts: stem channels, channels of each stage."""


def competition_resnet(name: str, classes: int = CLASSES) -> nn.Sequential:
    """The layout of the VNN-COMP 2021 CIFAR ResNets the issue's peer figures were taken on
    (``resnet_2b``: 2 residual blocks, ``resnet_4b``: 4): a 3x3 stride-2 stem, stages of two
    basic blocks whose first halves the map (stride 2, 1x1 convolutional shortcut), Flatten,
    Linear -> 100 -> ReLU -> Linear -> classes; no BatchNorm. ``resnet2b``: 8 stem channels,
    one stage of 16 (16x8x8 at the end); ``resnet4b``: 16, two stages of 32 (32x4x4)."""
    stem, stages = COMPETITION_RESNETS[name]
    layers: list[nn.Module] = [nn.Conv2d(3, stem, 3, stride=2, padding=1), nn.ReLU()]
    c_in, side = stem, INPUT_SHAPE[1] // 2
    for c_out in stages:
        layers += [BasicBlock(c_in, c_out, 2), BasicBlock(c_out, c_out, 1)]
        c_in, side = c_out, side // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * side * side, 100), nn.ReLU(),
                         nn.Linear(100, classes))


def pooled_cnn(classes: int = CLASSES) -> nn.Sequential:
    """A plain CNN with max pooling (no residual blocks): three stages of a 3x3 convolution
    (16, 32, 64 channels), ReLU and a 2x2 MaxPool (32 -> 16 -> 8 -> 4 pixels), Flatten,
    Linear 1024 -> 100 -> ReLU -> Linear -> classes. Passes through its pools stay on
    convolution windows (:func:`dualgraph.patches.through_max_pool`)."""
    layers: list[nn.Module] = []
    c_in = INPUT_SHAPE[0]
    for c_out in (16, 32, 64):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c_in = c_out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 4 * 4, 100), nn.ReLU(), nn.Linear(100, classes))


def build_net(name: str) -> nn.Module:
    """The network ``name`` (``paper``, ``resnetK``, ``resnet2b``, ``resnet4b``, ``resnet18``,
    ``pooled``) with its benchmark weights."""
    from dualgraph.errors import DualgraphError
    from dualgraph.models.architectures import cifar_resnet
    if name == "paper":
        model = cifar_resnet()
    elif name in COMPETITION_RESNETS:
        model = competition_resnet(name)
    elif name == "resnet18":
        model = resnet18()
    elif name == "pooled":
        model = pooled_cnn()
    elif name.startswith("resnet") and name[6:].isdigit() and int(name[6:]) >= 1:
        model = deep_resnet(int(name[6:]))
    else:
        raise DualgraphError(f"unknown network '{name}'; use paper, resnet2b, resnet4b, resnet18, "
                             "pooled (a CNN with max pools) or resnetK (K residual blocks)")
    return init_weights(model.eval())


def init_weights(model: nn.Sequential, seed: int = 0) -> nn.Sequential:
    """Random weights that keep the activations' scale through depth: Kaiming normal
    (``std = sqrt(2 / fan_in)``) for every convolution and linear layer, zero biases, both
    branches of every residual sum scaled by ``1/sqrt(2)`` (two branches of the same second
    moment would double it per block; an identity shortcut keeps its scale and only the
    other branch is scaled), then every block with a convolutional shortcut rescaled so that
    its output has the RMS of its input on random images (narrow random layers drift: eight
    16-channel blocks shrank the activations 7-fold). Zero biases make such a block
    positively homogeneous in its two branches, so one factor on both does it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / m.weight[0].numel()))
                if m.bias is not None:
                    m.bias.zero_()
        for m in model.modules():
            if (parts := block_parts(m)) is not None:
                for conv in parts[1:]:
                    if isinstance(conv, nn.Conv2d):
                        conv.weight.mul_(math.sqrt(0.5))
        x = torch.rand((16, *INPUT_SHAPE), generator=gen)
        for m in model:
            out = m(x)
            parts = block_parts(m)
            if parts is not None and isinstance(parts[1], nn.Conv2d):
                factor = float(x.square().mean().sqrt() / out.square().mean().sqrt())
                for conv in parts[1:]:
                    conv.weight.mul_(factor)
                out = out * factor
            x = out
    return model


def block_parts(m: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    """``(first, shortcut, second)`` of a residual block ``relu(shortcut(x) +
    second(relu(first(x))))``; None for any other module."""
    from dualgraph.models.architectures import ResidualBlock
    if isinstance(m, ResidualBlock):
        return m.first, m.skip, m.second
    if isinstance(m, BasicBlock):
        return m.conv1, m.shortcut, m.conv2
    return None


@functools.lru_cache
def net_size(name: str) -> dict[str, int]:
    """Residual blocks and parameters of the network ``name``."""
    return size_of(build_net(name))


def size_of(model: nn.Module) -> dict[str, int]:
    """Residual blocks and parameters of ``model``."""
    return {"blocks": residual_blocks(model), "parameters": sum(p.numel() for p in model.parameters())}


def residual_blocks(model: nn.Module) -> int:
    """The number of residual blocks (the depth the exponent is fitted against)."""
    return sum(block_parts(m) is not None for m in model.modules())


def reference_model(model: nn.Sequential) -> nn.Module:
    """The same network, sharing its weights, in ``convex_adversarial``'s format: a block
    becomes ``Dense(first), ReLU, Dense(skip, None, second), ReLU`` (the paper code's own
    ``cifar_model_resnet``; an identity shortcut is its empty ``nn.Sequential()``), and
    global average pooling + Linear one Linear on the flattened map (the reference has no
    pooling layer; the weights divided by the map size, repeated over it: the same function)."""
    from convex_adversarial import Dense, DenseSequential
    layers: list[nn.Module] = []
    x = torch.zeros(1, *INPUT_SHAPE)
    pooled = None
    for m in model:
        if (parts := block_parts(m)) is not None:
            first, skip, second = parts
            skip = skip if isinstance(skip, nn.Conv2d) else nn.Sequential()
            layers += [Dense(first), nn.ReLU(), Dense(skip, None, second), nn.ReLU()]
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            pooled = x.shape[2] * x.shape[3]
        elif isinstance(m, nn.Linear) and pooled is not None:
            folded = nn.Linear(m.in_features * pooled, m.out_features)
            with torch.no_grad():
                folded.weight.copy_(m.weight.repeat_interleave(pooled, dim=1) / pooled)
                folded.bias.copy_(m.bias)
            layers.append(folded)
            pooled = None
        else:
            layers.append(m)
        with torch.no_grad():
            x = m(x)
    return DenseSequential(*layers)


# ---- one measurement (runs in a worker process) ------------------------------------------------

@dataclass
class Spec:
    """One measured configuration."""

    net: str
    library: str            # "dualgraph" or "convex_adversarial"
    relaxation: str         # "paper" or "crown"
    eps: float
    batch: int = 1
    repeats: int = 3
    threads: int = 1
    budget_s: float = 30.0  # no further timed run once the timed runs took this long
    memory_mb: float = 0.0  # address-space limit above the level at start (0: none)
    seed: int = 0


def _dualgraph_case(spec: Spec, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """``run(eps)`` for dualgraph (seconds of the intermediate bounds, per bounded value when
    backward, and of ``J``), the certifier and the direction its scheduler takes."""
    from dualgraph.api import Certifier, load_model, margin_spec
    from dualgraph.scheduler import BoundConfig
    cert = Certifier(load_model(model, x), BoundConfig(relu_relaxation=spec.relaxation))
    sched = cert.scheduler
    for v in sched.bound_targets:
        sched.dual(v)  # built once per scheduler: not part of the time per example
    rows = margin_spec(y, CLASSES)

    def run(eps: float) -> dict:
        input_set = cert.input_set(x, eps, clip=(0.0, 1.0))
        sched.phase_seconds = {}
        start = time.perf_counter()
        bounds = sched.intermediate_bounds(input_set)
        middle = time.perf_counter()
        margins = sched.bound_output(input_set, rows, bounds)
        end = time.perf_counter()
        return {"seconds": end - start, "intermediate_seconds": middle - start, "final_seconds": end - middle,
                "phases": dict(sched.phase_seconds), "bounds": bounds, "margins": margins}
    direction = "forward" if sched.forward_for(len(x), x.element_size()) else "backward"
    return run, cert, direction


def _reference_case(spec: Spec, model: nn.Sequential, x: torch.Tensor, y: torch.Tensor):
    """``run(eps)`` for ``convex_adversarial``: exact bounds over the L-inf ball in [0, 1]
    (``bounded_input=True``), the margins' lower bounds and the share of crossing units."""
    from convex_adversarial import DualNetwork
    from convex_adversarial.dual_layers import DualReLU
    if spec.relaxation != "paper":
        raise ValueError("convex_adversarial has the paper's relaxation only")
    ref = reference_model(model)
    c = torch.eye(CLASSES)[y].unsqueeze(1) - torch.eye(CLASSES).unsqueeze(0)
    others = ~torch.nn.functional.one_hot(y, CLASSES).bool()

    def run(eps: float) -> dict:
        start = time.perf_counter()
        dual = DualNetwork(ref, x, eps, bounded_input=True)
        margins = dual(c)[others].view(len(y), CLASSES - 1)
        seconds = time.perf_counter() - start
        relus = [layer for layer in dual.dual_net if isinstance(layer, DualReLU)]
        crossing = sum(int(layer.I.sum()) for layer in relus) / max(1, sum(layer.I.numel() for layer in relus))
        return {"seconds": seconds, "margins": margins, "crossing": round(crossing, 4)}
    return run


def _limit_memory(mb: float) -> None:
    """Cap the address space at its current size plus ``mb``: an allocation past it fails
    with an error (reported as out of memory) instead of pushing the machine into swap or
    the OOM killer."""
    import resource

    from .scaling import rss_kb
    if mb > 0:
        size = (rss_kb("VmSize") or 0) * 1024 + int(mb * MB)
        resource.setrlimit(resource.RLIMIT_AS, (size, size))


def measure(spec: Spec) -> dict:
    """One configuration in this process: up to ``repeats`` timed runs (none after
    ``budget_s``; the dual graphs are built before); the row has the median seconds per
    example, its phases, the peak memory above the level before the runs, the direction
    and the share of crossing units. No warm-up run: on the paper's ResNet even one at
    eps 0 costs a minute (the pruning cut of every dense bounded value), and the median
    of three runs drops a slow first one."""
    from .scaling import reset_peak, rss_kb
    torch.set_num_threads(spec.threads)
    model = build_net(spec.net)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    x = torch.rand((spec.batch, *INPUT_SHAPE), generator=gen)
    y = torch.randint(0, CLASSES, (spec.batch,), generator=gen)
    row = {**asdict(spec), **size_of(model)}
    if spec.library == "dualgraph":
        run, cert, row["direction"] = _dualgraph_case(spec, model, x, y)
    else:
        run, cert, row["direction"] = _reference_case(spec, model, x, y), None, "forward"
    _limit_memory(spec.memory_mb)
    base_kb = rss_kb("VmRSS")
    reset = reset_peak()
    with torch.no_grad():
        runs: list[dict] = []
        while len(runs) < max(1, spec.repeats) and sum(r["seconds"] for r in runs) < spec.budget_s:
            runs.append(run(spec.eps))
    hwm = rss_kb("VmHWM") if reset else None
    row["peak_mb"] = round(max(0.0, (hwm - base_kb) / 1024), 1) if hwm and base_kb else None
    row.update(_timings(runs, spec.batch), status="ok", margins=runs[-1]["margins"].tolist())
    if "crossing" in runs[-1]:
        row["crossing"] = runs[-1]["crossing"]
    if cert is not None:  # as run: "auto" may have turned backward after a forward run was too loose
        row["direction"] = "forward" if cert.scheduler.forward_for(spec.batch, x.element_size()) else "backward"
        row.update(_phases(cert.scheduler, runs, row["direction"]))
    return row


def _timings(runs: list[dict], batch: int) -> dict:
    """Medians over the timed runs, per example."""
    def median(key):
        return round(statistics.median(r[key] for r in runs) / batch, 4) if key in runs[0] else None
    return {"runs": len(runs), "seconds_per_example": median("seconds"),
            "seconds_all": [round(r["seconds"], 3) for r in runs],
            "intermediate_seconds": median("intermediate_seconds"), "final_seconds": median("final_seconds")}


def _phases(sched, runs: list[dict], direction: str) -> dict:
    """Per bounded value: op, units, share crossing zero (``l < 0 < u``, all examples), the
    multiply count of one backward row from one of its units
    (:meth:`~dualgraph.direction.DirectionCost.row_macs`) and the median seconds of its
    intermediate bounds (backward only; forward bounds all values in one pass), with the path
    its backward pass starts on (patches or dense rows). Totals per example: the multiply-adds
    of one pass from every unit (``gmacs_all``) and from the crossing units alone
    (``gmacs_crossing``: what a pruning cut that found every stable unit would leave)."""
    from dualgraph import patches
    bounds = runs[-1]["bounds"]
    phases, crossing, units, macs_all, macs_crossing = [], 0, 0, 0.0, 0.0
    for v in sched.bound_targets:
        lo, up = bounds[v]
        cross = int(((lo < 0) & (up > 0)).sum())
        crossing, units = crossing + cross, units + lo.numel()
        seconds = [r["phases"][v.name] for r in runs if v.name in r["phases"]]
        conv = sched.config.patches and patches.starts_on_patches(v)
        row = 0.0 if v in sched.direction.by_image else sched.direction.row_macs(v)
        macs_all += v.numel * row
        macs_crossing += cross / max(lo.shape[0], 1) * row
        phases.append({"value": v.name, "op": v.producer.op[1] if v.producer else "input", "units": v.numel,
                       "crossing": round(cross / lo.numel(), 4), "row_mmacs": round(row / 1e6, 6),
                       "seconds": round(statistics.median(seconds), 4) if seconds else None,
                       "start": "forward" if direction == "forward" else ("patches" if conv else "dense")})
    return {"phases": phases, "crossing": round(crossing / max(units, 1), 4),
            "bounded_units": sum(v.numel for v in sched.bound_targets),
            "gmacs_all": round(macs_all / 1e9, 4), "gmacs_crossing": round(macs_crossing / 1e9, 4)}


def _worker_main(argv: list[str]) -> int:
    """``python -m dualgraph.bench.resnet --worker SPEC_JSON``: one row after RESULT_MARK; a
    failure (out of memory under the limit included) is a row too."""
    from dualgraph.allocator import tune_allocator
    tune_allocator()  # as the command line does (cli.main)
    from .scaling import RESULT_MARK
    spec = Spec(**json.loads(argv[argv.index("--worker") + 1]))
    try:
        row = measure(spec)
    except Exception as exc:  # noqa: BLE001 - every failure is reported as a row
        text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        oom = isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate" in text
        row = {**asdict(spec), "status": "oom" if oom else "error", "reason": text}
    print(RESULT_MARK + json.dumps(row), flush=True)
    return 0


# ---- the benchmark -----------------------------------------------------------------------------

def parse_eps(text: str) -> list[float]:
    """Comma-separated non-negative radii, fractions allowed (``1/255,0.5/255,0.01``)."""
    from dualgraph.errors import DualgraphError
    from dualgraph.input_sets import parse_radius
    try:
        return [parse_radius(e) for e in (e.strip() for e in text.split(",")) if e]
    except DualgraphError as exc:
        raise DualgraphError(f"--eps: {exc}") from None


def specs_of(args: argparse.Namespace) -> list[Spec]:
    """Every configuration to measure, in order: net, relaxation, eps, then the reference
    beside dualgraph (paper relaxation only)."""
    from .scaling import available_mb
    memory = args.memory_limit if args.memory_limit is not None else 0.6 * available_mb()
    libraries = ["dualgraph"] + ([] if args.no_reference else ["convex_adversarial"])
    out = []
    for net in args.nets.split(","):
        for relaxation in args.relaxations.split(","):
            for eps in parse_eps(args.eps):
                for library in libraries:
                    if library == "dualgraph" or relaxation == "paper":
                        out.append(Spec(net.strip(), library, relaxation.strip(), eps, args.batch, args.repeats,
                                        args.threads, memory_mb=memory))
    return out


def run_benchmark(args: argparse.Namespace, progress=None) -> dict:
    """All configurations, each in a fresh process, as one JSON-able object."""
    from .scaling import machine_info, run_isolated
    start, commit = time.perf_counter(), _commit()
    machine = machine_info("cpu")
    rows: list[dict] = []
    for spec in specs_of(args):
        timeout = args.timeout if spec.library == "dualgraph" else args.reference_timeout
        if progress:
            progress(f"{spec.net:<9} {spec.library:<18} {spec.relaxation:<6} eps {spec.eps:.4g} ...")
        row = run_isolated(spec, timeout, module=__name__)
        for key, value in net_size(spec.net).items():
            row.setdefault(key, value)  # also on rows of runs that failed
        rows.append(row)
        if progress:
            progress(f"    {row['seconds_per_example']} s/example, {row['peak_mb']} MB, {row['direction']}, "
                     f"crossing {row.get('crossing')}" if row["status"] == "ok" else
                     f"    {row['status']}: {row.get('reason', '')}")
    if hasattr(os, "getloadavg"):
        machine["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    return {"benchmark": "resnet", "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
            "timeout_s": args.timeout, "reference_timeout_s": args.reference_timeout, "rows": rows,
            "exponents": depth_exponents(rows), "comparison": compare(rows), "peer": peer_estimates(rows),
            "machine": machine,
            "commit": commit, "total_seconds": round(time.perf_counter() - start, 1),
            "command": "dualgraph bench resnet " + " ".join(_argv_of(args))}


def depth_series(name: str) -> bool:
    """Whether ``name`` is one of the ``resnetK`` nets (same width, K blocks)."""
    return name.startswith("resnet") and name[6:].isdigit()


PEER_SECONDS = {"paper": 52.3, "crown": 54.3}
"""auto_LiRPA's CROWN, one thread, on the issue's 72 L-inf properties of the VNN-COMP 2021
CIFAR ResNets (``paper``: the paper's slope, ``crown``: the adaptive one): issue 15's figures,
measured by its author on another machine (auto_LiRPA does not install for the pinned torch)."""

PEER_BENCHMARK = {"resnet2b": (48, 2 / 255), "resnet4b": (24, 1 / 255)}
"""The 72 properties of VNN-COMP 2021's ``cifar10_resnet`` benchmark: 48 on ``resnet_2b`` at
eps 2/255 and 24 on ``resnet_4b`` at eps 1/255 (the benchmark's README: the smaller radius
"to reduce difficulty" of the deeper network). Network -> (properties, eps)."""
PEER_PROPERTIES = sum(count for count, _ in PEER_BENCHMARK.values())


def peer_estimates(rows: list[dict]) -> list[dict]:
    """Per relaxation where both networks ran at their benchmark radius
    (:data:`PEER_BENCHMARK`): the seconds the issue's 72 properties take at these
    per-example times, ``48 t(resnet2b, 2/255) + 24 t(resnet4b, 1/255)``, beside auto_LiRPA's
    :data:`PEER_SECONDS`. One property is one example here (its intermediate bounds and the
    9 margin rows)."""
    ours = {(r["net"], r["relaxation"], round(r["eps"] * 255, 6)): r["seconds_per_example"] for r in rows
            if r["status"] == "ok" and r["library"] == "dualgraph"}
    out = []
    for relaxation, peer in PEER_SECONDS.items():
        times = {net: ours.get((net, relaxation, round(eps * 255, 6))) for net, (_, eps) in PEER_BENCHMARK.items()}
        if any(t is None for t in times.values()):
            continue
        total = sum(PEER_BENCHMARK[net][0] * t for net, t in times.items())
        out.append({"relaxation": relaxation, **{f"{net}_s": t for net, t in times.items()},
                    "seconds_72": round(total, 1), "peer_seconds_72": peer, "speedup": round(peer / total, 2)})
    return out


def depth_exponents(rows: list[dict]) -> list[dict]:
    """Slope of log(seconds per example) against log(residual blocks) over the ``resnetK``
    nets (same width, only the depth differs), per library, relaxation and eps."""
    import numpy as np
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "ok" and depth_series(r["net"]):
            groups.setdefault((r["library"], r["relaxation"], r["eps"]), []).append(r)
    fits = []
    for (library, relaxation, eps), ok in groups.items():
        ok.sort(key=lambda r: r["blocks"])
        if len({r["blocks"] for r in ok}) >= 2:
            slope = np.polyfit(np.log([r["blocks"] for r in ok]), np.log([r["seconds_per_example"] for r in ok]), 1)[0]
            fits.append({"library": library, "relaxation": relaxation, "eps": eps, "exponent": round(float(slope), 2),
                         "blocks": [r["blocks"] for r in ok]})
    return fits


def compare(rows: list[dict]) -> list[dict]:
    """Per net and eps where both ran (paper relaxation): the reference's time over
    dualgraph's, and each one's lowest margin bound. The same network and relaxation give
    the same bounds in exact arithmetic; dualgraph's are lower by its rounding allowance
    (sound in floating point), which the reference does not have."""
    out = []
    ours = {(r["net"], r["eps"]): r for r in rows
            if r["status"] == "ok" and r["library"] == "dualgraph" and r["relaxation"] == "paper"}
    for r in rows:
        mine = ours.get((r["net"], r["eps"]))
        if r["library"] == "convex_adversarial" and r["status"] == "ok" and mine is not None:
            out.append({"net": r["net"], "eps": r["eps"],
                        "speedup": round(r["seconds_per_example"] / mine["seconds_per_example"], 2),
                        "dualgraph_lowest_margin": min(min(m) for m in mine["margins"]),
                        "reference_lowest_margin": min(min(m) for m in r["margins"])})
    return out


def _commit() -> str | None:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=root, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---- output ------------------------------------------------------------------------------------

def _eps_text(eps: float) -> str:
    k = eps * 255
    return f"{k:g}/255" if abs(k - round(k, 2)) < 1e-6 else f"{eps:g}"


def format_tables(result: dict) -> str:
    """One markdown table per relaxation: a row per net, eps and library."""
    out = []
    for relaxation in dict.fromkeys(r["relaxation"] for r in result["rows"]):
        out += [f"### relaxation `{relaxation}`", "",
                "| net | blocks | params | eps | library | direction | s / example | runs | intermediate s | "
                "J s | peak MB | crossing | status |",
                "|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in result["rows"]:
            if r["relaxation"] != relaxation:
                continue
            head = (f"| {r['net']} | {r.get('blocks', '')} | {_millions(r.get('parameters'))} | "
                    f"{_eps_text(r['eps'])} | {r['library']} |")
            if r["status"] != "ok":
                out.append(f"{head}{' |' * 7} {r['status']}: {r.get('reason', '')} |")
                continue
            out.append(f"{head} {r['direction']} | {r['seconds_per_example']:.3f} | {r['runs']} | "
                       f"{_num(r['intermediate_seconds'])} | {_num(r['final_seconds'])} | {_num(r['peak_mb'], 0)} | "
                       f"{_percent(r.get('crossing'))} | ok |")
        out.append("")
    return "\n".join(out)


def format_phases(result: dict) -> str:
    """Per dualgraph measurement: the seconds of each bounded value's intermediate bounds."""
    out = []
    for r in result["rows"]:
        if r["status"] != "ok" or "phases" not in r:
            continue
        out += [f"#### {r['net']}, `{r['relaxation']}`, eps {_eps_text(r['eps'])}: {r['direction']}, "
                f"J(C) {r['final_seconds']:.3f} s", "",
                f"One backward pass (one sign) from every bounded unit: {r['gmacs_all']:.3g} G multiply-adds per "
                f"example; from the crossing units alone: {r['gmacs_crossing']:.3g} G.", "",
                "| value | op | units | crossing | M multiply-adds per row | start | seconds |",
                "|---|---|---:|---:|---:|---|---:|"]
        out += [f"| {p['value']} | {p['op']} | {p['units']} | {_percent(p['crossing'])} | {p['row_mmacs']:.3g} | "
                f"{p['start']} | {_num(p['seconds'])} |" for p in r["phases"]]
        out.append("")
    return "\n".join(out)


def _num(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _percent(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _millions(v) -> str:
    return "" if v is None else f"{v / 1e6:.2f} M"


def report_markdown(result: dict) -> str:
    """The markdown report (``--out``): method, tables, exponents, comparison, machine, command."""
    m = result["machine"]
    lines = ["# Exact bounds on residual convolutional networks (`dualgraph bench resnet`)", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"Batch {result['batch']} (times are per example), {result['threads']} CPU thread(s), median of up to "
             f"{result['repeats']} timed runs (fewer once 30 s were spent; dual graphs built before timing). "
             "*intermediate s* and *J s* split the time; *crossing* is the share of bounded ReLU inputs with "
             "`l < 0 < u`; *peak MB* the resident memory above the level before the runs.", "",
             format_tables(result), "## Growth with depth (`resnetK`: seconds ~ blocks^e)", ""]
    lines += [f"- {f['library']} `{f['relaxation']}`, eps {_eps_text(f['eps'])}: e = {f['exponent']:.2f} "
              f"(blocks {', '.join(map(str, f['blocks']))})" for f in result["exponents"]] \
        or ["- fewer than two depths"]
    lines += ["", "## convex_adversarial / dualgraph (paper relaxation)", ""]
    lines += [f"- {c['net']}, eps {_eps_text(c['eps'])}: the reference takes {c['speedup']:.2f}x dualgraph's time; "
              f"lowest margin bound: dualgraph {c['dualgraph_lowest_margin']:.4g}, reference "
              f"{c['reference_lowest_margin']:.4g}" for c in result["comparison"]] or ["- no net where both finished"]
    lines += ["", "## The VNN-COMP 2021 ResNets beside the issue's auto_LiRPA figures", ""]
    lines += [f"- `{e['relaxation']}`: resnet2b {e['resnet2b_s']:.3f} s per property at eps 2/255, resnet4b "
              f"{e['resnet4b_s']:.3f} s at 1/255, so {e['seconds_72']:g} s for the benchmark's "
              f"{PEER_PROPERTIES} (48 + 24; auto_LiRPA: {e['peer_seconds_72']:g} s, another machine): "
              f"{e['speedup']:.2f}x" for e in result.get("peer", [])] \
        or ["- resnet2b at eps 2/255 and resnet4b at 1/255 were not both run"]
    lines += ["", "## Phases (intermediate bounds per bounded value)", "", format_phases(result),
              "## Machine and command", "",
              f"- {m['cpu']}, {m['cores']} cores, {m['memory_mb']} MB available, torch {m['torch']}, "
              f"convex_adversarial {m.get('convex_adversarial')}, load average {m.get('load_average_start')} at "
              f"start, {m.get('load_average_end')} at the end",
              f"- commit {result['commit']}, whole run {result['total_seconds']:.0f} s", "",
              f"```\n{result['command']}\n```", ""]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nets", default=DEFAULT_NETS,
                   help=f"comma-separated networks: paper, resnetK (K residual blocks), resnet2b and resnet4b "
                        f"(the VNN-COMP 2021 CIFAR ResNets' layouts), resnet18, pooled (a CNN with max pools) "
                        f"(default {DEFAULT_NETS})")
    p.add_argument("--relaxations", default="paper,crown", help="comma-separated: paper, crown (default both)")
    p.add_argument("--eps", default=DEFAULT_EPS, help=f"comma-separated L-inf radii, fractions allowed "
                                                      f"(2/255, 0.5/255; default {DEFAULT_EPS})")
    p.add_argument("--batch", type=int, default=1, help="examples certified at once (default 1)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per measurement (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration, median reported (default 3)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per dualgraph configuration (default 600)")
    p.add_argument("--reference-timeout", type=float, default=120.0,
                   help="seconds per convex_adversarial configuration (default 120)")
    p.add_argument("--memory-limit", type=float, help="MB per configuration (default 60%% of the available memory)")
    p.add_argument("--no-reference", action="store_true", help="skip the convex_adversarial runs")
    p.add_argument("--json", action="store_true", help="print one JSON object (rows, exponents, comparison)")
    p.add_argument("--out", metavar="FILE", help="write a markdown report to FILE")


def main(args: argparse.Namespace) -> int:
    from dualgraph.errors import DualgraphError
    for net in args.nets.split(","):
        build_net(net.strip())  # an unknown name fails before anything runs
    if args.batch < 1 or args.repeats < 1 or args.threads < 1:
        raise DualgraphError("--batch, --repeats and --threads must be at least 1")
    if not args.no_reference:
        try:
            import convex_adversarial  # noqa: F401
        except ImportError:
            args.no_reference = True
    result = run_benchmark(args, None if args.json else (lambda s: print(s, file=sys.stderr, flush=True)))
    if args.out:
        with open(args.out, "w") as f:
            f.write(report_markdown(result))
    if args.json:
        print(json.dumps(result))
    else:
        print(format_tables(result))
        print("\n".join(f"depth exponent {f['library']} {f['relaxation']} eps {_eps_text(f['eps'])}: {f['exponent']}"
                        for f in result["exponents"]))
        print("\n".join(f"VNN-COMP ResNets {e['relaxation']}: {e['seconds_72']:g} s for the {PEER_PROPERTIES} "
                        f"properties, auto_LiRPA {e['peer_seconds_72']:g} s ({e['speedup']:.2f}x)"
                        for e in result["peer"]))
    return 0


def _argv_of(args: argparse.Namespace) -> list[str]:
    out = [f"--{k.replace('_', '-')}" for k in ("no_reference", "json") if getattr(args, k, False)]
    defaults = {"nets": DEFAULT_NETS, "relaxations": "paper,crown", "eps": DEFAULT_EPS, "batch": 1, "threads": 1,
                "repeats": 3, "timeout": 600.0, "reference_timeout": 120.0, "memory_limit": None, "out": None}
    for key, default in defaults.items():
        value = getattr(args, key, default)
        if value != default:
            out += [f"--{key.replace('_', '-')}", str(value)]
    return out


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv))
