"""Floating-point soundness: a rigorous rounding-error allowance for every bound.

A certificate must hold for the network **in exact arithmetic and as it is evaluated in
its own precision** (float32 for float32 weights), while the bounds themselves are
computed in floating point (float32 by default). One argument covers both.

*The family of networks.* Node ``k`` computes ``y = A_k z + b_k`` (affine) or ``y = f(z)``
(an activation). Evaluated with unit roundoff ``u_e`` it returns ``y + eta_k`` with
``|eta_k| <= gamma(n_e, u_e) T_k``: ``T_k = |A_k| m_z + |b_k|`` bounds the magnitudes of
the terms summed (``m_z >= |z|``), ``n_e`` is the most nonzero terms of one sum of its
evaluation and ``gamma(n, u) = n u / (1 - n u)`` (Higham, *Accuracy and Stability of
Numerical Algorithms*, Section 3.1, valid for any summation order, with or without FMA;
zero terms add no error, so ``n`` counts nonzero ones). Bounds valid for every "exact
network plus any ``|eta_k| <= eta_max_k`` at every node" hold for the exact network
(``eta = 0``) and for the evaluated one. ``m_v >= |v|`` over this family is propagated
forward (``m_out = |A| m + |b| + eta_max``; through an activation, ``|a| m + |b|`` of its
relaxation, which brackets it), and replaced by the value's own bounds where those are smaller.

*A dual step in floating point* (the final bound ``J``; :meth:`RoundingAllowance.slack`).
An affine step computes ``lam_in = A^T lam`` (sums of ``n_d`` products) and the offset
``lam . b``. For the dual variables ``lam`` *as computed*, ``lam . y = (A^T lam) . z +
lam . b + lam . eta``, and the rounding ``e`` of ``A^T lam`` changes the bound by at most
``|e| . m_z <= gamma(n_d) |lam| . |A| m_z``. So the bound computed from the computed
``lam`` is valid after subtracting ``|lam| . W_k`` with

    W_k = (gamma(n_d + L, u_c) + gamma(n_e, u_e)) T_k

(``L`` terms add up to ``J``: their rounding is folded into ``n_d + L``). The input term
and the sums at fan-outs get the same treatment. This uses the actual ``|lam|``: tight.

*Activations* are folded into their relaxation: after the bounds ``[l, u]`` of a value
are final, the offsets of each relaxation that reads it are moved outward by
``(gamma(n_o + 8 + L, u_c) + gamma(n_e, u_e)) (|a| m + 2 max(|b_lo|, |b_up|))`` on every unit
whose slope is not exactly 0 or 1 or whose offsets are nonzero (a stable ReLU unit is
exact). That covers the products ``a * lam``, the offset dot products (``n_o`` units with
an offset), the rounding of the relaxation's own slope and offsets, and the activation's
evaluation, on every bound path at once. ``|a|`` includes the range of free slopes that share
these offsets (a ReLU's under ``alpha``); free lines with offsets of their own
(:class:`~dualgraph.dual_registry.FreeLines`) pay ``delta`` plus ``(gamma(2 n_o + 10 + L, u_c) +
gamma(n_e, u_e)) (|a| m + 2 |b(a)|)`` at the slope ``a`` and offset ``b(a)`` chosen, so the
fixed lines' allowance is CROWN's.

*Intermediate bounds* computed backward are rows like any other (one per unit and sign):
each dual step adds its own ``|lam| . W_k`` to the rows' offsets, on dense rows and on
patches alike (``Batch.per_row``), and the bounds are then only *adopted*
(:meth:`RoundingAllowance.adopt`: the relaxations that read them rounded outward). This
costs one dot product per row and step, and it is tight: a bound propagated forward with
absolute weights would grow with the product of the layers' absolute weights, which on deep
networks is many orders of magnitude above ``|lam_k|``. The pruning box (a bound of the rest
of a pass by the box of one layer's bounds) adds the rounding of its own dot products to its
radius where it is formed (:meth:`RoundingAllowance.box_gamma`). The forward path
(Appendix F) pushes columns instead of rows; its ``eps`` uses the magnitudes of the
linearised network it evaluates, propagated forward with absolute weights (``eps_out = |A|
eps_in + W``; rule :meth:`DualRule.abs_linear`), and the final reduction over columns
(:meth:`RoundingAllowance.widen_forward`).

*Underflow.* Higham's model holds for results of magnitude at least ``sigma``, the smallest
normal number (2^-126 in float32). Below it a result is rounded to a subnormal, or flushed to
zero by a kernel that sets flush-to-zero, so every operation may err by less than ``sigma`` on
top of its relative error (:func:`underflow`). The evaluation of a node with sums of ``n_e``
terms (``2 n_e`` operations) therefore adds ``(2 n_e + 1) sigma_e`` per unit to ``eta_max``
(the one more: a subnormal result read as zero by the next op under denormals-are-zero), in
``W``, in ``m`` and in the relaxations' outward offsets. An *operand* read as zero errs by its
own size times the other factor's: a subnormal input coordinate by less than ``sigma_e`` (``W``
of the input term adds ``sigma_e`` per unit), a subnormal weight by less than ``sigma_e m_k`` --
where any constant of the graph is subnormal, every affine node adds ``sigma_e ||m_in||_1`` per
unit. The dual's own arithmetic does not scale with ``lam``: an entry of ``lam_in`` errs by at
most ``2 (n_d + 6) sigma_c`` more (its sum and the relaxations' products), which moves the
bound by that times ``m_z``, each offset dot product by ``2 (units + L) sigma_c``, and an entry
of ``lam`` read as zero by ``sigma_c`` times its terms (``sigma_c ||T||_1``): every step takes
a constant off every row (:meth:`RoundingAllowance.step_constant`), the largest over the
examples, and so does a pruning cut (:meth:`RoundingAllowance.cut_constant`). These terms
matter only for networks whose values or margins are within a few orders of magnitude of
``sigma``, where the relative model alone certified what the evaluated network violates.

*Overflow.* None of this holds once the evaluation can overflow (an infinity, then NaN, where
the exact network is finite): an example whose input, or any of whose magnitudes ``T`` or ``m``,
reaches half the evaluation precision's largest number gets no certificate (:meth:`
RoundingAllowance.may_overflow`; the final bound is ``-inf`` there). Where the evaluation
computes values ``T`` does not show -- a Gemm's product before its ``alpha``, a mean's sum
before its division (:meth:`~dualgraph.dual_registry.DualRule.evaluation_gain`), the ops a pass
folded into a node (the product of the folded factors' gains, ``FoldedRounding.gain``, at most
:data:`~dualgraph.ir.FOLD_GAIN`: the passes fold nothing larger) -- ``T``, ``m`` and the node's
input are checked at the product of those gains, and the node's underflow term grows by it
(each folded op's result off by ``2 sigma_e``, seen through ``|A|``).

*Approximate activations.* onnxruntime evaluates float32 ``Sigmoid`` with a vectorised
approximation whose error is absolute (about 1.7e-7, also where the value is near 0), not a
few ulps: a relaxation declares such an error as ``eval_absolute`` (in units of ``u_e``,
:meth:`~dualgraph.op_registry.OpDefinition.relaxation`), added to its outward offsets.
``tests/test_float_soundness.py`` measures onnxruntime's errors against every declaration.

*What is evaluated.* ``u_e`` is the coarsest precision the network computes in: its input's,
or a float ``Cast``'s target (the IR drops the Cast; ``Graph.meta[EVALUATED_IN]``), and with
mixed precisions every evaluation counts one term more (an absorbed Cast rounds the input once).
A node a pass made from several ops (a folded BatchNormalization or input normalisation)
carries a :class:`~dualgraph.ir.FoldedRounding` note: the ops' extra roundings and the
magnitudes their cancellations hide, added to its ``n_e`` and ``T``.

*Fused scales.* onnxruntime folds a constant Mul or Div next to a MatMul or Gemm into its
result (a FusedMatMul's ``alpha``, applied after the sum), and one after a Conv (or a
BatchNormalization) into its weights. Where the passes kept such a scale apart (a factor past
``FOLD_GAIN``), the evaluated sum is the node's scaled by up to its :func:`fused_scale_gain`
``G`` either way, and the folded weights ``W s`` may underflow (each off by ``< sigma_e``, times
``|x|``): the node is charged as a fold of gain ``G`` (underflow times ``G``, overflow at the
limit over ``G``) with ``sigma_e sum m_in`` more underflow.

*Fused sums.* onnxruntime may evaluate ``P + s`` as one sum when ``P`` is a Conv, MatMul or
Gemm whose only user is the Add (its Conv with a "Sum" input, ``MatMulAddFusion`` into a
Gemm whose C is ``s``): the partial sums then carry ``|s|``, so the error is
``gamma(n_P + 1)(T_P + |s|)``, not ``gamma(n_P) T_P`` and one rounding of ``P + s``. ``s`` may
be a variable (a residual) or a constant (a Dense layer's bias written as MatMul + Add), either
operand, and ops that only move entries (Transpose, Reshape: an NHWC model's layout) or scale
by a constant may stand between ``P`` and the Add, which onnxruntime takes out of the way first
(a scale folded into the Conv's weights, *Fused scales*; ``T_P`` is carried through). Such an
Add or Sub (:func:`fused_sum_producers`) is charged ``n_e`` and ``T`` of its producers besides
its own; an Add so fused may itself be fused into the next one.

``SAFETY = 1.01`` covers the rounding of the allowance itself and the second-order
difference between computed and exact dual variables (each ``n u`` is kept below
0.005). The input box is rounded outward when it is formed
(:func:`dualgraph.input_sets.outward`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import weakref
from typing import Iterator

import torch

from .dual_graph import FAN_OUT_SUM, INPUT_SET
from .dual_registry import AffineRule, Bounds, ElementwiseRule, Relaxation, dual_rule
from .errors import DualgraphError, InternalError
from .input_sets import InputSet
from .interpreter import naming_node
from .ir import EVALUATED_IN, FOLD_GAIN, FoldedRounding, Graph, Node, Value, fold_gain
from .linalg import batched_dot, take_examples

SAFETY = 1.01
"""Covers the rounding of the allowance's own arithmetic and second-order terms (see the
module docstring; :func:`gamma` refuses ``n u >= 0.005``)."""


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps / 2`` of a floating-point dtype (2^-24 for float32, 2^-53 for float64)."""
    return torch.finfo(dtype).eps / 2


