"""Fold elementwise constant affine ops (input normalisation) into the next linear op.

Math. ``Add/Sub/Mul/Div/Neg`` with one constant operand ``c`` are ``y = a * x + b``
elementwise (``x - c``: a=1, b=-c; ``c - x``: a=-1, b=c; ``x / c``: a=1/c, b=0; ...).

1. *Chains merge*: ``a2 (a1 x + b1) + b2 = (a1 a2) x + (a2 b1 + b2)``, so a chain of such
   ops, each output used only by the next, becomes one ``Add(b/a)`` then ``Mul(a)``
   (``(x + b/a) a``; the form of ``(x - mean) / std``), or ``Mul(a)`` then ``Add(b)``
   when ``a`` has zeros; a factor of ones / shift of zeros is dropped. A lone ``c - x``
   is split the same way, so that its scale and shift can fold separately.
2. *Fold into a Conv*, for ``a``, ``b`` constant over the spatial axes (per channel):
   ``conv(a x, W) = conv(x, W a[None, :, None..])`` always, also with zero padding (a
   padded zero stays zero). ``conv(x + b, W) = conv(x, W) + sum_{j,k} W[:, j, k] b_j``
   only without padding: at the borders the padded zeros are not shifted by ``b``, so
   the shift is *not* folded into a padded conv. With groups, input channel
   ``g * C/g + j`` meets ``W[m, j]`` for output channels ``m`` of group ``g``.
3. *Fold into a Gemm / MatMul*, for ``a``, ``b`` per feature (last axis):
   ``alpha (a x + b) B + beta C = alpha x (a[:, None] B) + (alpha b B + beta C)``. A 2-D
   MatMul becomes a Gemm to carry the new bias; a higher-rank MatMul takes the shift only
   into a constant ``Add`` right after it.
4. An affine op before a ``Flatten``/``Reshape`` feeding a Gemm/MatMul commutes with it
   (``reshape(a x + b) = reshape(a) reshape(x) + reshape(b)`` with ``a``, ``b``
   broadcast to the unit shape first), so the MNIST-style ``Normalize -> Flatten ->
   Linear`` folds too.

An op is folded only when its output has no other user and is no graph output, and only
within :data:`~dualgraph.ir.FOLD_GAIN` (every partial factor and shift of a chain, every folded
factor): beyond it the values the evaluated network computes between the folded ops could
underflow or overflow where the folded node's magnitudes do not show it. All rewrites are exact
up to float64 rounding; new constants are float64.

*Rounding.* The network as evaluated still runs the original ops, on magnitudes the merged or
folded constants no longer show (``(x - mean) / std`` then ``W``: the folded bias ``c - W mean /
std`` may cancel). Each rewritten node carries a :class:`~dualgraph.ir.FoldedRounding` note for
the rounding allowance: a merged chain ``a_k (...) + b_k`` the magnitude ``B`` with ``B_k = |a_k|
B_{k-1} + |b_k|`` and one rounding per op; a fold into ``W`` the magnitude ``|W| (|b| + B) + |c|``
(carried to its outputs) and the chain's roundings plus :data:`FOLD_ROUNDINGS`.
"""

from __future__ import annotations

import torch

from dualgraph.ir import FOLD_GAIN, FOLDED_ROUNDING, FoldedRounding, Graph, Node, Value, fold_gain, within_fold_gain

from .base import PassResult
from .fold_batchnorm import channel_magnitude, set_input

F64 = torch.float64
LINEAR_OPS = {("", "Conv"), ("", "Gemm"), ("", "MatMul")}
FOLD_ROUNDINGS = 3
"""Roundings a fold adds beyond the ops it absorbs: the op's own rounding of its input, and the
float64 arithmetic of the new constants (far below one float32 rounding of the same magnitudes)."""


NEEDS_SHAPES = True  # reads Value.shape: shapes are re-inferred before it


def run(graph: Graph) -> PassResult:
    """Merge chains of constant affine ops, then fold them into the following linear op."""
    modified = _merge_chains(graph)
    for node in list(graph.nodes):
        while node.op in LINEAR_OPS and _fold_one(graph, node):
            modified = True
    if modified:
        graph.prune_values()
    return PassResult(graph, modified)


