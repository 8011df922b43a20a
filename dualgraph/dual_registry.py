"""The dual-layer registry: how bounds flow backward through each primal op.

Notation. We bound ``c^T z_k`` from below. Instead of the paper's dual variable ``nu``
we carry ``lam = -nu``, the coefficient of a value in the linear form being bounded, so
that every rule reads like a vector-Jacobian product in reverse-mode autodiff.

**The rule contract** (the public API that plugins implement). For a primal node
``y = f(z_1, ..., z_p)`` a rule's :meth:`DualRule.backward` receives ``lam`` (shape
``[b, m, *y.unit_shape]``: ``m`` specification rows per example, ``b`` examples or 1 when
the rows are the same for every example) and the pre-computed bounds ``l <= z_i <= u`` of
its variable inputs, and returns a :class:`DualStep` with one ``lam_i`` per variable input
and offsets such that for **every** ``z`` within the bounds

    lam . f(z) >= sum_i lam_i . z_i + lower                       (1)

and, if the rule declares itself ``linear`` (``lam_i`` is linear in ``lam``, so the same
``lam_i`` also serve ``-lam``),

    lam . f(z) <= sum_i lam_i . z_i + upper.                       (2)

(1) is Theorem 1's dual layer: ``g(nu) = -lam_i`` and ``h = -lower``. Linear rules let
one backward pass give both bounds of every unit and run forward (Appendix F) and with
random projections (the paper's ReLU relaxation is linear; CROWN's adaptive lower slope
is not). **Linearity is decided in one place**, :meth:`DualRule.linear`, and the safe
answer (not linear) is the default; a rule that declares itself linear and returns
something else is stopped with an error naming the op and the node. Any rule satisfying
(1)/(2) yields a sound certificate; :func:`dualgraph.testing.check_op` checks a rule on
sampled points, and a rule from outside dualgraph is also checked on its first use
(:mod:`dualgraph.trust`).

A rule is attached to its op by the op's definition (:mod:`dualgraph.op_registry`):
``definition.dual(SomeRule)`` for a :class:`DualRule` subclass, an :class:`AffineRule`
(ops affine in their variable inputs; only ``transpose`` may be overridden, the bias comes
from evaluating the op at zero) or ``definition.relaxation(...)`` (elementwise activations:
only the linear bounding functions, an :class:`ElementwiseRule`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .errors import DualgraphError, UnsupportedOpError
from .interpreter import EVAL_RULES, naming_node, node_args
from .ir import Graph, Node, OpKey
from .linalg import batched_dot, take_examples, tensor_key


class Bounds:
    """Elementwise bounds ``lower <= z <= upper`` of one value, shape ``[B, *unit_shape]``.

    Unpacks like a pair (``l, u = bounds``). ``cache`` holds what rules derive from these
    bounds (relaxations): it lives and dies with the bounds in the scheduler's
    environment, never on the graph.
    """

    __slots__ = ("lower", "upper", "cache")

    def __init__(self, lower: torch.Tensor, upper: torch.Tensor) -> None:
        self.lower, self.upper = lower, upper
        self.cache: dict = {}

    def __iter__(self):
        return iter((self.lower, self.upper))

    def __getitem__(self, i: int) -> torch.Tensor:
        return (self.lower, self.upper)[i]

    def __len__(self) -> int:
        return 2

    def __repr__(self) -> str:
        return f"Bounds(shape={tuple(self.lower.shape)})"

    def take(self, examples: torch.Tensor) -> Bounds:
        """The bounds of the given examples (an index tensor into the batch), in that order;
        cached relaxations are taken along rather than derived again."""
        out = Bounds(take_examples(self.lower, examples), take_examples(self.upper, examples))
        out.cache = {k: v.take(examples) for k, v in self.cache.items() if isinstance(v, Relaxation)}
        return out


@dataclass
class DualStep:
    """What a dual layer returns: ``lam_in`` per variable input (None = zero) and offsets [b, m]."""

    lam_in: list[torch.Tensor | None]
    lower: torch.Tensor | float = 0.0
    upper: torch.Tensor | float | None = 0.0


class DualRule:
    """Base class of dual layers. Subclasses override :meth:`backward`."""

    #: whether the rule needs bounds of its variable inputs (nonlinear ops do); read through
    #: :meth:`bounds_needed`, which a rule overrides when it depends on the node
    needs_bounds: bool = False
    #: who to blame if the rule is unsound ("<distribution>, op <name>"): set for rules from
    #: outside dualgraph until their first use has been checked (dualgraph.trust)
    trust_source: str | None = None
    #: whether onnxruntime may continue the op's sums into a following Add (a Conv's "Sum"
    #: input, MatMul + Add as a Gemm); whether the op is such an Add (or Sub), of a variable or
    #: a constant, that may be evaluated in its producers' sums; and whether the op only
    #: rearranges entries (each output entry is one input entry, each input entry lands in one
    #: output entry), so that onnxruntime's layout passes may take it out of a fusion's way. The
    #: rounding allowance charges such an Add as one sum with its producers
    #: (:func:`dualgraph.rounding.fused_sum_producers`)
    sums_into_next_add: bool = False
    adds_into_producer_sum: bool = False
    rearranges_entries: bool = False

    def constant_factor(self, node: Node) -> torch.Tensor | None:
        """The constant factor the op multiplies its one variable input by, if it is such a
        scaling (a Mul or Div by a constant, an inference BatchNormalization), else None:
        onnxruntime may fold it into a neighbouring Conv, MatMul or Gemm (its weights, or a
        FusedMatMul's alpha), where it changes the sizes the evaluation computes with
        (:func:`dualgraph.rounding.fused_scale_gain`)."""
        return None

    def bounds_needed(self, node: Node) -> bool:
        """Whether this node's dual layer needs bounds of its variable inputs (a relaxation,
        not an exact adjoint). Default: :attr:`needs_bounds`; e.g. Mul needs them only when
        both operands are variables."""
        return self.needs_bounds

    def linear(self, node: Node, config) -> bool:
        """True if the dual layer is linear in ``lam``: ``backward`` then returns ``upper``
        too (the same ``lam_in`` serve ``-lam``). The one place linearity is decided; the
        default is the safe answer, False."""
        return False

    def breakpoints(self, node: Node) -> tuple[float, ...] | None:
        """For a piecewise-linear activation: the points between its linear pieces, if the
        relaxation on any ``[l, u]`` inside one piece is that piece's line whatever ``l``
        and ``u`` are (a stable ReLU). Then only such units' *piece* matters, not their
        bounds, and the scheduler may skip their exact bounds (``BoundConfig.prune_stable``).
        None (the default) when the relaxation depends on the bounds themselves."""
        return None

    def has_image_bounds(self, node: Node) -> bool:
        """Whether :meth:`image_bounds` gives this node's output bounds (default False)."""
        return False

    def image_bounds(self, node: Node, bounds: list[Bounds]) -> list[Bounds]:
        """Bounds of the outputs straight from the inputs' bounds, where no pass of this node's
        one-unit rows could be tighter given the same input bounds, so the scheduler skips
        those passes (a ReLU's output in ``[relu(l), relu(u)]``, a max pool's in
        ``[max l, max u]``; the inputs' bounds are then computed without pruning, see
        :meth:`BoundScheduler.value_bounds`). They must hold for the op as evaluated in
        floating point. Called only where :meth:`has_image_bounds` is True."""
        raise NotImplementedError

    def backward(self, node: Node, lam: torch.Tensor, bounds: list[Bounds | None], config) -> DualStep:
        raise NotImplementedError

    # ---- optimised parameters (relu_relaxation="alpha", dualgraph.alpha) ----
    def free_variables(self, node: Node, bounds: list[Bounds], config) -> dict[str, FreeSlopes]:
        """The dual layer's free parameters on ``bounds`` (one example per row of the passes
        that use them), at their starting values: ``{"slopes": ..., "upper slopes": ...}``
        (either may be absent), each a :class:`FreeSlopes` over flat positions ``0 ..
        width - 1``. Every value in range must give a sound step of
        ``backward_with_slopes(node, lam, bounds[0], config, slopes, splits=None, upper=None)``,
        which a rule that declares any must implement. Default: none."""
        return {}

    # ---- floating point (see dualgraph.rounding): what the rounding allowance needs to know ----
    def abs_linear(self, node: Node, xs: list[torch.Tensor], bounds: list[Bounds | None], config) -> list[torch.Tensor]:
        """``|A| x`` per output for nonnegative ``xs`` (one ``[B, *in_unit]`` per variable input),
        where ``A`` is the linear part of the relaxed op (``|lam_in| <= A^T |lam|``-wise): the
        absolute weights of an affine op, the larger absolute slope of a relaxation.
        Any elementwise upper bound is sound."""
        raise UnsupportedOpError(
            f"the dual layer of node '{node.name}' ({_op_name(node)}) does not describe its arithmetic for the "
            "rounding allowance; implement DualRule.abs_linear, constant_magnitude, eval_length and dual_length")

    def constant_magnitude(self, node: Node, m_in: list[torch.Tensor], bounds: list[Bounds | None],
                           config) -> list[torch.Tensor | float]:
        """Upper bound of the absolute constant terms per output (``|b|`` of ``A z + b``, the
        offsets of a relaxation) given ``|z_i| <= m_in[i]``; ``[B or 1, *out_unit]`` or a number."""
        return [0.0] * len(node.outputs)

    def output_magnitude(self, node: Node, m_in: list[torch.Tensor], bounds: list[Bounds | None], config,
                         terms: list[torch.Tensor]) -> list[torch.Tensor]:
        """Upper bound of ``|y|`` per output given ``|z_i| <= m_in[i]`` (and the input bounds);
        ``terms`` is ``|A| m_in + |b|``, which bounds it for an affine op (the default)."""
        return terms

    def eval_length(self, node: Node, bounds: list[Bounds | None], config) -> int:
        """Roundings behind one output entry of the op's floating-point evaluation: the most
        nonzero terms of one sum (0: exact, like ReLU or a reshape). Safe default: all inputs."""
        return sum(v.numel for v in node.var_inputs) + 2

    def evaluation_gain(self, node: Node) -> float:
        """How far the op's evaluated intermediate values may exceed its terms ``T`` (overflow),
        and its intermediate rounding errors be amplified (underflow), as a factor ``>= 1``:
        1 for ops that scale nothing after their sums (:mod:`dualgraph.rounding`)."""
        return 1.0

    def dual_length(self, node: Node, bounds: list[Bounds | None], config) -> int:
        """The most nonzero terms of one floating-point sum in this dual layer, per row (the
        adjoint's sums and the dot product of ``lam`` with the offsets; 0: exact, no offsets).
        Safe default: every output unit."""
        return sum(o.numel for o in node.outputs) + 2


