"""Verification mode: answer VNN-LIB instances the way VNN-COMP does.

An instance is an ONNX model and a VNN-LIB property (:mod:`dualgraph.vnnlib`): input
boxes and, over each, an unsafe output region ``OR_m (C_m y <= d_m)``. The answer is

* ``unsat`` -- the property holds: for every box, every conjunction ``m`` is proved
  empty, i.e. some row ``c_i`` has a certified lower bound ``min c_i . f(x') > d_i``
  over the box (or a non-negative combination of the rows does; we also try their mean);
* ``sat`` -- a counterexample: an ``x`` in a box whose outputs, computed by onnxruntime
  on the *original* ONNX file in the model's own precision, satisfy every row of one
  conjunction; it is found by PGD (:mod:`dualgraph.attack`) or at the centre of a box
  of the input splitting below, and never reported without that check;
* ``unknown`` -- neither, with every method tried; ``timeout`` -- the time ran out first
  (an answer that arrives after the time limit is reported as ``timeout`` too, as the
  competition would score it); ``error`` -- a bad file or an unsupported model (CLI).

Order of work, cheapest first: one PGD round (counterexamples are often found in a few
milliseconds), the dual bounds of Wong et al. in float64 with the paper's ReLU relaxation,
then CROWN slopes (tighter) and optimised slopes on the conjunctions still open; then a few
thorough PGD rounds with other seeds (targeted at each conjunction in turn, many more starts,
steps that shrink; together at most :data:`THOROUGH_ATTACK_SHARE` of the time left); for
low-dimensional inputs (ACAS Xu style) the box is then split along its widest side and every
piece bounded, which also tests the centre of each piece as a candidate counterexample; for
the others branch and bound splits ReLUs (:mod:`dualgraph.bab`) until the time runs out.
Proofs from different relaxations or pieces combine soundly (each bound is valid on its own).

Soundness. Bounds run in float64 (the float32 weights convert exactly); they include the
rounding allowance of :mod:`dualgraph.rounding` (the bound computation and the model's own
float32 evaluation, scaled by the magnitudes of the terms summed), the boxes hold their
inputs as the model is fed them (rounded to its input precision) and are rounded outward, and a proof needs ``lower > d + unsat_margin * (1 + |d|)`` (a small extra margin
for the property's decimal constants). Before bounding, the lowered IR is compared
with onnxruntime at the box centre and a few random points: a frontend that lowered the model wrongly would make
proofs about another function, so a disagreement is an error, not an answer. A final
Softmax is bounded like any op (the certifiers keep it, ``logits=False``: VNN-LIB's ``Y`` are
the model's outputs); a final ArgMax is refused.

Several instances on one model share a :class:`VerifyModel` (lowered, simplified and
opened in onnxruntime once): :func:`dualgraph.competition.run_instances` keeps one per
ONNX file. Counterexample search is in :mod:`dualgraph.falsify`, the competition CSV
runner in :mod:`dualgraph.competition`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .deadline import Deadline, DeadlineExceeded
from .errors import DualgraphError, UnsupportedOpError
from .falsify import Falsifier, Found
from .vnnlib import VnnlibProperty, format_counterexample, read_vnnlib

ANSWERS = ("sat", "unsat", "unknown", "timeout", "error")


THOROUGH_ATTACK_SHARE = 0.1
"""The thorough PGD rounds together take at most this share of the time left after the bounds."""


@dataclass(frozen=True)
class VerifyConfig:
    """How hard to try.

    relaxations: ReLU relaxations tried in order (each on the conjunctions still open);
        ``alpha_steps``: gradient steps of the optimised slopes (``"alpha"``) on the whole box.
    branch_and_bound: split ReLU units (:mod:`dualgraph.bab`) on the conjunctions the
        relaxations leave open, for properties with more inputs than ``split_max_inputs``;
        ``bab_batch`` parent domains per bound computation, ``bab_steps`` gradient steps of
        the slopes and split multipliers of each domain; ``bab_float32``: those ascents run in
        float32 and each domain they prove is bounded again in float64 at the slopes and
        multipliers that proved it (only the float64 bound counts); ``bab_fused``: on a chain
        of affine maps and ReLUs those float32 ascents run as fused dense passes
        (:mod:`dualgraph.chain`), confirmed the same way; ``bab_empty_test``: children that one
        layer's splits make empty are dropped before their ascent, on a proof by a small LP
        (:mod:`dualgraph.split_lp`). ``bab_attack_steps``: PGD steps
        from the box corners that minimise each batch's worst open domains' bounds (0: the
        corners are only evaluated); a point found is confirmed in onnxruntime.
    attack_steps, attack_restarts: one PGD round (restarts run as one batch).
    attack_rounds: PGD rounds in all (different seeds): one before the bounds, the rest
        after them if they proved nothing, before any splitting: thorough rounds of
        ``4 * attack_restarts`` starts per conjunction (each start aimed at one conjunction),
        ``3 * attack_steps`` steps shrinking from half the box's width to a fiftieth.
    split_max_inputs: split the input box when the property has at most this many
        inputs (0: never); ``split_batch`` pieces are bounded per call, and splitting
        gives up (``unknown``) after ``split_max_boxes`` pieces.
    unsat_margin: relative safety margin of a proof (see the module docstring).
    max_memory: memory budget of the bound computations in bytes (``BoundConfig.max_memory``).
    """

    relaxations: tuple[str, ...] = ("paper", "crown", "alpha")
    alpha_steps: int = 20
    branch_and_bound: bool = True
    bab_batch: int = 256
    bab_steps: int = 20
    bab_float32: bool = True
    bab_fused: bool = True
    bab_empty_test: bool = True
    bab_attack_steps: int = 10
    attack_steps: int = 100
    attack_restarts: int = 16
    attack_rounds: int = 3
    split_max_inputs: int = 16
    split_batch: int = 256
    split_max_boxes: int = 200_000
    unsat_margin: float = 1e-9
    seed: int = 0
    device: str = "cpu"
    max_memory: int | None = None

    def __post_init__(self) -> None:
        if not self.relaxations or any(r not in ("paper", "crown", "alpha") for r in self.relaxations):
            raise DualgraphError(f"relaxations must be a non-empty list of paper/crown/alpha, got {self.relaxations!r}")
        if self.bab_batch < 1 or self.bab_steps < 0 or self.alpha_steps < 0:
            raise DualgraphError("bab_batch must be >= 1, bab_steps and alpha_steps >= 0")
        if self.attack_rounds < 0 or self.attack_restarts < 1 or self.attack_steps < 0:
            raise DualgraphError("attack_rounds and attack_steps must be >= 0 and attack_restarts >= 1")
        if self.split_batch < 1 or self.split_max_boxes < 1 or self.unsat_margin < 0:
            raise DualgraphError("split_batch and split_max_boxes must be >= 1 and unsat_margin >= 0")


@dataclass
class VerifyResult:
    """The answer to one instance; ``x``/``y`` (flat) only for ``sat``: the input fed to
    onnxruntime and its outputs there."""

    answer: str
    seconds: float
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def result_text(self) -> str:
        """The competition result file: the answer, and for ``sat`` the counterexample."""
        if self.answer == "sat":
            return format_counterexample(self.x, self.y)
        return self.answer + "\n"


class VerifyModel:
    """An ONNX model prepared once for many properties: the simplified IR (bounds and
    attacks run on it in float64), a Certifier per relaxation, and an onnxruntime session
    of the original file (counterexamples are confirmed there)."""

    def __init__(self, path: str | Path, device: str = "cpu", max_memory: int | None = None) -> None:
        from .api import load_model
        self.path = Path(path)
        self.graph = load_model(self.path)
        if len(self.graph.inputs) != 1 or len(self.graph.outputs) != 1:
            raise DualgraphError(f"'{self.path}' has {len(self.graph.inputs)} inputs and {len(self.graph.outputs)} "
                                 "outputs; VNN-LIB verification needs exactly one of each")
        last = self.graph.outputs[0].producer
        from .op_registry import OPS
        if last is not None and getattr(OPS.get(last.op), "output_side", False):
            raise UnsupportedOpError(f"'{self.path}' ends in {last.op_type} (node '{last.name}'), which reads a class "
                                     "off the logits; VNN-LIB properties are stated over the model's outputs: export "
                                     "the model without it (its logits) and state the property over them")
        self.device, self.max_memory = device, max_memory
        self.n_inputs = self.graph.inputs[0].numel
        self.n_outputs = self.graph.outputs[0].numel
        self.input_shape = tuple(self.graph.inputs[0].unit_shape)
        self._certifiers: dict[str, Any] = {}
        self._session = None
        self._evaluator: str | None = None
        self._interpreter = None
        self.certifier(  # fails early, naming every op without a dual layer
            "paper")

    def certifier(self, relaxation: str, alpha_steps: int = 20, dtype: torch.dtype = torch.float64):
        """The :class:`~dualgraph.api.Certifier` with this ReLU relaxation, float64 unless
        ``dtype`` says otherwise (cached)."""
        key = (relaxation, alpha_steps, dtype)
        if key not in self._certifiers:
            from .api import Certifier
            from .scheduler import BoundConfig
            config = BoundConfig(relu_relaxation=relaxation, alpha_steps=alpha_steps, max_memory=self.max_memory)
            # logits=False: VNN-LIB's Y are the model's outputs as they are (a final Softmax included)
            self._certifiers[key] = Certifier(self.graph, config, device=self.device, dtype=dtype, logits=False)
        return self._certifiers[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The IR in float64 on flat inputs ``[B, n_inputs]`` -> ``[B, n_outputs]`` (differentiable)."""
        return self.certifier("paper").forward(x.reshape(x.shape[0], *self.input_shape))

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The IR in the graph's own precision (float32 for most models; no weight
        conversion per call): what the attack runs on. ``[B, n_inputs]`` -> ``[B, n_outputs]``."""
        if self._interpreter is None:
            from .interpreter import Interpreter
            self._interpreter = Interpreter(self.graph)
        out = self._interpreter.run(x.reshape(x.shape[0], *self.input_shape).to(self.graph.inputs[0].dtype))[0]
        return out.reshape(x.shape[0], -1)

    def run_onnx(self, x: np.ndarray) -> np.ndarray:
        """The original ONNX model in onnxruntime on flat inputs ``[B, n_inputs]``; ``[B, n_outputs]`` float64.

        VNN-LIB numbers ``X_i`` row-major over the ONNX input tensor and the IR input is
        that tensor with a batch axis in front (added or already there), so a flat row
        reshaped to the IR's example shape is the ONNX tensor of one example.

        When onnxruntime cannot run the file because it uses ops that plugins define, the
        IR interpreter evaluates it instead, in the model's own precision (see
        :attr:`confirmed_by`).
        """
        from dualgraph.frontends.onnx import onnx_feeds
        session = self._ort()
        if session is None:
            with torch.no_grad():
                return self.forward_fast(torch.as_tensor(np.asarray(x, dtype=np.float64))).double().numpy()
        x = np.asarray(x).reshape(-1, *self.input_shape)
        out_name = self.graph.meta["onnx_outputs"][0]["name"]
        feeds = onnx_feeds(self.graph, x)
        ys = [np.asarray(session.run([out_name], feed)[0], dtype=np.float64) for feed in feeds]
        return np.concatenate([y.reshape(-1, self.n_outputs) for y in ys]) if len(feeds) > 1 \
            else ys[0].reshape(x.shape[0], self.n_outputs)

    def onnx_input_dtype(self) -> np.dtype:
        return np.dtype(self.graph.meta["onnx_inputs"][0]["dtype"])

    @property
    def confirmed_by(self) -> str:
        """Which evaluator confirms counterexamples: onnxruntime on the original file, or the
        IR interpreter when onnxruntime cannot run the plugin ops the file uses."""
        self._ort()
        return self._evaluator

    def _ort(self):
        """The onnxruntime session, or None when it cannot run the file's plugin ops."""
        if self._session is None and self._evaluator is None:
            import onnxruntime as ort
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1  # tiny batches: threads cost more than they give
            options.log_severity_level = 3
            source = str(self.path)
            if self.path.suffix == ".gz":
                from .files import read_bytes
                source = read_bytes(self.path, "ONNX file")
            try:
                self._session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
                self._evaluator = "onnxruntime"
            except Exception as exc:  # onnxruntime's own error types; only plugin ops excuse them
                plugin_ops = self._plugin_ops()
                if not plugin_ops:
                    raise DualgraphError(f"onnxruntime cannot run '{self.path.name}' ({type(exc).__name__}: "
                                         f"{str(exc).splitlines()[0] if str(exc) else ''}); counterexamples could "
                                         "not be confirmed") from exc
                self._evaluator = (f"the dualgraph IR interpreter ({str(self.graph.inputs[0].dtype).replace('torch.', '')}; "
                                   "onnxruntime "
                                   f"cannot run the plugin op{'s' if len(plugin_ops) > 1 else ''} "
                                   f"{', '.join(plugin_ops)})")
        return self._session

    def _plugin_ops(self) -> list[str]:
        from .op_registry import OPS
        # ops a plugin adds (not built-ins it replaces, which onnxruntime knows)
        names = {OPS[n.op].name for n in self.graph.nodes
                 if n.op in OPS and not OPS[n.op].built_in and OPS[n.op].replaced is None}
        return sorted(names)


