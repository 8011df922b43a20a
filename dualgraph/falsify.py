"""Counterexamples for verification mode: PGD on the lowered model, every hit confirmed
in onnxruntime on the original file (:mod:`dualgraph.verification` has the answers' rules).

A candidate is moved into the property's box in the model's input precision
(:func:`cast_into_box`) and run in onnxruntime; only a point whose onnxruntime outputs
satisfy every row of one unsafe conjunction is reported (:class:`Found`). Before any
bound is trusted, :meth:`Falsifier.check_lowering` compares the lowered IR with
onnxruntime at the box centre (a free candidate as well) and a few random points of the box.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .attack import pgd_attack, unsafe_margin
from .errors import DualgraphError
from .vnnlib import VnnlibProperty


THOROUGH_MAX_RESTARTS = 1024
"""A thorough round runs its starts as one batch: at most this many ..."""

THOROUGH_MEMORY = 1 << 30
"""... and at most as many as keep the batch's activations (and their gradients, about three
float32 copies of every value) within this many bytes: 89 starts on a ResNet-18-sized network."""

DESCENT_SHARE = 0.05
"""At most this share of the time since the first descent from branch-and-bound corners goes to
such descents (:meth:`Falsifier.descend_from`); past it the corners are only evaluated. A
descent costs about 20 ms on the mnistfc networks, and trees of small batches call it hundreds
of times."""


LOWERING_POINTS = 8
"""Random points of the box at which :meth:`Falsifier.check_lowering` compares the IR with
onnxruntime, besides the centre."""


class Found(Exception):
    """A confirmed counterexample (raised out of the search loops)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, method: str) -> None:
        self.x, self.y, self.method = x, y, method