DUAL_RULES: dict[OpKey, DualRule] = {}
"""The dual layer of each op; filled only through op definitions (:mod:`dualgraph.op_registry`)."""


def dual_rule(node: Node) -> DualRule:
    """The rule for ``node``'s op, or UnsupportedOpError naming it and how to add one."""
    _ensure_loaded()
    rule = DUAL_RULES.get(node.op)
    if rule is None:
        raise missing_rules_error([node])
    return rule


def missing_dual_rules(graph: Graph) -> list[Node]:
    _ensure_loaded()
    return [n for n in graph.nodes if n.op not in DUAL_RULES]


def missing_rules_error(nodes: list[Node]) -> UnsupportedOpError:
    by_op: dict[str, list[str]] = {}
    for n in nodes:
        by_op.setdefault(".".join(filter(None, n.op)), []).append(n.name)
    listing = "; ".join(f"{op} (node{'s' if len(v) > 1 else ''} {', '.join(repr(x) for x in v)})"
                        for op, v in by_op.items())
    from .op_registry import OPS
    from .plugins import failed_plugins_note
    readouts = sorted({".".join(filter(None, n.op)) for n in nodes if getattr(OPS.get(n.op), "output_side", False)})
    if readouts:
        return UnsupportedOpError(
            f"no dual layer for: {listing}; {', '.join(readouts)} read a class or mask off the logits, which "
            "bounds cannot pass through: export the model without them (its logits) and state the property "
            "over the logits")
    return UnsupportedOpError(
        f"no dual layer for: {listing}; define one with dualgraph.define_op(...).dual or .relaxation in a "
        "plugin package (entry point group 'dualgraph.plugins', README 'Writing a dual layer')"
        f"{failed_plugins_note()}")


