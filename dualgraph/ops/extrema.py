"""Elementwise Max and Min of two operands (variables, or a variable and a constant).

``max(x, y) = y + relu(d)`` with ``d = x - y`` in ``[l_x - u_y, u_x - l_y]``, so ReLU's
relaxation of ``d`` gives (``s`` the upper slope, ``lam`` the lower one, ``b = -s l_d`` on
crossing units)::

    lam x + (1 - lam) y  <=  max(x, y)  <=  s x + (1 - s) y + b

``lam = s`` with ``relu_relaxation="paper"`` (equal slopes: a linear dual layer), CROWN's
``lam = [u_d > -l_d]`` otherwise; stable units are exact. ``min(x, y) = -max(-x, -y)``.
Broadcasting follows ONNX (numpy); the adjoint sums over broadcast axes.
"""

from __future__ import annotations

import functools

import torch

from ..dual_registry import DualRule, DualStep, const_args
from ..errors import UnsupportedOpError
from ..ir import Value
from ..linalg import batched_dot
from ..lowering import Call, Unsupported
from ..op_registry import SAME, define_op, random_const, var
from .common import sum_to_unit


class ExtremumDual(DualRule):
    """Dual layer of ``max`` (``sign = 1``) or ``min`` (``sign = -1``) of two operands."""

    needs_bounds = True

    def __init__(self, sign: int) -> None:
        self.sign = sign

    def linear(self, node, config) -> bool:
        return config.relu_relaxation == "paper"

    def _operands(self, node, bounds, like: torch.Tensor):
        """``(lower, upper, is_variable)`` of both operands, negated for min, broadcast to the output."""
        if len(node.inputs) != 2:
            raise UnsupportedOpError(f"node '{node.name}' ({node.op_type}) has {len(node.inputs)} inputs; the dual "
                                     "layer takes two (the ONNX frontend splits longer ones)")
        args = const_args(node, like)
        it = iter(bounds)
        out = []
        for v, a in zip(node.inputs, args):
            lo, hi, is_var = (a, a, False) if v.is_const else (*next(it), True)
            if self.sign < 0:
                lo, hi = -hi, -lo
            out.append((lo, hi, is_var))
        shape = torch.broadcast_shapes(*(t.shape for lo, hi, _ in out for t in (lo, hi)))
        return [(lo.expand(shape), hi.expand(shape), is_var) for lo, hi, is_var in out]

    def _slopes(self, node, bounds, config, like):
        (lx, ux, x_var), (ly, uy, y_var) = self._operands(node, bounds, like)
        l_d, u_d = lx - uy, ux - ly
        cross = (l_d < 0) & (u_d > 0)
        s = torch.where(cross, u_d / torch.where(cross, u_d - l_d, 1.0), (l_d >= 0).to(l_d.dtype))
        b_up = torch.where(cross, -s * l_d, 0.0)
        lower = s if self.linear(node, config) else torch.where(cross, (u_d > -l_d).to(l_d.dtype), s)
        return (lx, x_var), (ly, y_var), lower, s, b_up

    def backward(self, node, lam, bounds, config) -> DualStep:
        lam_s = lam * self.sign                      # bound (sign * lam) . max(sign x, sign y)
        (cx, x_var), (cy, y_var), lower, s, b_up = self._slopes(node, bounds, config, lam)
        pos, neg = lam_s.clamp(min=0), lam_s.clamp(max=0)
        coef_x = pos * lower.unsqueeze(1) + neg * s.unsqueeze(1)
        coef_y = pos * (1 - lower).unsqueeze(1) + neg * (1 - s).unsqueeze(1)
        low = batched_dot(neg, b_up)
        up = batched_dot(pos, b_up) if self.linear(node, config) else None
        lam_in = []
        for coef, c, is_var, v in ((coef_x, cx, x_var, node.inputs[0]), (coef_y, cy, y_var, node.inputs[1])):
            if is_var:
                lam_in.append(sum_to_unit(coef * self.sign, v.unit_shape))
            else:                                    # a constant operand: its term is an offset
                term = batched_dot(coef, c)
                low = low + term
                up = up + term if up is not None else None
        return DualStep(lam_in, low, up)

    # rounding facts: every coefficient is in [0, 1], the offsets are s * |l_d| and the constant
    def abs_linear(self, node, xs, bounds, config):
        shape = (xs[0].shape[0], *node.output.unit_shape)
        return [sum(x.expand(shape) for x in xs)]

    def constant_magnitude(self, node, m_in, bounds, config):
        like = bounds[0].lower
        (cx, x_var), (cy, y_var), _, _, b_up = self._slopes(node, bounds, config, like)
        consts = [c.abs() for c, is_var in ((cx, x_var), (cy, y_var)) if not is_var]
        return [b_up.abs() + sum(consts)]

    def output_magnitude(self, node, m_in, bounds, config, terms):
        return terms

    def eval_length(self, node, bounds, config):
        return 0

    def dual_length(self, node, bounds, config):
        out = node.output.numel
        return max(out // max(1, v.numel) for v in node.var_inputs) + out + 2


def _onnx_extremum(ctx, n):
    """Max/Min of any number of operands: a chain of two-operand nodes."""
    refs = [r for r in n.ins if r is not None]
    if len(refs) == 1:
        x = ctx.var(n, 0)
        return ctx.emit(n, "Identity", [x.value], {}, x.added, n.outs)
    y = refs[0]
    for k, r in enumerate(refs[1:], start=2):
        y = ctx.binary(n, n.op, y, r, n.outs if k == len(refs) else None)
    return [y]


def _fx_extremum(op_type: str):
    def rule(lo, call: Call):
        other = call.arg(1, "other", None)
        if other is None:
            raise Unsupported("the reduction form (give two tensors)")
        a, b = call.arg(0, "input"), other
        return lo.emit(op_type, [a, b] if isinstance(a, Value) else [b, a])  # max and min commute
    rule.__name__ = f"lower_{op_type.lower()}"
    return rule


for _op_type, _sign, _torch_fn, _targets in (("Max", 1, torch.maximum, (torch.maximum, torch.fmax, "maximum")),
                                              ("Min", -1, torch.minimum, (torch.minimum, torch.fmin, "minimum"))):
    _op = define_op(_op_type)
    _op.evaluate(lambda node, inputs, fn=_torch_fn: functools.reduce(fn, inputs))
    _op.dual(ExtremumDual(_sign))
    _op.onnx_import(_onnx_extremum)
    _op.fx_lowering(*_targets)(_fx_extremum(_op_type))
    _op.example(var(5), var(5))
    _op.example(var(2, 3), var(1, 3))
    _op.example(var(4), random_const(4, seed=40))
    _op.example(var(3), SAME)