def affine_of(node: Node) -> tuple[Value, torch.Tensor, torch.Tensor] | None:
    """``(x, a, b)`` when ``node`` computes ``a * x + b`` elementwise with constant float64
    ``a``, ``b`` that broadcast to one example of ``x`` (never along the batch axis)."""
    if node.op[0] != "" or node.op_type not in ("Add", "Sub", "Mul", "Div", "Neg") or len(node.outputs) != 1:
        return None
    one, zero = torch.ones((), dtype=F64), torch.zeros((), dtype=F64)
    var = [i for i, v in enumerate(node.inputs) if v is not None and not v.is_const]
    if len(var) != 1 or node.inputs[var[0]].shape is None or not node.inputs[var[0]].dtype.is_floating_point:
        return None
    i, x = var[0], node.inputs[var[0]]
    if node.op_type == "Neg":
        return x, -one, zero
    if len(node.inputs) != 2 or node.inputs[1 - i] is None or not node.inputs[1 - i].const.is_floating_point():
        return None
    c, full = node.inputs[1 - i].const.to(F64), (1, *x.shape[1:])
    if c.dim() > len(full) or torch.broadcast_shapes(c.shape, full) != full:
        return None  # would broadcast x to a bigger shape or along the batch axis
    if node.op_type == "Add":
        return x, one, c
    if node.op_type == "Sub":
        return (x, one, -c) if i == 0 else (x, -one, c)
    if node.op_type == "Mul":
        return x, c, zero
    return (x, 1 / c, zero) if i == 0 else None  # c / x is not affine


def _single_use(graph: Graph, v: Value) -> bool:
    return len(v.users) == 1 and v not in graph.outputs


# ---- 1. merge chains ------------------------------------------------------------------

def _merge_chains(graph: Graph) -> bool:
    modified = False
    for start in list(graph.nodes):
        if start not in graph.nodes or affine_of(start) is None:
            continue
        x = affine_of(start)[0]
        if x.producer is not None and affine_of(x.producer) is not None and _single_use(graph, x):
            continue  # not the start of its chain
        chain = [start]
        while _single_use(graph, chain[-1].output) and affine_of(chain[-1].output.users[0]) is not None:
            chain.append(chain[-1].output.users[0])
        a, b = torch.ones((), dtype=F64), torch.zeros((), dtype=F64)
        spread, ops = torch.zeros((), dtype=F64), 0  # B of the module docstring; roundings
        benign = True  # every partial product and shift within FOLD_GAIN (what the note may hide)
        inner, partial = 1.0, 1.0  # the members' own notes' gains; the largest partial product's
        for n in chain:
            _, an, bn = affine_of(n)
            note = FoldedRounding.of(n)
            a, b = a * an, b * an + bn
            spread, ops = spread * an.abs() + bn.abs() + note.magnitude, ops + 1 + note.ops
            inner, partial = inner * note.gain, max(partial, fold_gain(a))
            benign = benign and within_fold_gain(a, spread)
        gain = inner * partial
        if not benign or gain > FOLD_GAIN:
            continue  # e.g. x 2^-148 2^148: the evaluated intermediate underflows; its ops stay
        canon = _canonical(a, b)
        if not canon and (chain[-1].output in graph.outputs or bool((spread != 0).any())):
            # a no-op, but a node must still produce the graph output, or carry the rounding of
            # shifts that cancel (``x + c - c`` is not ``x`` as evaluated)
            canon = [("Mul", a)]
        if [op for op, _ in canon] == [n.op_type for n in chain] or len(chain) == len(canon) == 1:
            continue  # already canonical, or a lone Sub/Div that is as good as Add/Mul
        _rewrite_chain(graph, chain, x, canon)
        chain[-1].meta[FOLDED_ROUNDING] = FoldedRounding(ops + FOLD_ROUNDINGS, spread, gain)  # stands for the chain
        modified = True
    return modified


