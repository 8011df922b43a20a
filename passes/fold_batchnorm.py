"""Fold an inference-mode BatchNormalization into the Conv / Gemm / MatMul before it.

Math: at inference ``BN(y) = s * y + t`` per channel (axis 1), with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``. If ``y = W * x + b`` is a
Conv (``W`` of shape ``[M, C/g, k...]``, output channel first) then
``BN(y) = W' * x + b'`` with ``W' = W * s[:, None, ...]`` and ``b' = (b - mean) * s + beta``.
For ``Gemm`` (``alpha A B' + beta C``) the columns of ``B'`` are scaled by ``s`` and the
new bias is ``C' = beta C s + t`` (with ``beta`` set to 1); a 2-D ``MatMul`` becomes such a
Gemm. The rewrite is exact; new parameters are computed in float64.

The network as evaluated still computes ``y`` and then the BN, on magnitudes the folded bias
no longer shows (``b - mean`` cancels): the folded node carries a
:class:`~dualgraph.ir.FoldedRounding` note, ``|s| (|b| + |mean|) + |beta|`` per channel (plus
the producer's own note, scaled) and 8 roundings more (the BN's four operations, its factor's
three, the fold's float64 arithmetic), which the rounding allowance adds to the node's.

Folded only when the BN's input has no other user (and is no graph output): with a
fan-out (a residual block) the unnormalised value is still needed elsewhere. Other BNs
(first layer, after an Add) stay as they are: they are affine and have their own exact
dual layer.
"""

from __future__ import annotations

import torch

from dualgraph.ir import FOLD_GAIN, FOLDED_ROUNDING, FoldedRounding, Graph, Node, Value, fold_gain, within_fold_gain

from .base import PassResult


NEEDS_SHAPES = True  # reads Value.shape: shapes are re-inferred before it


def run(graph: Graph) -> PassResult:
    """Fold every BatchNormalization whose input is the sole output use of a Conv/Gemm/MatMul."""
    modified = False
    for bn in list(graph.nodes):
        if bn.op != ("", "BatchNormalization") or not _fold(graph, bn):
            continue
        y, out = bn.inputs[0], bn.outputs[0]
        is_output = out in graph.outputs
        graph.replace_all_uses(out, y)
        graph.remove_node(bn)
        if is_output:
            graph.rename(y, out.name)
        modified = True
    if modified:
        graph.prune_values()
    return PassResult(graph, modified)


def _fold(graph: Graph, bn: Node) -> bool:
    """Rewrite the producer of ``bn``'s input to include the BN; False if not applicable."""
    y, params = bn.inputs[0], bn.inputs[1:5]
    prod = y.producer
    if prod is None or len(y.users) != 1 or y in graph.outputs or len(prod.outputs) != 1:
        return False  # the un-normalised value is needed elsewhere (e.g. a residual branch)
    if bn.attrs.get("training_mode", 0) or any(o.users or o in graph.outputs for o in bn.outputs[1:]):
        return False  # training mode: batch statistics, not an affine map
    if len(params) != 4 or not all(p is not None and p.is_const for p in params):
        return False
    if len(prod.inputs) < 2 or prod.inputs[1] is None or not all(v is None or v.is_const for v in prod.inputs[1:]):
        return False
    gamma, beta, mean, var = (p.const.to(torch.float64).reshape(-1) for p in params)
    beta, mean = beta.expand_as(gamma), mean.expand_as(gamma)
    s = gamma / torch.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    t = beta - mean * s
    if not within_fold_gain(s) or FoldedRounding.of(prod).gain * fold_gain(s) > FOLD_GAIN:
        return False  # (y - mean) as evaluated could exceed FOLD_GAIN times the folded node's magnitudes
    if prod.op == ("", "Conv"):
        w = prod.inputs[1].const.to(torch.float64)
        if w.shape[0] != s.numel():
            return False
        b = prod.const_input(2)
        b = torch.zeros_like(s) if b is None else b.to(torch.float64)
        set_input(graph, prod, 1, w * s.reshape(-1, *[1] * (w.dim() - 1)), "weight")
        set_input(graph, prod, 2, b * s + t, "bias")
        _note_fold(prod, s, b, beta, mean, [1] * (w.dim() - 2))
        return True
    matmul_2d = (prod.op == ("", "MatMul") and len(prod.inputs[0].shape or ()) == 2
                 and prod.inputs[1].const.dim() == 2)
    if matmul_2d or (prod.op == ("", "Gemm") and not prod.attrs.get("transA", 0)):
        trans_b = bool(prod.attrs.get("transB", 0))
        w = prod.inputs[1].const.to(torch.float64)
        c = prod.const_input(2)
        if w.shape[0 if trans_b else 1] != s.numel() or (
                c is not None and torch.broadcast_shapes(c.shape, (1, s.numel())) != (1, s.numel())):
            return False  # wrong width, or a bias that varies along the batch axis
        c = torch.zeros_like(s) if c is None else c.to(torch.float64).reshape(-1).expand(s.numel())
        c = c * float(prod.attrs.get("beta", 1.0))
        if matmul_2d:  # a 2-D MatMul is a Gemm without bias; the Gemm can carry the new one
            prod.op, prod.attrs = ("", "Gemm"), {}
        set_input(graph, prod, 1, w * (s[:, None] if trans_b else s[None, :]), "weight")
        set_input(graph, prod, 2, c * s + t, "bias")
        prod.attrs["beta"] = 1.0
        _note_fold(prod, s, c, beta, mean, [])
        return True
    return False


BN_ROUNDINGS = 8
"""Roundings of an evaluated BN beyond its producer's: ``(y - mean) * s + beta`` with ``s`` from
``gamma / sqrt(var + eps)`` (4 + 3), and one for the fold's float64 arithmetic (its constants'
error is far below one float32 rounding of the same magnitudes)."""


def channel_magnitude(note: FoldedRounding, channels: int) -> torch.Tensor:
    """A note's magnitude per output channel ``[channels]`` (its largest entry where it varies otherwise)."""
    mag = note.magnitude.to(torch.float64)
    return mag.reshape(-1).clone() if mag.numel() == channels else mag.max().expand(channels).clone()


def _note_fold(prod: Node, s: torch.Tensor, bias: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor,
               trailing: list[int]) -> None:
    """The :class:`FoldedRounding` of ``prod`` after a BN folded into it (module docstring)."""
    note = FoldedRounding.of(prod)
    magnitude = s.abs() * (bias.abs() + channel_magnitude(note, s.numel()) + mean.abs()) + beta.abs()
    prod.meta[FOLDED_ROUNDING] = FoldedRounding(note.ops + BN_ROUNDINGS, magnitude.reshape(-1, *trailing),
                                                note.gain * fold_gain(s))


def set_input(graph: Graph, node: Node, index: int, tensor: torch.Tensor | Value, hint: str = "const") -> Value:
    """Make input ``index`` of ``node`` read ``tensor`` (a new constant) or a value.

    A new constant is created rather than the old one edited, since constants can be
    shared by several nodes.
    """
    value = tensor if isinstance(tensor, Value) else graph.add_const(graph.fresh_name(f"{node.name}_{hint}"), tensor)
    graph.set_input(node, index, value)
    return value