class Falsifier:
    """Counterexample search on one instance: ``model`` is a
    :class:`~dualgraph.verification.VerifyModel`, ``clock`` a
    :class:`~dualgraph.deadline.Deadline` (checked between steps), ``details`` the result's
    details (attack rounds and unconfirmed candidates are counted there)."""

    def __init__(self, model, config, clock, details: dict) -> None:
        self.model, self.config, self.clock, self.details = model, config, clock, details
        self.descent_seconds, self.descent_since = 0.0, None

    def attack(self, p: VnnlibProperty, seed: int, thorough_for: float | None = None) -> None:
        """One PGD round (``config.attack_restarts`` starts of ``config.attack_steps`` steps);
        ``thorough_for=seconds``: a thorough one, cut short after that long -- every start aimed
        at one conjunction, ``4 * attack_restarts`` starts per conjunction and ``3 * attack_steps``
        steps shrinking from half the box's width to a fiftieth (on networks whose outputs are
        flat over most of the box, the many random starts and the long first steps are what
        finds the unsafe pockets)."""
        self.clock.check()
        cfg = self.config
        # In the model's precision (float32: twice as fast as float64); the hit is then
        # moved into the exact box and checked in onnxruntime by _confirm.
        lo, hi = self._box(p)
        unsafe = _aimed_inside(p)
        time_limit = max(self.clock.remaining, 0.0)
        if thorough_for is None:
            res = pgd_attack(self.model.forward_fast, lo, hi, unsafe, steps=cfg.attack_steps,
                             restarts=cfg.attack_restarts, seed=seed, time_limit=time_limit)
        else:
            activations = sum(v.numel for v in self.model.graph.values.values() if not v.is_const)
            fits = THOROUGH_MEMORY // (12 * max(activations, 1))
            restarts = max(cfg.attack_restarts, min(4 * cfg.attack_restarts * max(len(unsafe), 1),
                                                    THOROUGH_MAX_RESTARTS, fits))
            res = pgd_attack(self.model.forward_fast, lo, hi, unsafe, steps=3 * cfg.attack_steps, restarts=restarts,
                             seed=seed, targeted=True, schedule=(0.5, 0.1, 0.02),
                             time_limit=min(time_limit, thorough_for))
        self.details["attack_rounds"] = self.details.get("attack_rounds", 0) + 1
        if bool(res.found[0]):
            x = res.x.reshape(1, -1).double().numpy()
            self.confirm(p, x, f"attack (PGD, seed {seed})")
            self.refine(p, x[0], f"attack (PGD, seed {seed}, refined in onnxruntime)")

    def descend_from(self, p: VnnlibProperty, starts: np.ndarray, steps: int, method: str) -> None:
        """A short PGD (``steps`` steps, in the model's precision) from each of the points
        ``starts`` ``[k, n_inputs]`` in the box -- e.g. the corners that minimise branch-and-bound
        domains' bounds, which a domain's optimised dual variables point to; the best point is
        confirmed like an attack's. ``steps = 0``, or once the descents have taken
        :data:`DESCENT_SHARE` of the time since the first: the points themselves are checked."""
        self.clock.check()
        start = time.monotonic()
        self.descent_since = self.descent_since or start
        if self.descent_seconds > DESCENT_SHARE * (start - self.descent_since):
            steps = 0
        lo, hi = self._box(p)
        res = pgd_attack(self.model.forward_fast, lo, hi, _aimed_inside(p), steps=steps, starts=torch.as_tensor(starts),
                         time_limit=max(self.clock.remaining, 0.0))
        self.descent_seconds += time.monotonic() - start
        if bool(res.found[0]):
            x = res.x.reshape(1, -1).double().numpy()
            self.confirm(p, x, method)
            self.refine(p, x[0], method + ", refined in onnxruntime")

    def _box(self, p: VnnlibProperty) -> tuple[torch.Tensor, torch.Tensor]:
        """The property's input box in the model's input precision."""
        dtype = self.model.graph.inputs[0].dtype
        return torch.tensor(p.input_lo, dtype=dtype), torch.tensor(p.input_hi, dtype=dtype)

    def refine(self, p: VnnlibProperty, x: np.ndarray, method: str, steps: int = 24) -> None:
        """A candidate the IR finds unsafe but onnxruntime does not (their float32 results
        differ near the boundary): step deeper into the unsafe set along the IR's gradient,
        with growing steps, until onnxruntime confirms a point (:class:`Found`) or the steps
        or the time run out. Every point tested is in the box and run in onnxruntime."""
        lo, hi = p.input_lo, p.input_hi
        width = np.maximum(hi - lo, 0.0)
        unsafe = [(torch.tensor(c.C), torch.tensor(c.d)) for c in p.unsafe]
        alpha = 1e-4
        for _ in range(steps):
            self.clock.check()
            t = torch.tensor(x, dtype=torch.float64).reshape(1, -1).requires_grad_(True)
            margin = unsafe_margin(self.model.forward(t), unsafe).sum()
            (grad,) = torch.autograd.grad(margin, t)
            x = np.clip(x - alpha * width * np.sign(grad[0].numpy()), lo, hi)
            self.confirm(p, x[None], method)
            alpha *= 2

    def confirm(self, p: VnnlibProperty, xs: np.ndarray, method: str) -> None:
        """Raise :class:`Found` for the first of the candidates ``xs [B, n]`` that
        onnxruntime confirms: a point exactly in the box (:meth:`VnnlibProperty.holds_exactly`)
        whose outputs, as onnxruntime computes them at the point rounded to the nearest value of
        the model's input precision, are exactly in an unsafe conjunction.

        The point is a value of that precision wherever the box holds one (it is then fed as
        it is); a coordinate whose interval holds none (``X_0 > 1``, ``X_0 < 1.00000001`` in
        float32) takes the nearest float64 point inside and is fed rounded, as the competition's
        checker feeds it (proofs cover those inputs too: :meth:`VnnlibProperty.fed_bounds`)."""
        dtype = self.model.onnx_input_dtype()
        lo, hi = p.input_lo, p.input_hi
        report = np.stack([cast_into_box(x, lo, hi, dtype, p.open_lo, p.open_hi) for x in xs])
        no_value = (report < lo) | (report > hi) | on_open_bound(report, p)
        if no_value.any():
            inside = np.stack([cast_into_box(x, lo, hi, np.float64, p.open_lo, p.open_hi) for x in xs])
            report[no_value] = inside[no_value]
            method += f" (inputs the box holds no {np.dtype(dtype).name} value for, fed rounded to nearest)"
        feed = report.astype(dtype).astype(np.float64)
        ys = self.model.run_onnx(feed)
        hit = p.violations(ys).min(axis=1, initial=np.inf) <= 0
        hit &= np.array([bool(h) and p.holds_exactly(report[k], ys[k])
                         for k, h in enumerate(hit)], dtype=bool)  # the float64 screen, checked exactly
        if hit.any():
            i = int(np.argmax(hit))
            raise Found(report[i], ys[i], method)
        self.details["unconfirmed"] += len(xs)

    def check_lowering(self, p: VnnlibProperty) -> None:
        """The IR must compute what onnxruntime computes (else a proof would be about another
        function): compared at the box centre and at :data:`LOWERING_POINTS` random points of the
        box (a function that agrees at the centre alone is caught there: a review's model that
        onnxruntime evaluated as a layer norm agreed with it at the centre by construction)."""
        dtype = self.model.onnx_input_dtype()
        centre = (p.input_lo + p.input_hi) / 2
        spread = np.random.default_rng(0).random((LOWERING_POINTS, centre.size))
        points = np.stack([cast_into_box(x, p.input_lo, p.input_hi, dtype)
                           for x in [centre, *(p.input_lo + spread * (p.input_hi - p.input_lo))]])
        ir = self.model.forward(torch.as_tensor(points, dtype=torch.float64)).numpy()
        ort = self.model.run_onnx(points)
        if np.isnan(ort[0]).any():
            j = int(np.argmax(np.isnan(ort[0])))
            raise DualgraphError(f"'{self.model.path.name}' outputs NaN at the box centre (output {j}, in "
                                 "onnxruntime): NaN weights, or an op such as Log or Sqrt of a negative value; "
                                 "check the model")
        diff = np.where(np.isnan(ir) & np.isnan(ort), 0.0, np.abs(ir - ort))
        tol = 1e-3 * (1 + np.abs(ort))
        self.details["ir_vs_onnxruntime"] = float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0))
        if not np.all(diff <= tol):  # (NaN on one side only fails too)
            k, j = np.unravel_index(int(np.argmax(np.nan_to_num(diff - tol, nan=np.inf))), diff.shape)
            where = "the box centre" if k == 0 else "a point of the box"
            raise DualgraphError(f"the lowered model disagrees with onnxruntime on '{self.model.path.name}' at {where} "
                                 f"(output {j}: {ir[k, j]!r} vs {ort[k, j]!r}); refusing to verify a different "
                                 "function -- please report this frontend bug")
        # the centre is a free candidate counterexample
        if p.violations(ort[:1]).min(initial=np.inf) <= 0:
            self.confirm(p, points[:1], "box centre")