def underflow(dtype: torch.dtype) -> float:
    """``sigma``, the smallest normal number of a floating-point dtype (2^-126 for float32):
    below it an operation's result may be subnormal or flushed to zero, an absolute error of
    less than ``sigma`` besides the relative one (module docstring, *Underflow*)."""
    return torch.finfo(dtype).tiny


def gamma(n: int, u: float, evaluated: bool = False) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: the relative error bound of a sum of ``n`` products
    (``evaluated``: a sum of the network's own evaluation, at its precision ``u_e``; else of the
    bound's arithmetic). Past ``n u = 0.005`` (what :data:`SAFETY` covers) a one-line error."""
    nu = n * u
    if nu >= 0.005:  # a model's size, not a bug
        hint = ("the network's own precision cannot be analysed at this size; export it in float64"
                if evaluated else "compute the bounds in float64 (--dtype float64, or dtype=torch.float64)")
        raise DualgraphError(f"sums of {n} terms are too long for a rounding analysis at unit roundoff {u:g} "
                             f"(n u must stay below 0.005): {hint}")
    return nu / (1 - nu)


class RoundingAllowance:
    """The rounding allowance of ``graph``'s bounds on one input set (module docstring).

    ``bounds`` is the scheduler's bounds dictionary, filled as bounds are computed: the
    analysis of a node reads the bounds of its inputs, which the scheduler's topological
    order has finalised (through :meth:`adopt`) before any later bound needs them.
    Results are memoised per node and value; :meth:`take` gives a view of some examples.
    """

    def __init__(self, graph: Graph, input_set: InputSet, bounds: dict[Value, Bounds], config) -> None:
        self.graph, self.bounds, self.config = graph, bounds, config
        # with random projections the bounds are estimates, not proofs: no allowance to pay for
        self.enabled = getattr(config, "rounding_allowance", True) and getattr(config, "proj", None) is None
        self.u_c = unit_roundoff(input_set.center.dtype)
        # the network evaluates in the coarsest of its precisions (a float Cast is dropped at
        # import, so the input's dtype alone can be finer); with several precisions a node may
        # round each input once more (an absorbed Cast): one term more per evaluation
        precisions = {graph.inputs[0].dtype, *graph.meta.get(EVALUATED_IN, ())}
        self.u_e = max([unit_roundoff(d) for d in precisions] + [self.u_c])
        self.cast_terms = 1 if len(precisions) > 1 else 0
        self.sigma_c = underflow(input_set.center.dtype)
        self.sigma_e = max([underflow(d) for d in precisions] + [self.sigma_c])
        # half the largest number of the coarsest precision: beyond it an evaluation may overflow
        self.overflow_limit = min(torch.finfo(d).max for d in [*precisions, input_set.center.dtype]) / 2
        self._may_overflow: list[tuple[str, torch.Tensor]] = []  # (node, its examples' flags), shared by views
        self._subnormal_constants = _has_subnormal_constants(graph, self.sigma_e)
        self.terms = len(graph.nodes) + 4  # L: one offset per dual node, the input term, the allowance
        self._pick = lambda t: t
        self._picked: dict = {}  # step weights of this view's examples, per node (a pass reads them every step)
        self._m: dict[Value, torch.Tensor] = {}      # |v| over the family
        self._w: dict = {}                           # node -> W per output (None: exact step)
        self._constant: dict = {}                    # node or fan-out value -> its step's underflow constant
        self._m_lin: dict[Value, torch.Tensor] = {}  # |v| over the linearised network (forward path)
        self._eps_fwd: dict[Value, torch.Tensor] = {}
        self._noise: dict = {}                       # node -> (gamma of its evaluation, T per output, underflow)
        self._n_eval: dict = {}                      # node -> its n_e (a fused Add takes its producers')
        self._tightened: set = set()                 # values whose m already uses their bounds
        self._position = {n: i for i, n in enumerate(graph.nodes)}  # topological order, built once
        self._units = sum(v.numel for v in graph.inputs) + sum(v.numel for n in graph.nodes for v in n.outputs)
        x = graph.inputs[0]
        lo, hi = (t.detach() for t in input_set.bounding_box())
        self._columns = x.numel  # columns the forward path reduces at a bounded value (grows per activation)
        self._m[x] = self._m_lin[x] = torch.maximum(lo.abs(), hi.abs())
        # the input term lam.c - rho(lam): dot products over the input's units
        reach = input_set.center.detach().abs() + (hi - lo) / 2
        # ... and a subnormal input coordinate read as zero by the evaluation (denormals-are-zero)
        self._w_input = SAFETY * (gamma(x.numel + self.terms, self.u_c) * reach + self.sigma_e)
        self._eps_fwd[x] = self._w_input
        # lam . c and |lam| . r: two sums over the input's units, each operation off by < sigma,
        # and entries of lam read as zero, each off by < sigma times |c| + r
        self._input_constant = SAFETY * self.sigma_c * (4 * (x.numel + self.terms) + _largest_sum(reach))
        # the forward path's columns are multiplied by at most m_x (input) or 1 (gap columns)
        self._column_mass = _largest_sum(self._m[x]) + x.numel
        self._note_fan_out(x)
        flags = _reaches(self._m[x], self.overflow_limit)  # an input the evaluation cannot hold
        if bool(flags.any()):
            self._may_overflow.append((x.name, flags))

    # ---- the final bound: one allowance per row and dual step ------------------------------------
    def slack(self, dual_node, lams: list) -> torch.Tensor | float:
        """``sum_o |lam_o| . W_o`` for the dual variables ``lams`` at the outputs of the primal
        node behind ``dual_node`` (a fan-out ``Sum``: at the summed value; ``InputSet``: at the
        input), ``[B, m]``: subtract from the step's lower offset, add to its upper one."""
        if not self.enabled:
            return 0.0
        total: torch.Tensor | float = self.step_constant(dual_node)
        for lam, w in zip(lams, self.step_weights(dual_node, len(lams))):
            if lam is not None and w is not None:
                total = total + batched_dot(lam.detach().abs(), w.to(lam.dtype))
        return total

    def step_constant(self, dual_node) -> float:
        """What underflow in ``dual_node``'s own arithmetic may cost any row's bound (module
        docstring, *Underflow*): subtract from the step's lower offset, add to its upper one."""
        if not self.enabled:
            return 0.0
        if dual_node.op == INPUT_SET:
            return self._input_constant
        if dual_node.op == FAN_OUT_SUM:
            v = dual_node.meta["primal_value"]
            self._compute(v)
            return self._constant[v]
        node = dual_node.meta["primal"]
        self._compute(node.outputs[0])
        return self._constant[node]

    def cut_constant(self) -> float:
        """What underflow may cost a pruning cut's bound ``lam . centre -/+ |lam| . radius``
        (two sums over at most every unit of the graph; module docstring, *Underflow*)."""
        if not self.enabled:
            return 0.0
        return SAFETY * 4 * (self._units + self.terms) * self.sigma_c

    def box_absolute(self) -> float:
        """What underflow may cost each unit of a pruning box's centre and radius (a few
        operations each): added to the radius."""
        return SAFETY * 8 * self.sigma_c if self.enabled else 0.0

    def may_overflow(self) -> torch.Tensor | None:
        """``[B]`` (or ``[1]``) bool: the examples whose evaluation may overflow at some node
        analysed so far (module docstring, *Overflow*); None with the allowance off."""
        if not self.enabled or not self._may_overflow:
            return None
        flags = self._may_overflow[0][1]
        for _, f in self._may_overflow[1:]:
            flags = flags | f  # [B] or [1]: broadcasts
        return self._pick(flags.view(-1, 1)).view(-1)

    def overflow_node(self) -> str | None:
        """The first node analysed whose evaluation may overflow (for a message), or None."""
        return self._may_overflow[0][0] if self._may_overflow else None

    def step_weights(self, dual_node, count: int) -> list[torch.Tensor | None]:
        """``W`` ``[B, *unit]`` (None: an exact step) for each of the ``count`` dual variables
        ``dual_node`` reads: the allowance of a row is ``sum |lam| . W`` (:meth:`slack`)."""
        if dual_node.op == FAN_OUT_SUM:
            return [self._fanout_weight(dual_node.meta["primal_value"])] * count
        if dual_node.op == INPUT_SET:
            return self._picked_once(INPUT_SET, lambda: [self._pick(self._w_input)])
        return self._weights(dual_node.meta["primal"])

    def take(self, examples: torch.Tensor) -> RoundingAllowance:
        """A view of the given examples (an index tensor into the batch) sharing the memos."""
        view = copy.copy(self)
        outer = self._pick
        view._pick = lambda t: take_examples(outer(t), examples)
        view._picked = {}
        return view

    # ---- intermediate bounds: one vector per value ------------------------------------------------
    def adopt(self, v: Value, b: Bounds) -> Bounds:
        """Bounds of ``v`` that are already sound (rows with their own allowance, or a
        branch-and-bound domain's clamped copy of sound bounds), with the relaxations that
        read ``v`` rounded outward on them."""
        if not self.enabled:
            return b
        self._compute(v)
        return self._finish(v, b, torch.zeros_like(b.lower[:1]))

    def widen_forward(self, v: Value, b: Bounds) -> Bounds:
        """Bounds formed by the forward path, moved out by their own ``eps`` and the rounding
        of the final reduction over the pushed columns; the relaxations that read them rounded
        outward on them."""
        if not self.enabled:
            return b
        return self._finish(v, b, self.forward_allowance(v))

    def forward_allowance(self, v: Value) -> torch.Tensor:
        """What :meth:`widen_forward` moves ``v``'s bounds out by (before this view's example
        pick), ``[B or 1, *unit]``: the propagated ``eps`` and the reduction over the columns."""
        self._compute_forward(v)
        reduction = SAFETY * (gamma(self._columns + self.terms, self.u_c) * self._m_lin[v]
                              + 4 * (self._columns + self.terms) * self.sigma_c)
        return self._eps_fwd[v] + reduction

    def _finish(self, v: Value, b: Bounds, eps: torch.Tensor) -> Bounds:
        e = self._pick(eps).to(b.lower.dtype)
        out = Bounds(b.lower - e, b.upper + e)
        for node in dict.fromkeys(v.users):  # each consumer once
            rule = dual_rule(node)
            if isinstance(rule, ElementwiseRule):
                rule.set_relaxation(node, out, self.config, self._outward(node, rule, out))
        return out

    def _outward(self, node, rule: ElementwiseRule, b: Bounds) -> Relaxation:
        """The relaxation of ``node`` on ``b`` with its offsets moved out by its rounding:
        ``(gamma(n_o + 8 + L, u_c) + gamma(n_e, u_e)) (|a| m + 2 |b|)`` on the units whose
        step is not exact (slope not 0 or 1, or an offset); ``n_o``: units with an offset."""
        r = rule.relaxation(node, b, self.config)
        a, b_abs = r.magnitudes()
        with_offset = b_abs != 0
        rounds = with_offset | ((r.a_lo != 0) & (r.a_lo != 1))
        if r.a_up is not r.a_lo:
            rounds |= (r.a_up != 0) & (r.a_up != 1)
        n_off = int(with_offset.flatten(1).sum(1).max()) if with_offset.numel() else 0
        with naming_node(node, "rounding analysis"):
            n_eval = rule.eval_length(node, [b], self.config) + self.cast_terms
        coef = SAFETY * (gamma(n_off + 8 + self.terms, self.u_c) + gamma(n_eval, self.u_e, evaluated=True))
        underflow = SAFETY * ((2 * n_eval + 1) * self.sigma_e + rule.eval_absolute(node) * self.u_e
                              + 8 * self.sigma_c)
        m = torch.maximum(b.lower.abs(), b.upper.abs()).detach()
        delta = torch.where(rounds, coef * (a * m + 2 * b_abs) + underflow, 0.0)
        # free lines with offsets of their own (FreeLines): chosen, their offsets enter as
        # corrections lam (b(a) - b) of the fixed lines' dot product, twice the terms and a
        # subtraction each, and they pay for their own slope and offset on top of delta
        free_coef = SAFETY * (gamma(2 * n_off + 2 + 8 + self.terms, self.u_c) + gamma(n_eval, self.u_e, evaluated=True))
        return r.moved_out(delta, free_coef, m)

    # ---- the forward passes over magnitudes -------------------------------------------------------
    # Not under no_grad: a relaxation computed here is cached on its bounds and reused by the
    # dual pass, which must see its graph when gradients are wanted. Results are detached.
    def _compute(self, v: Value) -> None:
        if v not in self._m:
            for node in self._pending_producers(v, self._m):
                self._run_node(node)

    def _compute_forward(self, v: Value) -> None:
        self._compute(v)
        if v not in self._eps_fwd:
            for node in self._pending_producers(v, self._eps_fwd):
                self._run_node_forward(node)

    def _pending_producers(self, v: Value, done: dict) -> list:
        """Producers of ``v`` and of its ancestors not yet in ``done``, in topological order."""
        order: list = []
        seen: set = set()
        stack = [v]
        while stack:
            w = stack.pop()
            node = w.producer
            if w in done or node is None or node in seen:
                continue
            seen.add(node)
            order.append(node)
            stack.extend(i for i in node.var_inputs if i not in done)
        return sorted(order, key=self._position.__getitem__)

    def _weights(self, node) -> list[torch.Tensor | None]:
        def picked():
            if node not in self._w:
                self._compute(node.outputs[0])
            return [None if w is None else self._pick(w) for w in self._w[node]]
        return self._picked_once(node, picked)  # W of a node is computed once (memo shared by every view)

    def _picked_once(self, key, make, final: bool = True):
        """``make()`` (this view's examples of a memoised tensor), made once per view when
        ``final``: a pass reads the same weights at every step of an ascent."""
        if key in self._picked:
            return self._picked[key]
        out = make()
        if final:
            self._picked[key] = out
        return out

    def _fanout_weight(self, v: Value) -> torch.Tensor:
        """The rounding of the dual's sum over the consumers of ``v``, ``[B, *unit]``."""
        self._compute(v)
        return self._picked_once(("fan-out", v), lambda: self._pick(SAFETY * gamma(len(v.users), self.u_c)
                                                                    * self._magnitude(v)), v in self._tightened)

    def _note_fan_out(self, v: Value) -> None:
        """The underflow constant of the dual's sum over the consumers of ``v`` (each entry
        of the sum off by ``< 2 users sigma_c``, times ``m_v``), where it has several."""
        if len(v.users) > 1:
            self._constant[v] = SAFETY * 2 * self.sigma_c * len(v.users) * _largest_sum(self._m[v])

    def _magnitude(self, v: Value) -> torch.Tensor:
        """``m_v``, tightened (once) by the value's own sound, hence family-wide, bounds."""
        b = self.bounds.get(v)
        if b is not None and v not in self._tightened:
            self._m[v] = torch.minimum(self._m[v], torch.maximum(b.lower.abs(), b.upper.abs()).detach())
            self._tightened.add(v)
        return self._m[v]

    def evaluation_error(self, node) -> torch.Tensor | float:
        """``eta_max`` of ``node``'s first output (module docstring): how far the network as
        evaluated in its own precision may be from ``node`` applied exactly to its inputs as
        evaluated, ``SAFETY (gamma(n_e, u_e) T + (2 n_e + 1) sigma_e)`` ``[B, *unit]`` (0.0 with
        the allowance off)."""
        if not self.enabled:
            return 0.0
        self._compute(node.outputs[0])
        evaluation, terms, underflow = self._noise[node]
        return self._pick(SAFETY * (evaluation * terms[0] + underflow))

    def box_gamma(self, v: Value) -> float:
        """Relative rounding of the pruning box's dot products over the units of ``v`` (the
        scheduler adds ``gamma |lam a| . m`` to the box's radius, :meth:`magnitude`)."""
        return SAFETY * gamma(v.numel + self.terms, self.u_c) if self.enabled else 0.0

    def magnitude(self, v: Value) -> torch.Tensor:
        """``m_v >= |v|`` over the family (for a value with final bounds: ``max(|l|, |u|)`` or less)."""
        self._compute(v)  # final once the value's bounds have tightened it
        return self._picked_once(("magnitude", v), lambda: self._pick(self._magnitude(v)), v in self._tightened)

    def _inputs(self, node):
        rule = dual_rule(node)
        ins = node.var_inputs
        if not ins:
            raise InternalError(f"node '{node.name}' has no variable input but produces a variable value")
        in_bounds = [self.bounds.get(v) for v in ins] if rule.bounds_needed(node) else []
        if any(b is None for b in in_bounds):
            raise InternalError(f"rounding allowance of node '{node.name}' asked before its input bounds exist")
        return rule, ins, in_bounds

    def _run_node(self, node) -> None:
        """``m``, ``W`` and the underflow constants of the node's outputs (what the backward
        paths need)."""
        rule, ins, in_bounds = self._inputs(node)
        cfg = self.config
        m_in = [self._magnitude(v) for v in ins]
        folded = isinstance(rule, ElementwiseRule)  # its rounding is in the (outward) relaxation
        note = FoldedRounding.of(node)  # a node standing for several evaluated ops (a pass's fold)
        with naming_node(node, "rounding analysis"):
            n_eval = 0 if folded else rule.eval_length(node, in_bounds, cfg) + self.cast_terms + note.ops
            n_dual = 0 if folded else rule.dual_length(node, in_bounds, cfg)
            terms = _add(_detach(rule.abs_linear(node, m_in, in_bounds, cfg)),
                         _detach(rule.constant_magnitude(node, m_in, in_bounds, cfg)))
            if note.ops:
                terms[0] = terms[0] + note.magnitude.to(terms[0])
            m_out = _detach(rule.output_magnitude(node, m_in, in_bounds, cfg, terms))
        for producer, path in fused_sum_producers(node):  # one sum with its producers' (module docstring)
            n_eval += self._n_eval[producer]
            carried = self._noise[producer][1][0]
            for step in path:  # the producer's T where the Add reads it
                with naming_node(step, "rounding analysis"):
                    carried = _detach(dual_rule(step).abs_linear(step, [carried], [], cfg))[0]
            terms = [t + carried.reshape(carried.shape[0], *node.output.unit_shape) for t in terms]
        self._n_eval[node] = n_eval
        evaluation = gamma(n_eval, self.u_e, evaluated=True)                # the network's own rounding
        underflow = (2 * n_eval + 1) * self.sigma_e if n_eval else 0.0     # ... below sigma_e, per unit
        reach = sum(map(_largest_sum, m_in))
        if n_eval and self._subnormal_constants:  # a subnormal weight read as zero: < sigma_e m_k
            underflow += self.sigma_e * reach
        # values the evaluation computes that T does not show: before a Gemm's alpha or a mean's
        # division, between the ops a pass folded into this node (FoldedRounding.gain, at most
        # ir.FOLD_GAIN), with their errors amplified as much
        gain = rule.evaluation_gain(node) * note.gain
        scaled, scales = fused_scale_gain(node)
        if scaled > 1 and n_eval:  # weights folded with each scale may underflow: each < sigma_e, times |x|
            underflow = underflow + scales * self.sigma_e * reach
            gain *= scaled
        if gain > 1 and n_eval:
            underflow = underflow * gain
            if note.ops:  # each folded op's result off by < 2 sigma_e, seen through |A| or directly
                with naming_node(node, "rounding analysis"):
                    spread = _detach(rule.abs_linear(node, [torch.ones_like(m) for m in m_in], in_bounds, cfg))[0]
                underflow = underflow + 2 * note.ops * gain * self.sigma_e * (spread + 1)
        dual = gamma(n_dual + self.terms, self.u_c) if n_dual else 0.0     # this dual step's rounding
        self._noise[node] = (evaluation, terms, underflow)
        outputs = sum(o.numel for o in node.outputs)
        self._constant[node] = SAFETY * self.sigma_c * (2 * (n_dual + 6) * reach + 2 * (outputs + self.terms)
                                                        + sum(map(_largest_sum, terms)))
        for t, m in zip(terms, m_out):
            limit = self.overflow_limit / gain  # the magnitudes at the gain, without a scaled copy
            flags = _reaches(t, limit) | _reaches(m, limit)
            if note.ops:  # the folded ops read the node's input: up to gain m_in plus shifts of FOLD_GAIN
                flags = flags | _reaches(gain * max(map(_largest_max, m_in)) + FOLD_GAIN, self.overflow_limit)
            if bool(flags.any()):
                self._may_overflow.append((node.name, flags))
        weights = []
        for out, t, m in zip(node.outputs, terms, m_out):
            self._m[out] = m + evaluation * t + underflow if evaluation else m
            weights.append(SAFETY * ((dual + evaluation) * t + underflow) if dual or evaluation else None)
            self._note_fan_out(out)
        self._w[node] = weights

    def _run_node_forward(self, node) -> None:
        """``eps_fwd = |A| eps_in + (rounding of the columns pushed through node) + noise``."""
        rule, ins, in_bounds = self._inputs(node)
        cfg = self.config
        lin_in = [self._m_lin[v] for v in ins]
        with naming_node(node, "rounding analysis"):
            n_eval = rule.eval_length(node, in_bounds, cfg)
            spread, carried = _abs_pair(rule, node, lin_in, [self._eps_fwd[v] for v in ins], in_bounds, cfg)
            terms_lin = _add(spread, _detach(rule.constant_magnitude(node, lin_in, in_bounds, cfg)))
        forward = gamma(n_eval + 2 + self.terms, self.u_c)  # columns pushed through the node
        # ... and their entries' underflow, each times at most the column's multiplier
        pushed = 2 * (n_eval + 2 + self.terms) * self.sigma_c * self._column_mass
        evaluation, terms, underflow = self._noise[node]
        for out, t, t_lin, e in zip(node.outputs, terms, terms_lin, carried):
            noise = evaluation * t + underflow
            self._m_lin[out] = t_lin + noise
            self._eps_fwd[out] = e + SAFETY * (forward * t_lin + pushed + noise)
        if rule.bounds_needed(node):
            self._columns += node.output.numel  # the forward path may add a gap column per unit
            self._column_mass += node.output.numel


def fused_sum_producers(node: Node) -> list[tuple[Node, list[Node]]]:
    """The producers whose sums an Add or Sub ``node`` may be evaluated in (module docstring,
    *Fused sums*; :attr:`DualRule.adds_into_producer_sum`), each with the ops between it and
    the Add (first to last): for every variable operand with as many entries as the Add's
    output (not broadcast), the node computing it behind any ops that only rearrange entries
    (:attr:`DualRule.rearranges_entries`: onnxruntime's layout passes cancel or move them) or
    scale by a constant (folded into a Conv's weights first, :func:`fused_scale_gain`),
    each value on the way read by nothing else, if that node is a Conv, MatMul or Gemm
    (:attr:`DualRule.sums_into_next_add`) or itself such an Add with producers of its own
    (whose charge includes theirs). The other operand may be a variable or a constant."""
    if not dual_rule(node).adds_into_producer_sum:
        return []
    found = []
    for v in dict.fromkeys(node.var_inputs):
        if v.numel != node.output.numel:
            continue
        v, path = _back_through(v, _moves_or_scales)
        producer = v.producer
        if producer is None or len(v.users) != 1:
            continue
        rule = dual_rule(producer)
        if rule.sums_into_next_add or (rule.adds_into_producer_sum and fused_sum_producers(producer)):
            found.append((producer, path[::-1]))
    return found


def fused_scale_gain(node: Node) -> tuple[float, int]:
    """How far onnxruntime's folding of neighbouring constant scales into ``node`` (a Conv,
    MatMul or Gemm: :attr:`DualRule.sums_into_next_add`) may move the values its evaluation
    computes from the node's own magnitudes (module docstring, *Fused scales*), and how many
    scales it may fold: the product of :func:`~dualgraph.ir.fold_gain` over the factors
    (:meth:`DualRule.constant_factor`) of the chain of scales after the node and of those
    before each of its inputs, through ops that only rearrange entries (a Transpose becomes
    a FusedMatMul's ``transA``), each value on the way read by one node; ``(1, 0)`` if none."""
    if not dual_rule(node).sums_into_next_add:
        return 1.0, 0
    chain = [n for v in dict.fromkeys(node.var_inputs) for n in _back_through(v, _moves_or_scales)[1]]
    out = node.outputs[0]
    while len(out.users) == 1 and _one_in_one_out(out.users[0]) and _moves_or_scales(out.users[0]):
        chain.append(out.users[0])
        out = out.users[0].outputs[0]
    factors = [f for f in (dual_rule(n).constant_factor(n) for n in chain) if f is not None]
    return math.prod((fold_gain(f.detach().double()) for f in factors), start=1.0), len(factors)


def _moves_or_scales(n: Node) -> bool:
    """Whether onnxruntime may take ``n`` out of a fusion's way: it only rearranges entries, or
    scales by a constant (folded into the neighbouring Conv's weights or MatMul's alpha)."""
    return dual_rule(n).rearranges_entries or dual_rule(n).constant_factor(n) is not None


def _one_in_one_out(n: Node) -> bool:
    return len(n.var_inputs) == 1 and len(n.outputs) == 1


def _back_through(v: Value, passes) -> tuple[Value, list[Node]]:
    """From ``v`` back through the producers that ``passes(node)`` accepts (one variable input,
    one output), each value on the way read by one node: the value where the walk stops and the
    nodes passed (last first)."""
    path: list[Node] = []
    while v.producer is not None and len(v.users) == 1 and _one_in_one_out(v.producer) and passes(v.producer):
        path.append(v.producer)
        v = v.producer.var_inputs[0]
    return v, path


def _abs_pair(rule, node, xs: list, ys: list, bounds, config) -> tuple[list, list]:
    """``rule.abs_linear`` of two sets of inputs, in one evaluation for affine ops (whose
    ``|A|`` does not depend on the examples: the two are stacked along the batch)."""
    if isinstance(rule, AffineRule) and not rule.bounds_needed(node):
        n = xs[0].shape[0]
        both = _detach(rule.abs_linear(node, [torch.cat([x, y]) for x, y in zip(xs, ys)], bounds, config))
        return [t[:n] for t in both], [t[n:] for t in both]
    return (_detach(rule.abs_linear(node, xs, bounds, config)), _detach(rule.abs_linear(node, ys, bounds, config)))


_SUBNORMAL_SCANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # graph -> {sigma: found}


def _has_subnormal_constants(graph: Graph, sigma: float) -> bool:
    """Whether some floating-point constant of ``graph`` has a nonzero entry below ``sigma``
    (subnormal in the evaluation's precision: read as zero under denormals-are-zero). Scanned
    once per graph (an allowance is made per batch; the constants do not change once it runs)."""
    scans = _SUBNORMAL_SCANS.setdefault(graph, {})
    if sigma not in scans:
        scans[sigma] = any(bool(((c > 0) & (c < sigma)).any())
                           for c in (v.const.abs() for node in graph.nodes for v in node.inputs
                                     if v is not None and v.is_const and v.const.is_floating_point()))
    return scans[sigma]


def _reaches(m: torch.Tensor | float, limit: float) -> torch.Tensor:
    """Per example, whether magnitudes ``[B, *unit]`` reach ``limit`` anywhere: ``[B]`` bool
    (``[1]`` for a number or a tensor without unit dimensions)."""
    m = torch.as_tensor(m)
    return (m >= limit).reshape(m.shape[0] if m.dim() >= 2 else 1, -1).any(1)


def _largest_max(m: torch.Tensor | float) -> float:
    """The largest entry of magnitudes (any shape)."""
    return float(torch.as_tensor(m).max()) if torch.as_tensor(m).numel() else 0.0


def _largest_sum(m: torch.Tensor | float) -> float:
    """``max over examples of ||m||_1`` of magnitudes ``[B, *unit]`` (a number or a tensor
    without unit dimensions: all of it)."""
    if not torch.is_tensor(m) or m.dim() < 2:
        return float(torch.as_tensor(m).abs().sum())
    return float(m.flatten(1).sum(1).max()) if m.numel() else 0.0


def _add(a: list, b: list) -> list:
    return [x + y for x, y in zip(a, b)]


def _detach(ts: list) -> list:
    return [t.detach() if torch.is_tensor(t) else t for t in ts]


@contextlib.contextmanager
def full_precision_matmul(device: torch.device) -> Iterator[None]:
    """No TF32 in matrix products and cuDNN convolutions on CUDA while bounds are computed
    (TF32 keeps 10 mantissa bits: the allowance assumes IEEE float32)."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