def _canonical(a: torch.Tensor, b: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The shortest of ``Add, Mul`` / ``Mul, Add`` computing ``a x + b``."""
    ones, zeros = bool((a == 1).all()), bool((b == 0).all())
    if ones:
        return [] if zeros else [("Add", b)]
    if zeros:
        return [("Mul", a)]
    if bool((a != 0).all()):
        return [("Add", b / a), ("Mul", a)]
    return [("Mul", a), ("Add", b)]


def _rewrite_chain(graph: Graph, chain: list[Node], x: Value, canon: list[tuple[str, torch.Tensor]]) -> None:
    """Make the last ``len(canon)`` nodes of ``chain`` compute ``canon`` from ``x``; drop
    the others. The chain's output value (and its name) stays; a lone ``c - x`` needs one
    node more, inserted in front of it."""
    if not canon:
        graph.replace_all_uses(chain[-1].output, x)
        for node in reversed(chain):
            graph.remove_node(node)
        return
    nodes = list(chain)
    while len(nodes) < len(canon):
        node = graph.add_node(canon[0][0], [x])
        node.output.shape, node.output.dtype = x.shape, x.dtype
        graph.move_node(node, before=nodes[0])  # keep the topological order: in front of the chain
        nodes.insert(0, node)
    keep = len(nodes) - len(canon)
    prev = x
    for node, (op, c) in zip(nodes[keep:], canon):
        node.meta.pop(FOLDED_ROUNDING, None)  # the chain's note goes on its last node (the caller's)
        node.op = ("", op)
        set_input(graph, node, 0, prev)
        set_input(graph, node, 1, c, op.lower())
        prev = node.output
    for node in reversed(nodes[:keep]):
        graph.remove_node(node)


# ---- 2.-4. fold into the next linear op -----------------------------------------------

def _fold_one(graph: Graph, op: Node) -> bool:
    """Absorb the affine op (or commute it past the reshape) producing ``op``'s data input."""
    z = op.inputs[0]
    p = z.producer
    if (p is None or not _single_use(graph, z) or len(op.inputs) < 2 or op.inputs[1] is None
            or not all(v is None or v.is_const for v in op.inputs[1:])):
        return False
    if op.op_type != "Conv" and (op.attrs.get("transA", 0) or op.inputs[1].const.dim() != 2):
        return False  # only ``x @ W`` with a 2-D W takes a per-feature scale into W
    if p.op in (("", "Flatten"), ("", "Reshape")) and op.op_type != "Conv":
        return _commute_reshape(graph, p)
    aff = affine_of(p)
    if aff is None:
        return False
    x, a, b = aff
    scale, shift = not bool((a == 1).all()), not bool((b == 0).all())
    if scale and shift:
        return False  # e.g. ``c - x``; the chain merge splits such ops into two
    gain = FoldedRounding.of(op).gain * max(FoldedRounding.of(p).gain, fold_gain(a))
    if not within_fold_gain(a, b.abs() + FoldedRounding.of(p).magnitude) or gain > FOLD_GAIN:
        return False  # the evaluated a x (+ b) could leave the range the rounding note covers
    axis = 1 if op.op_type == "Conv" else len(z.shape) - 1
    vec = _along(a if scale else b, z.shape, axis)
    if vec is None:
        return False
    note = FoldedRounding.of(p)
    carried = _along(b.abs() + note.magnitude, z.shape, axis)  # what x' may hold beyond |a x|
    if carried is None:  # varies within a channel: its largest entry for all
        carried = torch.full((z.shape[axis],), float((b.abs() + note.magnitude).max()), dtype=F64)
    folded = (_fold_conv if op.op_type == "Conv" else _fold_gemm)(graph, op, vec, scale, carried,
                                                                  note.ops + FOLD_ROUNDINGS, gain)
    if folded:
        set_input(graph, op, 0, x)
        graph.remove_node(p)
    return folded


def _along(t: torch.Tensor, shape: tuple, axis: int) -> torch.Tensor | None:
    """``t`` as a vector along ``axis`` of one example of ``shape``; None if it varies elsewhere."""
    full = torch.broadcast_to(t, (1, *shape[1:])).movedim(axis, 0).reshape(shape[axis], -1)
    return full[:, 0].clone() if bool((full == full[:, :1]).all()) else None


def _fold_conv(graph: Graph, conv: Node, vec: torch.Tensor, scale: bool, carried: torch.Tensor, ops: int,
               gain: float) -> bool:
    w = conv.inputs[1].const.to(F64)
    m, cg, g = w.shape[0], w.shape[1], int(conv.attrs.get("group", 1))
    if vec.numel() != cg * g:
        return False
    # vec[c] for input channel c, laid out like W: row m uses channels of group m // (M/g)
    def laid_out(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(g, 1, cg).expand(g, m // g, cg).reshape(m, cg, *[1] * (w.dim() - 2))

    per_w = laid_out(vec)
    bias = conv.const_input(2)
    bias = torch.zeros(m, dtype=F64) if bias is None else bias.to(F64)
    padded = any(conv.attrs.get("pads", [])) or conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")
    if not scale and padded:
        return False  # not exact at the borders, see the module docstring
    # the rounding note, in the old weights' terms (see the module docstring)
    note = FoldedRounding.of(conv)
    magnitude = ((w.abs() * laid_out(carried)).sum(dim=tuple(range(1, w.dim()))) + bias.abs()
                 + channel_magnitude(note, m))
    conv.meta[FOLDED_ROUNDING] = FoldedRounding(note.ops + ops, magnitude.reshape(m, *[1] * (w.dim() - 2)), gain)
    if scale:
        set_input(graph, conv, 1, w * per_w, "weight")
        return True
    set_input(graph, conv, 2, bias + (w * per_w).sum(dim=tuple(range(1, w.dim()))), "bias")
    return True


def _fold_gemm(graph: Graph, op: Node, vec: torch.Tensor, scale: bool, carried: torch.Tensor, ops: int,
               gain: float) -> bool:
    w = op.inputs[1].const.to(F64)
    trans_b = bool(op.attrs.get("transB", 0))
    w_kn = w.t() if trans_b else w  # [K, N_out]
    alpha = float(op.attrs.get("alpha", 1.0))
    note = FoldedRounding.of(op)
    # the rounding note, in the old weights' terms (see the module docstring)
    magnitude = abs(alpha) * (carried @ w_kn.abs()) + channel_magnitude(note, w_kn.shape[1])
    if scale:  # the bias is unchanged: its |c| is in the node's own T
        op.meta[FOLDED_ROUNDING] = FoldedRounding(note.ops + ops, magnitude, gain)
        w_kn = vec[:, None] * w_kn
        set_input(graph, op, 1, (w_kn.t() if trans_b else w_kn).contiguous(), "weight")
        return True
    shift = alpha * (vec @ w_kn)  # [N_out]
    if op.op_type == "MatMul" and len(op.inputs[0].shape) != 2:
        return _shift_following_add(graph, op, shift, FoldedRounding(note.ops + ops, magnitude, gain))
    c = op.const_input(2) if op.op_type == "Gemm" else None
    if c is not None and torch.broadcast_shapes(c.shape, (1, shift.numel())) != (1, shift.numel()):
        return False
    c = torch.zeros_like(shift) if c is None else c.to(F64).reshape(-1) * float(op.attrs.get("beta", 1.0))
    if op.op_type == "MatMul":
        op.op, op.attrs = ("", "Gemm"), {}  # same function for a 2-D input, and it has a bias
    set_input(graph, op, 2, c + shift, "bias")
    op.attrs["beta"] = 1.0
    op.meta[FOLDED_ROUNDING] = FoldedRounding(note.ops + ops, magnitude + c.abs(), gain)
    return True


def _shift_following_add(graph: Graph, op: Node, shift: torch.Tensor, note: FoldedRounding) -> bool:
    """Add ``shift`` to the constant of an ``Add`` that alone consumes ``op``'s output; ``note``:
    ``op``'s rounding note for the fold, to which the Add's old constant is added (``op``'s output
    magnitude then covers what the Add adds as evaluated)."""
    y = op.output
    add = y.users[0] if _single_use(graph, y) else None
    aff = affine_of(add) if add is not None and add.op_type == "Add" else None
    if aff is None or _along(aff[2], y.shape, len(y.shape) - 1) is None:
        return False
    old = _along(aff[2], y.shape, len(y.shape) - 1)
    set_input(graph, add, 1, old + shift, "bias")
    set_input(graph, add, 0, y)
    op.meta[FOLDED_ROUNDING] = FoldedRounding(note.ops, note.magnitude + old.abs(), note.gain)
    return True


def _commute_reshape(graph: Graph, reshape: Node) -> bool:
    """``reshape(a x + b) -> a' reshape(x) + b'`` for a pure scale or pure shift."""
    w, z = reshape.inputs[0], reshape.output
    q = w.producer
    aff = affine_of(q) if q is not None and _single_use(graph, w) else None
    if aff is None or z.shape is None or not all(v is None or v.is_const for v in reshape.inputs[1:]):
        return False
    x, a, b = aff
    if not (a == 1).all() and not (b == 0).all():
        return False
    op, t = ("Add", b) if (a == 1).all() else ("Mul", a)
    t = torch.broadcast_to(t, (1, *w.shape[1:])).reshape(1, *z.shape[1:]).clone()
    if _along(t, z.shape, len(z.shape) - 1) is None:
        return False  # would not fold after the move either
    (consumer,) = z.users
    note = q.meta.get(FOLDED_ROUNDING)
    if note is not None:  # q now computes in the reshaped units
        q.meta[FOLDED_ROUNDING] = FoldedRounding(note.ops, torch.broadcast_to(
            note.magnitude, (1, *w.shape[1:])).reshape(1, *z.shape[1:])[0].clone(), note.gain)
    set_input(graph, reshape, 0, x)
    q.op = ("", op)
    set_input(graph, q, 0, z)
    set_input(graph, q, 1, t, op.lower())
    set_input(graph, consumer, consumer.inputs.index(z), w)
    w.shape = z.shape
    graph.move_node(q, after=reshape)  # q now reads the reshape's output
    return True