class _Timeout(Exception):
    pass


def verify_property(model: VerifyModel, prop: VnnlibProperty | Sequence[VnnlibProperty], timeout: float,
                    config: VerifyConfig = VerifyConfig(), *, start: float | None = None) -> VerifyResult:
    """Answer one instance: ``prop`` is one property or all of a file's (one per input box).

    ``start`` (a ``time.monotonic()`` value) lets the time limit include earlier work
    such as reading the files. Raises :class:`DualgraphError` when the property does not
    fit the model.
    """
    props = [prop] if isinstance(prop, VnnlibProperty) else list(prop)
    clock = Deadline(timeout, start)
    details: dict[str, Any] = {"boxes": len(props), "unconfirmed": 0}
    for p in props:
        if p.n_inputs != model.n_inputs or p.n_outputs != model.n_outputs:
            raise DualgraphError(f"the property has {p.n_inputs} inputs and {p.n_outputs} outputs but the model "
                                 f"'{model.path.name}' has {model.n_inputs} and {model.n_outputs}")
    search = _Search(model, config, clock, details)
    try:
        answer = search.run(props)
    except Found as found:
        details["method"] = found.method
        details["confirmed_by"] = model.confirmed_by
        return _finish(VerifyResult("sat", clock.elapsed, found.x, found.y, details), timeout)
    except (_Timeout, DeadlineExceeded):  # between phases, or inside a bound computation
        answer = "timeout"
    return _finish(VerifyResult(answer, clock.elapsed, details=details), timeout)