def _aimed_inside(p: VnnlibProperty) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The unsafe conjunctions ``C y <= d`` as an attack aims at them: a hair inside
    (``d - 1e-5 (1 + |d|)``), so that onnxruntime agrees on a hit found in the IR."""
    return [(torch.tensor(c.C), torch.tensor(c.d - 1e-5 * (1 + np.abs(c.d)))) for c in p.unsafe]


def cast_into_box(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, dtype: np.dtype,
                  open_lo: np.ndarray | None = None, open_hi: np.ndarray | None = None) -> np.ndarray:
    """``x`` in the model's input precision, nudged by one ulp back into ``[lo, hi]``
    where rounding pushed it out (values stay as close to ``x`` as the precision allows),
    and off a strict bound it lies on (``open_lo``/``open_hi``: ``X_i > lo_i`` / ``< hi_i``)."""
    x = np.clip(np.asarray(x, dtype=np.float64).ravel(), lo, hi)
    c = x.astype(dtype)
    below, above = c.astype(np.float64) < lo, c.astype(np.float64) > hi
    if open_lo is not None:
        below |= open_lo & (c.astype(np.float64) <= lo)
    if open_hi is not None:
        above |= open_hi & (c.astype(np.float64) >= hi)
    c[below] = np.nextafter(c[below], np.asarray(np.inf, dtype))
    c[above] = np.nextafter(c[above], np.asarray(-np.inf, dtype))
    return c.astype(np.float64)


def on_open_bound(points: np.ndarray, p: VnnlibProperty) -> np.ndarray:
    """``[B, n]``: the coordinates on or past a strict input bound of ``p`` (an open interval
    that holds no value of the input precision leaves its candidates there)."""
    out = np.zeros(points.shape, dtype=bool)
    if p.open_lo is not None:
        out |= p.open_lo & (points <= p.input_lo)
    if p.open_hi is not None:
        out |= p.open_hi & (points >= p.input_hi)
    return out