def _ensure_loaded() -> None:
    from .op_registry import ensure_ops_loaded
    ensure_ops_loaded()


# ---- helpers for rule authors ---------------------------------------------------------

def eval_node(node: Node, args: list) -> list[torch.Tensor]:
    out = EVAL_RULES[node.op](node, args)
    return [out] if isinstance(out, torch.Tensor) else list(out)


def const_args(node: Node, like: torch.Tensor) -> list:
    """The node's constant inputs cast like ``like``; variable inputs as ``None`` placeholders."""
    return node_args(node, None, like)


class AffineRule(DualRule):
    """Dual layer of an op affine in its variable inputs: ``y = A(z) + b`` (Corollary 1).

    ``lam_i = A_i^T lam`` (exact; :meth:`transpose` defaults to a vector-Jacobian product
    of the op's evaluation rule, so structural ops need no code) and
    ``lower = upper = lam . b`` with ``b = f(0)`` (the op evaluated at zero inputs).
    """

    def linear(self, node: Node, config) -> bool:
        return True

    #: whether evaluating the op with every floating-point constant replaced by its absolute
    #: value gives ``|A| x + c`` (true for sums of products of inputs and constants: Gemm
    #: without a negative alpha, Conv, pooling, index maps); otherwise ``abs_linear`` forms
    #: the dense Jacobian (small plugin ops) unless a subclass overrides it.
    abs_by_eval: bool = False

    def abs_linear(self, node: Node, xs, bounds, config) -> list[torch.Tensor]:
        return self.eval_with_abs_constants(node, xs) if self.abs_by_eval else self._abs_jacobian(node, xs)

    def eval_with_abs_constants(self, node: Node, xs: list[torch.Tensor], op: OpKey | None = None) -> list[torch.Tensor]:
        """The op (or ``op`` on the same inputs) with ``|float constants|``, at ``xs`` minus at zero."""
        like = xs[0]
        args = [a.abs() if torch.is_tensor(a) and a.is_floating_point() else a for a in const_args(node, like)]
        it = iter(xs)
        for i, v in enumerate(node.inputs):
            if args[i] is None and v is not None:
                x = next(it)
                args[i] = torch.cat([x, torch.zeros_like(x[:1])])  # one evaluation at xs and at zero
        outs = EVAL_RULES[op or node.op](node, args)
        outs = [outs] if torch.is_tensor(outs) else list(outs)
        return [o[:-1] - o[-1:] for o in outs]

    def _abs_jacobian(self, node: Node, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``|A| x`` from the dense Jacobian (one identity row per input unit)."""
        var = node.var_inputs
        total = sum(v.numel for v in var) * sum(o.numel for o in node.outputs)
        if total > 50_000_000:
            raise UnsupportedOpError(
                f"node '{node.name}' ({_op_name(node)}) is too large for the dense rounding analysis; "
                "set abs_by_eval or implement abs_linear on its dual layer")
        outs = [xs[0].new_zeros(xs[0].shape[0], o.numel) for o in node.outputs]
        for i, (v, x) in enumerate(zip(var, xs)):
            eye = torch.eye(v.numel, dtype=x.dtype, device=x.device).view(v.numel, *v.unit_shape)
            cols = self.apply_linear(node, [eye if j == i else None for j in range(len(var))])
            for k, c in enumerate(cols):
                outs[k] = outs[k] + x.reshape(x.shape[0], -1) @ c.reshape(v.numel, -1).abs()
        return [t.view(t.shape[0], *o.unit_shape) for t, o in zip(outs, node.outputs)]

    def constant_magnitude(self, node: Node, m_in, bounds, config) -> list[torch.Tensor]:
        return [b.abs() for b in self.bias(node, m_in[0])]

    def has_offsets(self, node: Node) -> bool:
        """Whether the constant term ``f(0)`` is nonzero (then ``lam . f(0)`` is a dot product)."""
        like = torch.empty(0, dtype=torch.float64)
        return any(bool(b.detach().any()) for b in self.bias(node, like))

    def dual_length(self, node: Node, bounds, config) -> int:
        """Safe default: every output unit (the adjoint of a plugin's op may sum them all)."""
        return sum(o.numel for o in node.outputs) + 2

    def transpose(self, node: Node, lam_rows) -> list[torch.Tensor | None]:
        """``A_i^T`` applied to rows ``[r, *out_unit]`` -> ``[r, *in_unit]`` per variable input.

        ``lam_rows`` is a list (one per output) for multi-output ops.
        """
        outs_lam = lam_rows if isinstance(lam_rows, list) else [lam_rows]
        like = outs_lam[0]
        args = const_args(node, like)
        trainable = any(a.requires_grad for a in args if torch.is_tensor(a))
        zs = []
        for i, v in enumerate(node.inputs):
            if args[i] is None and v is not None:
                # any point will do: the Jacobian of an affine map is the same everywhere
                z = torch.zeros((like.shape[0], *v.unit_shape), dtype=like.dtype, device=like.device,
                                requires_grad=True)
                args[i] = z
                zs.append(z)
        # keep the graph of the transpose only when the caller differentiates the bounds
        # (through the rows, or through trainable weights of this op)
        differentiable = torch.is_grad_enabled() and (trainable or any(t.requires_grad for t in outs_lam))
        with torch.enable_grad():
            outs = eval_node(node, args)
            grads = torch.autograd.grad(outs, zs, outs_lam, allow_unused=True, create_graph=differentiable)
        return list(grads)

    def bias(self, node: Node, like: torch.Tensor) -> list[torch.Tensor]:
        """``f(0)`` per output, ``[1, *out_unit]``.

        Cached on the node, keyed by dtype, device and the identity and version of the
        constant tensors (so an edited weight invalidates it); never cached for weights
        that require gradients (each differentiable call needs its own graph).
        """
        consts = [v.const for v in node.inputs if v is not None and v.is_const]
        trainable = any(c.requires_grad for c in consts)  # then every call must build its own graph
        key = (like.dtype, like.device, tuple(tensor_key(c) for c in consts))
        cache = node.meta.setdefault("_affine_bias", {})
        if key in cache and not trainable:
            return cache[key]
        args = const_args(node, like)
        for i, v in enumerate(node.inputs):
            if args[i] is None and v is not None:
                args[i] = torch.zeros((1, *v.unit_shape), dtype=like.dtype, device=like.device)
        b = eval_node(node, args)
        if not trainable:
            if len(cache) >= 4:  # stale entries (edited weights); a few dtypes/devices coexist
                cache.clear()
            cache[key] = b
        return b

    #: input slot of an additive constant (Conv's ``B``, Gemm's ``C``): :meth:`apply_linear`
    #: evaluates without it instead of evaluating ``f(z)`` and subtracting ``f(0)``
    bias_slot: int | None = None

    def apply_linear(self, node: Node, xs: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """The linear part ``A(z) = f(z) - f(0)`` on rows ``[r, *in_unit]`` per variable input
        (``None`` = zero input). Used by the forward (Appendix F) direction."""
        like = next(x for x in xs if x is not None)
        args = const_args(node, like)
        it = iter(xs)
        for i, v in enumerate(node.inputs):
            if args[i] is None and v is not None:
                x = next(it)
                args[i] = x if x is not None else like.new_zeros((like.shape[0], *v.unit_shape))
        slot = self.bias_slot
        if slot is not None and (slot >= len(node.inputs) or node.inputs[slot] is None
                                 or node.inputs[slot].is_const):
            if slot < len(args):
                args[slot] = None  # A(z) is f(z) without the constant term
            return eval_node(node, args)
        outs = eval_node(node, args)
        return [o - b if (b.requires_grad or bool(b.any())) else o for o, b in zip(outs, self.bias(node, like))]

    def backward(self, node: Node, lam, bounds, config) -> DualStep:
        lams = lam if isinstance(lam, list) else [lam]
        bm = tuple(lams[0].shape[:2])
        rows = [t.reshape(bm[0] * bm[1], *t.shape[2:]) for t in lams]
        grads = self.transpose(node, rows if isinstance(lam, list) else rows[0])
        lam_in = [None if g is None else g.reshape(*bm, *g.shape[1:]) for g in grads]
        offset: torch.Tensor | float = 0.0
        for t, b in zip(lams, self.bias(node, lams[0])):
            if b.requires_grad or bool(b.any()):
                offset = offset + batched_dot(t, b)
        return DualStep(lam_in, offset, offset)


@dataclass
class FreeLines:
    """The optimisable lines of a relaxation (``relu_relaxation="alpha"``), on ``units`` (a
    bool ``[B, *unit]``).

    The lower line may take any slope ``a`` in ``[lo, hi]``. With ``offsets`` None its
    offset stays the relaxation's ``b_lo`` (a ReLU's lines ``a z``, ``0 <= a <= 1``: one
    offset serves every slope), and the upper line is fixed. With ``offsets`` both lines
    are free, the upper one's slope in ``upper`` ``(lo, hi)``, and each line's offset is the
    tightest for its slope, ``offsets(a, at, side)``: ``min`` (``side = -1``, the lower
    line) or ``max`` (``side = +1``) over ``[l, u]`` of ``f(z) - a z``, rounded outward, for
    slopes ``a`` in any layout, ``at`` mapping a ``[B, *unit]`` tensor of the relaxation's
    batch into it (the free units of one example per row on dense rows, each row's window on
    patches); for an S-shaped ``f`` the tangent lines, parametrised by their slopes.
    Rounding (:mod:`dualgraph.rounding`, :meth:`Relaxation.moved_out`): lines with offsets of
    their own pay their own allowance when chosen, so the relaxation's fixed lines keep
    CROWN's: ``shift`` (the fixed lines' allowance) plus ``coef (|a| m + 2 |b(a)|)`` for the
    chosen slope ``a`` and offset ``b(a)`` (``m`` bounds ``|z|``)."""

    units: torch.Tensor
    lo: torch.Tensor | float
    hi: torch.Tensor | float
    upper: tuple | None = None
    offsets: Callable | None = None
    shift: torch.Tensor | float = 0.0
    coef: float = 0.0
    m: torch.Tensor | float = 0.0

    def offset(self, a: torch.Tensor, at: Callable, side: int) -> torch.Tensor:
        """The lower (``side = -1``) or upper (``+1``) line's offset at slopes ``a`` (in the
        layout ``at`` maps into, see above), moved out by its rounding allowance."""
        b = self.offsets(a, at, side)

        def laid_out(t):
            return at(t) if torch.is_tensor(t) and t.dim() > 0 else t
        shift = laid_out(self.shift)
        if self.coef:
            shift = shift + self.coef * (a.detach().abs() * laid_out(self.m) + 2 * b.detach().abs())
        return b + side * shift

    @staticmethod
    def at_units(index: torch.Tensor) -> Callable:
        """The layout of dense rows' variables: ``[B, *unit]`` -> ``[B, 1, K]`` at the flat units ``index``."""
        return lambda t: t.flatten(1)[:, index].unsqueeze(1)

    def ranges(self) -> list[tuple[int, object, object]]:
        """``(side, lo, hi)`` of each free line: the lower line (-1), and the upper one (+1)."""
        out = [(-1, self.lo, self.hi)]
        if self.upper is not None:
            out.append((1, *self.upper))
        return out

    def lines(self, r: Relaxation, at: tuple[float, ...] = (0.0, 0.5, 1.0)) -> list[tuple[int, torch.Tensor, object]]:
        """``(side, a, b)``: the lines ``a z + b`` ``[B, *unit]`` of ``r`` with each free line's
        slope at the fractions ``at`` of its range (the others as in ``r``), for checks: the
        valid slopes form an interval, so a sound rule holds at its ends and inside."""
        out = []
        for side, lo, hi in self.ranges():
            base_a, base_b = (r.a_lo, r.b_lo) if side < 0 else (r.a_up, r.b_up)
            lo, hi = (torch.as_tensor(t, dtype=base_a.dtype).expand_as(base_a) for t in (lo, hi))
            for t in at:
                a = torch.where(self.units, lo + t * (hi - lo), base_a)
                b = base_b
                if self.offsets is not None:
                    n = a[0].numel()
                    b_free = self.offset(a.reshape(a.shape[0], 1, n), self.at_units(torch.arange(n)), side).view_as(a)
                    b = torch.where(self.units, b_free, torch.as_tensor(base_b, dtype=a.dtype).expand_as(a))
                out.append((side, a, b))
        return out

    def variables(self, r: Relaxation, side: int) -> FreeSlopes:
        """The slopes of the lower (``side = -1``) or upper (``+1``) free lines of ``r`` (one
        example per row) as variables at ``r``'s own slopes, over the units free in some
        example; with offsets of their own, in units of each unit's range (``scale``)."""
        units = self.units.flatten(1)
        index = units.any(0).nonzero().flatten()

        def per_row(t):
            return t.flatten(1)[:, index].unsqueeze(1) if torch.is_tensor(t) and t.dim() > 0 else t

        lo, hi, start, scale = self.scaled(side, r, per_row)
        values = start.detach().clone().clamp(min=lo).clamp(max=hi).requires_grad_(True)
        return FreeSlopes(index, values, per_row(units), lo, hi, scale, units.shape[1])

    def scaled(self, side: int, r: Relaxation, laid_out: Callable) -> tuple:
        """``(lo, hi, start, scale)`` of one side's slopes in a layout (``laid_out`` maps a
        ``[B, *unit]`` tensor into it): with offsets of their own the ranges have any width (an
        S-shaped ``f'`` on ``[l, u]``), so they are divided by it, each about 1 wide
        (:attr:`FreeSlopes.scale`); else ``scale`` is None."""
        lo, hi = (self.lo, self.hi) if side < 0 else self.upper
        lo, hi, start = laid_out(lo), laid_out(hi), laid_out(r.a_lo if side < 0 else r.a_up)
        if self.offsets is None:
            return lo, hi, start, None
        width = hi - lo
        scale = torch.where(width > 0, width, 1.0)
        return lo / scale, hi / scale, start / scale, scale

    def take(self, examples: torch.Tensor) -> FreeLines:
        def pick(t):
            return take_examples(t, examples) if torch.is_tensor(t) and t.dim() > 0 else t
        upper = None if self.upper is None else tuple(pick(t) for t in self.upper)
        offsets = self.offsets
        if offsets is not None:
            def offsets(a, at, side, inner=self.offsets):  # the picked examples' units
                return inner(a, lambda t: at(take_examples(t, examples)), side)
        return FreeLines(pick(self.units), pick(self.lo), pick(self.hi), upper, offsets, pick(self.shift),
                         self.coef, pick(self.m))


@dataclass
class Relaxation:
    """Linear bounds ``a_lo * z + b_lo <= f(z) <= a_up * z + b_up`` valid on ``[l, u]``.

    Tensors are ``[B, *unit]``. A rule that declares a linear dual layer must return the
    same slopes (``a_up`` may be ``a_lo`` itself); the offsets may differ.
    """

    a_lo: torch.Tensor
    b_lo: torch.Tensor | float
    a_up: torch.Tensor
    b_up: torch.Tensor | float
    #: optimisable lines (:class:`FreeLines`, or a tuple of its first three fields: free lower
    #: slopes with one offset); ``a_lo``/``a_up`` are the starting point. None: fixed.
    free: FreeLines | None = None
    offsets: tuple | None = field(default=None, repr=False)  # (units, mid, gap), see _cached_offsets
    _magnitudes: tuple | None = field(default=None, repr=False)  # (|a|, |b|), see magnitudes

    def __post_init__(self) -> None:
        if isinstance(self.free, tuple):  # ``(units, lo, hi)``: free lower slopes, one offset
            self.free = FreeLines(*self.free)

    def magnitudes(self, free: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``max(|a_lo|, |a_up|)`` (and, unless ``free`` is False, the largest ``|slope|`` of the
        ranges of free lines that share the fixed offsets: what optimised slopes may reach with
        them) and ``max(|b_lo|, |b_up|)``, ``[B, *unit]`` (detached, kept). Free lines with
        offsets of their own pay their own rounding (:class:`FreeLines`)."""
        if self._magnitudes is None:
            a = self.a_lo.abs() if self.a_up is self.a_lo else torch.maximum(self.a_lo.abs(), self.a_up.abs())
            b_lo, b_up = (torch.as_tensor(t, dtype=a.dtype, device=a.device).abs() for t in (self.b_lo, self.b_up))
            b = torch.maximum(b_lo, b_up).detach().expand_as(a)
            widest = a
            if self.free is not None and self.free.offsets is None:
                units = self.free.units
                for _, lo, hi in self.free.ranges():
                    reach = torch.maximum(torch.as_tensor(lo).abs(), torch.as_tensor(hi).abs()).to(a)
                    widest = torch.where(units, torch.maximum(widest, reach), widest)
            self._magnitudes = (a.detach(), b, widest.detach())
        a, b, widest = self._magnitudes
        return (widest if free else a), b

    def moved_out(self, delta: torch.Tensor, free_coef: float = 0.0, m: torch.Tensor | float = 0.0) -> Relaxation:
        """The same lines with every offset moved out by ``delta`` ``[B, *unit]`` (the rounding
        allowance, :mod:`dualgraph.rounding`), the free lines with offsets of their own by
        ``delta`` plus ``free_coef (|a| m + 2 |b(a)|)`` at their chosen slopes (:class:`FreeLines`)."""
        free = self.free
        if free is not None and free.offsets is not None:
            free = replace(free, shift=free.shift + delta, coef=free.coef + free_coef, m=m)
        return Relaxation(self.a_lo, self.b_lo - delta, self.a_up, self.b_up + delta, free)

    def has_equal_slopes(self) -> bool:
        return self.a_lo is self.a_up or bool(torch.equal(self.a_lo, self.a_up))

    def take(self, examples: torch.Tensor) -> Relaxation:
        """The relaxation of the given examples (an index tensor into the batch)."""
        def pick(t):
            return take_examples(t, examples) if torch.is_tensor(t) and t.dim() > 0 else t
        a_lo = pick(self.a_lo)
        free = None if self.free is None else self.free.take(examples)
        out = Relaxation(a_lo, pick(self.b_lo), a_lo if self.a_up is self.a_lo else pick(self.a_up), pick(self.b_up),
                         free)
        if self.offsets is not None:
            units, mid, gap = self.offsets
            out.offsets = (units, pick(mid), pick(gap))
        return out

    def mid_gap(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``mid = (b_lo + b_up)/2`` and ``gap = (b_up - b_lo)/2 >= 0`` as ``[B, *unit]`` tensors.

        With equal slopes, ``lam . b`` picked by sign equals
        ``lam . mid -/+ |lam| . gap``: a linear part and an absolute part (the paper's
        ``[a]_+ = (|a| + a)/2`` split).
        """
        b_lo = self.b_lo if torch.is_tensor(self.b_lo) else torch.full_like(self.a_lo, float(self.b_lo))
        b_up = self.b_up if torch.is_tensor(self.b_up) else torch.full_like(self.a_lo, float(self.b_up))
        return (b_lo + b_up) / 2, (b_up - b_lo) / 2


RelaxFn = Callable[[Node, Bounds, object], Relaxation]


class ElementwiseRule(DualRule):
    """Dual layer of an elementwise activation from its linear relaxation.

    With ``lam+ = max(lam, 0)``, ``lam- = min(lam, 0)``: ``lam_in = lam+ a_lo + lam- a_up``,
    ``lower = sum lam+ b_lo + lam- b_up``. If the rule is declared linear (``linear_if``;
    then the relaxation must have equal slopes ``a``): ``lam_in = a lam`` and also
    ``upper = sum lam+ b_up + lam- b_lo`` (computed as ``lam.mid -/+ |lam|.gap``).
    """

    needs_bounds = True

    def __init__(self, relax: RelaxFn, linear_if: Callable[[object], bool] = lambda cfg: False,
                 breakpoints: Callable[[Node], tuple[float, ...] | None] = lambda node: None,
                 eval_roundings: int = 8, monotone: bool = False, eval_absolute: float = 0.0):
        self.relax = relax
        self._eval_roundings = eval_roundings
        self._eval_absolute = eval_absolute
        self.monotone = monotone
        self._linear_if = linear_if
        self._breakpoints = breakpoints

    def linear(self, node: Node, config) -> bool:
        return bool(self._linear_if(config))

    def breakpoints(self, node: Node) -> tuple[float, ...] | None:
        return self._breakpoints(node)

    # The rounding of a relaxation step is folded into the relaxation itself (its offsets
    # are moved out, dualgraph.rounding), so only magnitudes and the evaluation are stated.
    def abs_linear(self, node: Node, xs, bounds, config) -> list[torch.Tensor]:
        # the relaxation's own slopes: passes with optimised slopes add their own per-row
        # allowance (Batch.per_row) instead of relying on eps propagated with these
        return [xs[0] * self.relaxation(node, bounds[0], config).magnitudes(free=False)[0]]

    def constant_magnitude(self, node: Node, m_in, bounds, config) -> list[torch.Tensor]:
        return [self.relaxation(node, bounds[0], config).magnitudes()[1]]

    def output_magnitude(self, node: Node, m_in, bounds, config, terms) -> list[torch.Tensor]:
        """``|f(z)|`` is at most the larger end of the relaxation's range over ``[l, u]`` (its own
        lines bracket ``f`` as evaluated, rounding included): often far below ``|a| m + |b|``,
        which must also cover optimised slopes."""
        r = self.relaxation(node, bounds[0], config)
        lo, up = bounds[0]
        low = torch.minimum(r.a_lo * lo, r.a_lo * up) + r.b_lo
        high = torch.maximum(r.a_up * lo, r.a_up * up) + r.b_up
        return [torch.minimum(terms[0], torch.maximum(low.abs(), high.abs()))]

    def eval_length(self, node: Node, bounds, config) -> int:
        return self._eval_roundings

    def eval_absolute(self, node: Node) -> float:
        """An absolute error of the op's evaluation beyond its ``eval_roundings`` ulps, in units of
        the evaluation's unit roundoff (an approximation accurate to a fixed absolute error)."""
        return self._eval_absolute

    def has_image_bounds(self, node: Node) -> bool:
        # one variable input: a Clip whose limits are computed is not a function of z alone
        return (self.monotone and not self._eval_roundings and not self._eval_absolute
                and self.trust_source is None and len(node.var_inputs) == 1)

    def image_bounds(self, node: Node, bounds: list[Bounds]) -> list[Bounds]:
        """``[f(l), f(u)]`` for a non-decreasing ``f`` evaluated exactly (``monotone`` and no
        evaluation rounding): a one-unit pass bounds ``f(z_j)`` by a line above (below) ``f``
        on ``[l_j, u_j]``, never below ``f(u_j)`` (above ``f(l_j)``)."""
        lo, up = bounds[0]
        args = const_args(node, lo)
        slot = next(i for i, v in enumerate(node.inputs) if v is not None and not v.is_const)
        ends = []
        for end in (lo, up):
            args[slot] = end
            ends.append(eval_node(node, args)[0])
        return [Bounds(*ends)]

    def relaxation(self, node: Node, bounds: Bounds, config) -> Relaxation:
        """The relaxation on ``bounds``, computed once per bounds object and config, and
        checked against the declared linearity (every bound path reads it through here)."""
        key = self._cache_key(node, config)
        if key not in bounds.cache:
            with naming_node(node, "relaxation"):
                r = self.relax(node, bounds, config)
                if not isinstance(r, Relaxation):
                    raise DualgraphError(f"the relaxation of node '{node.name}' ({_op_name(node)}) returned a "
                                         f"{type(r).__name__}; it must return a dualgraph.Relaxation")
                if self.trust_source is not None:
                    from .trust import needs_check, verify_relaxation
                    if needs_check(self, node):
                        verify_relaxation(self, node, bounds, r)
            if self.linear(node, config) and not r.has_equal_slopes():
                raise DualgraphError(
                    f"the relaxation of node '{node.name}' ({_op_name(node)}) is declared linear (linear_if) "
                    "but returned different lower and upper slopes; declare it non-linear or return equal slopes")
            bounds.cache[key] = r
        return bounds.cache[key]

    def set_relaxation(self, node: Node, bounds: Bounds, config, r: Relaxation) -> None:
        """Replace the relaxation kept for ``bounds`` (the rounding allowance moves its offsets out)."""
        bounds.cache[self._cache_key(node, config)] = r

    @staticmethod
    def _cache_key(node: Node, config) -> tuple:
        # the config object as a whole (frozen; a rule may read any field), by identity:
        # hashing its fields on every lookup is measurable on small networks
        return (node.name, id(config))

    def linear_terms(self, node: Node, lam: torch.Tensor, bounds: Bounds, config):
        """``(r, linear, absolute)`` of a linear rule's relaxation ``r``: the offsets are
        ``linear -/+ absolute`` with ``linear = lam . mid`` and ``absolute = |lam| . gap``."""
        r = self.relaxation(node, bounds, config)
        units, mid, gap = _cached_offsets(r)
        part = lam.flatten(2) if units is None else lam.flatten(2)[..., units]
        return r, batched_dot(part, mid), batched_dot(part.abs(), gap)

    def backward(self, node: Node, lam: torch.Tensor, bounds, config) -> DualStep:
        if self.linear(node, config):  # lam_in = a lam, offsets lam.mid -/+ |lam|.gap
            r, linear, absolute = self.linear_terms(node, lam, bounds[0], config)
            return DualStep([lam * r.a_lo.unsqueeze(1)], linear - absolute, linear + absolute)
        r = self.relaxation(node, bounds[0], config)
        lam_in = _by_sign(lam, r.a_lo.unsqueeze(1), r.a_up.unsqueeze(1))
        return DualStep([lam_in], self._sign_offsets(r, lam), None)

    def free_variables(self, node: Node, bounds: list[Bounds], config) -> dict[str, FreeSlopes]:
        """The slopes of the relaxation's free lines (:class:`FreeLines`), lower and upper."""
        r = self.relaxation(node, bounds[0], config)
        if r.free is None or not bool(r.free.units.any()):
            return {}
        out = {"slopes": r.free.variables(r, -1)}
        if r.free.upper is not None:
            out["upper slopes"] = r.free.variables(r, 1)
        return out

    def backward_with_slopes(self, node: Node, lam: torch.Tensor, bounds: Bounds, config,
                             slopes: FreeSlopes | None, splits: SplitMultipliers | None = None,
                             upper: FreeSlopes | None = None) -> DualStep:
        """:meth:`backward` with the free lines of the relaxation (``Relaxation.free``) at the
        slopes ``slopes`` (lower lines) and ``upper`` (upper lines; one value per row and free
        unit), clamped into their ranges, with their offsets (:class:`FreeLines`), and the
        split constraints' multipliers added to ``lam_in`` (``splits``; ``beta`` clamped to
        ``>= 0``): every value of either gives a sound step, so every iterate of an optimiser does."""
        r = self.relaxation(node, bounds, config)
        lam_in = _by_sign(lam, r.a_lo.unsqueeze(1), r.a_up.unsqueeze(1)).flatten(2)
        offset = self._sign_offsets(r, lam)
        flat = lam.flatten(2)
        moved_by = {}
        for side, chosen_slopes, base_slopes, base_offsets in ((-1, slopes, r.a_lo, r.b_lo), (1, upper, r.a_up, r.b_up)):
            if chosen_slopes is None:
                continue
            k = chosen_slopes.index
            # the rows using this line: lam- = min(lam, 0) or lam+ = lam - lam-, so that at lam = 0
            # the slopes' gradient is the negative side's alone, as in _by_sign (and on windows)
            at_k = flat[..., k]
            negative = at_k.clamp(max=0)
            part = at_k - negative if side < 0 else negative
            base = base_slopes.flatten(1)[:, k].unsqueeze(1)
            chosen = torch.where(chosen_slopes.free, chosen_slopes.slopes(), base)
            lam_in = lam_in.index_add(2, k, part * (chosen - base))
            if r.free.offsets is not None:  # the chosen lines' own offsets replace the relaxation's
                b = base_offsets if torch.is_tensor(base_offsets) else torch.full_like(r.a_lo, float(base_offsets))
                b = b.flatten(1)[:, k].unsqueeze(1)
                moved = torch.where(chosen_slopes.free, r.free.offset(chosen, FreeLines.at_units(k), side), b)
                moved_by[side] = (k, moved - b)
        if moved_by:  # as lam . mid - |lam| . gap, like the fixed offsets (_sign_offsets)
            k = next(iter(moved_by.values()))[0]  # both sides' variables cover the same units (FreeLines.variables)
            d_lo, d_up = (moved_by[s][1] if s in moved_by else 0.0 for s in (-1, 1))
            part = flat[..., k]
            offset = offset + (part * ((d_lo + d_up) / 2)).sum(-1) - (part.abs() * ((d_up - d_lo) / 2)).sum(-1)
        if splits is not None:  # + beta s_j z_j for each split constraint s_j z_j <= 0 of the row's domain
            lam_in = lam_in.index_add(2, splits.index, splits.values.clamp(min=0) * splits.sign)
        return DualStep([lam_in.view_as(lam)], offset, None)

    @staticmethod
    def _sign_offsets(r: Relaxation, lam: torch.Tensor) -> torch.Tensor:
        """``lam+ . b_lo + lam- . b_up``, as ``lam . mid - |lam| . gap`` over the units with an
        offset (:func:`_cached_offsets`: a ReLU's crossing units)."""
        units, mid, gap = _cached_offsets(r)
        part = lam.flatten(2) if units is None else lam.flatten(2)[..., units]
        return batched_dot(part, mid) - batched_dot(part.abs(), gap)


def _by_sign(lam: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """``lam+ * positive + lam- * negative``: each entry times the slope of its sign. One of
    the two terms is an exact zero, so the fused multiply-add gives exactly the one product
    (one rounding, as the rounding allowance assumes); ``torch.where`` on the sign costs 2-3x
    these passes on this project's CPU build. ``lam+`` is taken as ``lam - lam-`` so that at
    ``lam = 0`` the gradient is the negative side's slope alone (a valid subgradient; the two
    clamps would add both slopes)."""
    negative_part = lam.clamp(max=0)
    return torch.addcmul(negative_part * negative, lam - negative_part, positive)


@dataclass
class FreeSlopes:
    """Values of the free slopes of one side of a relaxation (``Relaxation.free``) for a pass on
    rows ``[R, 1, *unit]``: ``values`` ``[R, 1, K]`` at the flat units ``index`` ``[K]`` (the
    units free in some row's example); ``free`` ``[R, 1, K]`` says where they apply (elsewhere
    the relaxation's own slope stays), ``lo``/``hi`` their range. With ``scale`` (``[R, 1, K]``)
    the values and their range are the slopes divided by it (each unit's range about 1 wide,
    so one step size suits them all; :meth:`slopes`). On patches ``index`` is None and the
    tensors are each row's window, ``[R, 1, 1, C, K, K]`` (:mod:`dualgraph.patches`)."""

    index: torch.Tensor | None
    values: torch.Tensor
    free: torch.Tensor
    lo: torch.Tensor | float
    hi: torch.Tensor | float
    scale: torch.Tensor | None = None
    width: int | None = None  # how many flat positions ``index`` indexes (dense rows)

    def slopes(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """The slopes at ``values`` (default: the variables), clamped into their range."""
        clamped = (self.values if values is None else values).clamp(self.lo, self.hi)
        return clamped if self.scale is None else clamped * self.scale


@dataclass
class SplitMultipliers:
    """Lagrange multipliers of branch-and-bound splits for a pass on rows ``[R, 1, *unit]``.

    A domain that splits unit ``j`` of an activation's input ``z`` adds the constraint
    ``s_j z_j <= 0`` (``s_j = -1``: ``z_j >= 0``, the active side; ``+1``: ``z_j <= 0``). For
    ``x`` in the domain ``c . f(x) >= c . f(x) + beta_j s_j z_j(x)`` with ``beta_j >= 0``, so a
    lower bound of the right side over the whole input set (``beta_j s_j`` added to the
    dual variable of ``z_j``) bounds ``c . f`` on the domain (beta-CROWN). ``values``
    ``[R, 1, K]`` at the flat units ``index`` ``[K]``, ``sign`` ``[R, 1, K]`` (0: no split there)."""

    index: torch.Tensor
    values: torch.Tensor
    sign: torch.Tensor


def _cached_offsets(r: Relaxation):
    """``(units, mid, gap)`` restricted to the units where either is nonzero in some example
    (kept on ``r``).

    For ReLU these are the crossing units, usually a small part of the layer, so the
    offset dot products read only those columns of lam. ``units`` is None when most are.
    """
    if r.offsets is None:
        mid, gap = (t.flatten(1) for t in r.mid_gap())
        used = torch.nonzero((mid != 0).any(0) | (gap != 0).any(0)).flatten()
        if used.numel() > mid.shape[1] // 2:
            r.offsets = (None, mid, gap)
        else:
            r.offsets = (used, mid[:, used], gap[:, used])
    return r.offsets


def _offset(lam_part: torch.Tensor, b) -> torch.Tensor | float:
    if isinstance(b, (int, float)):
        return lam_part.flatten(2).sum(-1) * b if b else 0.0
    return batched_dot(lam_part, b)


def runs_forward(node: Node, config) -> bool:
    """Whether ``node``'s dual layer can run in the forward direction (Appendix F) and with
    random projections: an affine op, or an elementwise relaxation declared linear."""
    rule = dual_rule(node)
    if isinstance(rule, AffineRule):
        return not rule.bounds_needed(node)  # an affine op's rule, here relaxing a product
    return isinstance(rule, ElementwiseRule) and rule.linear(node, config)


def _op_name(node: Node) -> str:
    return ".".join(filter(None, node.op))