def _finish(result: VerifyResult, timeout: float) -> VerifyResult:
    if result.answer in ("sat", "unsat") and result.seconds > timeout:
        result.details["late_answer"] = result.answer
        result.answer, result.x, result.y = "timeout", None, None
    return result


class _Search:
    """The phases of :func:`verify_property` for one instance."""

    def __init__(self, model: VerifyModel, config: VerifyConfig, clock: Deadline, details: dict) -> None:
        self.model, self.config, self.clock, self.details = model, config, clock, details
        self.falsifier = Falsifier(model, config, clock, details)

    def run(self, props: list[VnnlibProperty]) -> str:
        cfg = self.config
        if not props:
            self.details["method"] = "the assertions are unsatisfiable"
            return "unsat"
        with torch.no_grad():
            for p in props:
                self.falsifier.check_lowering(p)
        if cfg.attack_rounds:
            for p in props:
                self.falsifier.attack(p, cfg.seed)
        # open[k]: indices of the conjunctions of box k not yet proved empty
        open_ = [set(range(len(p.unsafe))) for p in props]
        for relaxation in cfg.relaxations:
            for p, todo in zip(props, open_):
                self._tick()
                if todo:
                    todo -= self._prove(p, relaxation, sorted(todo))
            self.details.setdefault("open_after", {})[relaxation] = sum(map(len, open_))
            if not any(open_):
                self.details["method"] = f"bounds ({relaxation})"
                return "unsat"
        if cfg.attack_rounds > 1:  # before the searches that may take all of the time left
            budget = self.clock.remaining * THOROUGH_ATTACK_SHARE / (len(props) * (cfg.attack_rounds - 1))
            for round_ in range(1, cfg.attack_rounds):
                for p in props:
                    self._tick()
                    self.falsifier.attack(p, cfg.seed + round_, thorough_for=budget)
        if cfg.split_max_inputs:
            for p, todo in zip(props, open_):
                if todo and p.n_inputs <= cfg.split_max_inputs and self._split(p):
                    todo.clear()
            if not any(open_):
                self.details["method"] = "input splitting"
                return "unsat"
        if cfg.branch_and_bound:
            for p, todo in zip(props, open_):
                if todo and p.n_inputs > cfg.split_max_inputs and self._branch_and_bound(p, sorted(todo)):
                    todo.clear()
            if not any(open_):
                self.details["method"] = "branch and bound"
                return "unsat"
        return "unknown"

    def _tick(self) -> None:
        if self.clock.expired:
            raise _Timeout

    # ---- proofs ----------------------------------------------------------------------
    def _fed_bounds(self, p: VnnlibProperty) -> tuple[np.ndarray, np.ndarray]:
        """The box a proof covers: ``p``'s inputs as the model is fed them, rounded to its input
        precision (:meth:`VnnlibProperty.fed_bounds`)."""
        return p.fed_bounds(self.model.onnx_input_dtype())

    def _rows(self, p: VnnlibProperty, conjs: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Spec rows of the conjunctions ``conjs``: every row, plus the mean of each
        multi-row conjunction's rows; returns ``(C [m, n_out], d [m], owner [m])``."""
        rows, rhs, owner = [], [], []
        for k in conjs:
            c = p.unsafe[k]
            rows.append(c.C)
            rhs.append(c.d)
            owner += [k] * len(c.d)
            if len(c.d) > 1:
                rows.append(c.C.mean(0, keepdims=True))
                rhs.append(c.d.mean(keepdims=True))
                owner.append(k)
        n = p.n_outputs
        C = np.concatenate(rows) if rows else np.zeros((0, n))
        d = np.concatenate(rhs) if rhs else np.zeros(0)
        return C, d, np.asarray(owner, dtype=np.int64)

    def _infeasible(self, lower: np.ndarray, d: np.ndarray) -> np.ndarray:
        return lower > d + self.config.unsat_margin * (1 + np.abs(d))

    def _prove(self, p: VnnlibProperty, relaxation: str, conjs: list[int]) -> set[int]:
        """The conjunctions among ``conjs`` whose emptiness the bounds prove over the box."""
        from .input_sets import Box, outward
        C, d, owner = self._rows(p, conjs)
        if not len(d):
            return set()  # only row-less conjunctions: all of the output space
        cert = self.model.certifier(relaxation, self.config.alpha_steps)
        cert.scheduler.deadline = self.clock
        lo, hi = (torch.tensor(a, dtype=torch.float64).reshape(1, *self.model.input_shape)
                  for a in self._fed_bounds(p))
        lo, hi = outward(lo, hi, torch.float64)  # the decimals of the file were rounded to binary
        with torch.no_grad():
            lower = cert.lower_bounds(Box(lo, hi), torch.as_tensor(C, dtype=torch.float64)[None])[0].cpu().numpy()
        # how far the conjunction furthest from a proof is (> 0: every one proved)
        best = np.full(len(p.unsafe), -np.inf)
        np.maximum.at(best, owner, lower - d)
        gaps = self.details.setdefault("worst_margin", {})
        gaps[relaxation] = min(gaps.get(relaxation, np.inf), float(best[conjs].min()))
        return {int(k) for k in owner[self._infeasible(lower, d)]}

    def _branch_and_bound(self, p: VnnlibProperty, conjs: list[int]) -> bool:
        """Whether branch and bound over ReLU splits (:mod:`dualgraph.bab`) proves the
        conjunctions ``conjs`` empty; raises :class:`~dualgraph.falsify.Found` for a confirmed
        counterexample and lets the deadline end it."""
        from .bab import BranchAndBound
        from .input_sets import outward
        C, d, owner = self._rows(p, conjs)
        if not len(d) or len(np.unique(owner)) < len(conjs):
            return False  # a row-less conjunction can never be proved empty
        cert = self.model.certifier("alpha", self.config.bab_steps)
        cert.scheduler.deadline = self.clock
        lo, hi = outward(*(torch.tensor(a, dtype=torch.float64).reshape(1, *self.model.input_shape)
                           for a in self._fed_bounds(p)), torch.float64)

        def check(xs: np.ndarray) -> None:
            self.falsifier.descend_from(p, xs, self.config.bab_attack_steps,
                                        "branch and bound (PGD from a domain's minimising corner)")

        _, local = np.unique(owner, return_inverse=True)
        fast = self.model.certifier("alpha", self.config.bab_steps, torch.float32) if self.config.bab_float32 else None
        if fast is not None:
            fast.scheduler.deadline = self.clock
        bab = BranchAndBound(cert.scheduler, lo, hi, torch.as_tensor(C), torch.as_tensor(d), local, check,
                             batch=self.config.bab_batch, margin=self.config.unsat_margin,
                             fast=None if fast is None else fast.scheduler, fused=self.config.bab_fused,
                             empty_test=self.config.bab_empty_test)
        try:
            result = bab.run()
        finally:
            self.details["bab_domains"] = self.details.get("bab_domains", 0) + bab.bounded
            if bab.empty:
                self.details["bab_empty_domains"] = self.details.get("bab_empty_domains", 0) + bab.empty
            if bab.progress.open_domains:  # how far a search that stopped got (a proved one has none open)
                self.details["bab_open_domains"] = bab.progress.open_domains
                self.details["bab_worst_open_margin"] = bab.progress.worst_margin
        if not result.proved:
            self.details["bab"] = result.reason
        return result.proved

    def _split(self, p: VnnlibProperty) -> bool:
        """Bisect the box until every piece is proved (True) or too many pieces (False);
        raises :class:`~dualgraph.falsify.Found` for a confirmed centre and :class:`_Timeout` when time runs out."""
        from .input_sets import Box, outward
        cfg = self.config
        C, d, owner = self._rows(p, range(len(p.unsafe)))
        if (np.bincount(owner, minlength=len(p.unsafe)) == 0).any():
            return False  # a row-less conjunction can never be proved empty
        # the fastest tight relaxation: many small boxes, each cheap (no slope optimisation)
        cert = self.model.certifier("crown" if "crown" in cfg.relaxations or "alpha" in cfg.relaxations
                                    else cfg.relaxations[-1])
        cert.scheduler.deadline = self.clock
        spec = torch.as_tensor(C, dtype=torch.float64)[None]
        lo0, hi0 = outward(*(torch.tensor(a, dtype=torch.float64)[None] for a in self._fed_bounds(p)),
                           torch.float64)
        scale = torch.where(hi0 > lo0, hi0 - lo0, torch.ones_like(lo0))
        queue_lo, queue_hi = lo0, hi0
        done = 0
        while len(queue_lo):
            self._tick()
            if done >= cfg.split_max_boxes:
                self.details["split_boxes"] = done
                return False
            lo, hi = queue_lo[:cfg.split_batch], queue_hi[:cfg.split_batch]
            queue_lo, queue_hi = queue_lo[cfg.split_batch:], queue_hi[cfg.split_batch:]
            B = len(lo)
            with torch.no_grad():
                box = Box(lo.reshape(B, *self.model.input_shape), hi.reshape(B, *self.model.input_shape))
                lower = cert.lower_bounds(box, spec).cpu().numpy()  # [B, m]
                empty = np.zeros((B, len(p.unsafe)), dtype=bool)
                np.logical_or.at(empty.T, owner, self._infeasible(lower, d).T)
                open_ = torch.as_tensor(~empty.all(1))
                done += B
                if not open_.any():
                    continue
                lo, hi = lo[open_], hi[open_]
                centre = (lo + hi) / 2
                y = self.model.forward(centre).numpy()
                hits = p.violations(y).min(axis=1, initial=np.inf) <= 1e-6
                if hits.any():
                    self.falsifier.confirm(p, centre[torch.as_tensor(hits)].numpy()[:16], "input splitting (box centre)")
                widest = ((hi - lo) / scale).argmax(1)
                rows = torch.arange(len(lo))
                mid = centre[rows, widest]
                left_hi, right_lo = hi.clone(), lo.clone()
                left_hi[rows, widest] = mid
                right_lo[rows, widest] = mid
                queue_lo = torch.cat([queue_lo, lo, right_lo])
                queue_hi = torch.cat([queue_hi, left_hi, hi])
        self.details["split_boxes"] = self.details.get("split_boxes", 0) + done
        return True


# ---- instances ---------------------------------------------------------------------------
def verify_instance(onnx_path: str | Path, vnnlib_path: str | Path, timeout: float,
                    config: VerifyConfig = VerifyConfig(), model: VerifyModel | None = None) -> VerifyResult:
    """Read the files and answer; the time limit covers reading the property and, when no
    ``model`` is given, loading the ONNX file."""
    start = time.monotonic()
    if model is None:
        model = VerifyModel(onnx_path, config.device, config.max_memory)
    props = read_vnnlib(vnnlib_path)
    return verify_property(model, props, timeout, config, start=start)


