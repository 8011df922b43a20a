"""Elementwise arithmetic: Add, Sub, Mul, Div, Neg (numpy broadcasting; exact dual layers).

Add and Sub may combine two variables; Mul and Div are affine only with a constant operand
(the divisor, for Div), and their dual layers refuse anything else.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from ..dual_registry import DualStep
from ..ir import Value
from ..linalg import batched_dot
from ..lowering import Call, Unsupported, Var
from ..op_registry import SAME, define_op, random_const, var
from .common import ElementwiseAffineDual, fx_unary, onnx_elementwise, require_const, sum_to_unit


def _onnx_binary(ctx, n):
    return [ctx.binary(n, n.op, n.ins[0], n.ins[1], n.outs, (n.in_names[0], n.in_names[1]))]


def _check_broadcast(lo, x: Value, c: Any) -> None:
    """A constant operand must broadcast over the batch, never against it."""
    if not isinstance(c, torch.Tensor):
        return
    # Right-aligned broadcasting: the constant's axes at or before the batch axis must be 1.
    leading = c.shape[:max(0, c.dim() - lo.rank(x) + 1)]
    if any(d != 1 for d in leading):
        raise Unsupported(f"constant of shape {tuple(c.shape)} broadcasts against the batch dimension")


def _fx_binary(op_type: str, commutative: bool):
    def rule(lo, call: Call):
        a, b = call.arg(0, "input"), call.arg(1, "other")
        if call.kwargs.get("rounding_mode") is not None:
            raise Unsupported("rounding_mode")
        alpha = call.kwargs.get("alpha", 1)
        if alpha != 1:  # torch.add(a, b, alpha=k) = a + k * b
            b = lo.emit("Mul", [b, float(alpha)], hint=f"{lo.node_name}_alpha") if isinstance(b, Value) else b * alpha
        if not isinstance(a, Value) and commutative:  # keep the variable first: c + x -> x + c
            a, b = b, a
        variable = a if isinstance(a, Value) else b
        for operand in (a, b):
            if not isinstance(operand, Value):
                _check_broadcast(lo, variable, lo.constant(operand, "operand"))
        return lo.emit(op_type, [a, b])
    rule.__name__ = f"lower_{op_type.lower()}"
    return rule


# ---- Add ---------------------------------------------------------------------------------------------

add = define_op("Add")
add.evaluate(lambda node, inputs: inputs[0] + inputs[1])


@add.dual
class AddDual(ElementwiseAffineDual):
    adds_into_producer_sum = True


add.onnx_import(_onnx_binary)
add.fx_lowering(operator.add, operator.iadd, torch.add, "add")(_fx_binary("Add", commutative=True))
add.example(var(3), random_const(3, seed=18))
add.example(random_const(1, 3, seed=19), var(2, 3))
add.example(var(3), var(3))
add.example(var(3), SAME)


# ---- Sub ---------------------------------------------------------------------------------------------

sub = define_op("Sub")
sub.evaluate(lambda node, inputs: inputs[0] - inputs[1])


@sub.dual
class SubDual(ElementwiseAffineDual):
    adds_into_producer_sum = True

    def abs_linear(self, node, xs, bounds, config):
        return self.eval_with_abs_constants(node, xs, ("", "Add"))  # |a - b| <= |a| + |b|


sub.onnx_import(_onnx_binary)
sub.fx_lowering(operator.sub, operator.isub, torch.sub, torch.subtract, "sub")(_fx_binary("Sub", commutative=False))
sub.example(var(3), random_const(3, seed=20))
sub.example(random_const(3, seed=21), var(3))
sub.example(var(2, 2), var(2, 2))


# ---- Mul: affine with a constant operand, bilinear (McCormick) with two variables --------------------

mul = define_op("Mul")
mul.evaluate(lambda node, inputs: inputs[0] * inputs[1])


def _product_planes(bounds):
    """The two operands' bounds broadcast to the output, and the midpoint McCormick planes of
    ``x y`` on the box: slopes ``(c_y, c_x)`` (the bounds' midpoints) and offsets
    ``lo <= x y - c_y x - c_x y <= up`` with ``lo = -(l_x l_y + u_x u_y) / 2`` and
    ``up = -(l_x u_y + u_x l_y) / 2`` (each the mean of two McCormick planes)."""
    (lx, ux), (ly, uy) = bounds
    shape = torch.broadcast_shapes(lx.shape, ly.shape)
    lx, ux, ly, uy = (t.expand(shape) for t in (lx, ux, ly, uy))
    return (ly + uy) / 2, (lx + ux) / 2, -(lx * ly + ux * uy) / 2, -(lx * uy + ux * ly) / 2


@mul.dual
class MulDual(ElementwiseAffineDual):
    """``x * c``: exact (the adjoint). ``x * y`` of two variables: bounded between two parallel
    planes on the operands' box, the midpoints of the McCormick envelope, so the dual layer is
    linear: ``lam_x = lam c_y``, ``lam_y = lam c_x``, offsets ``lam . mid -/+ |lam| . gap``."""

    def bounds_needed(self, node) -> bool:
        return sum(1 for v in node.inputs[:2] if v is not None and not v.is_const) == 2

    def constant_factor(self, node):
        consts = [v.const for v in node.inputs[:2] if v is not None and v.is_const]
        return consts[0] if len(consts) == 1 and len(node.var_inputs) == 1 else None

    def backward(self, node, lam, bounds, config):
        if not self.bounds_needed(node):
            return super().backward(node, lam, bounds, config)
        cy, cx, lo, up = _product_planes(bounds)
        mid, gap = (lo + up) / 2, (up - lo) / 2
        linear, absolute = batched_dot(lam, mid), batched_dot(lam.abs(), gap)
        lam_in = [sum_to_unit(lam * cy.unsqueeze(1), node.inputs[0].unit_shape),
                  sum_to_unit(lam * cx.unsqueeze(1), node.inputs[1].unit_shape)]
        return DualStep(lam_in, linear - absolute, linear + absolute)

    # rounding facts of the product: |A| x = |c_y| x + |c_x| y, constants max(|lo|, |up|), |x y| <= m_x m_y
    def abs_linear(self, node, xs, bounds, config):
        if not self.bounds_needed(node):
            return super().abs_linear(node, xs, bounds, config)
        cy, cx, _, _ = _product_planes(bounds)
        return [cy.abs() * xs[0] + cx.abs() * xs[1]]

    def constant_magnitude(self, node, m_in, bounds, config):
        if not self.bounds_needed(node):
            return super().constant_magnitude(node, m_in, bounds, config)
        _, _, lo, up = _product_planes(bounds)
        return [torch.maximum(lo.abs(), up.abs())]

    def output_magnitude(self, node, m_in, bounds, config, terms):
        if not self.bounds_needed(node):
            return terms
        return [m_in[0] * m_in[1]]

    def eval_length(self, node, bounds, config):
        return 1 if self.bounds_needed(node) else super().eval_length(node, bounds, config)

    def dual_length(self, node, bounds, config):
        if not self.bounds_needed(node):
            return super().dual_length(node, bounds, config)
        return node.output.numel + 2  # lam . mid and |lam| . gap sum over the outputs


mul.onnx_import(_onnx_binary)
mul.fx_lowering(operator.mul, operator.imul, torch.mul, torch.multiply, "mul")(_fx_binary("Mul", commutative=True))
mul.example(var(3), random_const(3, seed=22))
mul.example(random_const(3, seed=23), var(2, 3))
mul.example(var(2, 2), torch.tensor(-2.5, dtype=torch.float64))
mul.example(var(4), var(4))
mul.example(var(2, 3), var(1, 3))
mul.example(var(3), SAME)


# ---- Div (constant divisor) --------------------------------------------------------------------------

div = define_op("Div")
div.evaluate(lambda node, inputs: inputs[0] / inputs[1])


@div.dual
class DivDual(ElementwiseAffineDual):
    """``x / c``. The frontends write ``x / y`` with a computed divisor as ``x * (1 / y)``
    (Reciprocal, then a product), so a Div node always has a constant divisor."""

    def backward(self, node, lam, bounds, config):
        require_const(node, 1)
        return super().backward(node, lam, bounds, config)

    def constant_factor(self, node):
        divisor = node.inputs[1]
        return 1 / divisor.const if divisor is not None and divisor.is_const else None


@div.onnx_import
def _(ctx, n):
    x, y = n.ins[0], n.ins[1]
    if isinstance(y, Var):  # a computed divisor: x * reciprocal(y)
        r = ctx.emit(n, "Reciprocal", [y.value], {}, y.added, None)[0]
        return [ctx.binary(n, "Mul", x, r, n.outs)]
    return _onnx_binary(ctx, n)


_fx_div = _fx_binary("Div", commutative=False)


@div.fx_lowering(operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div")
def _(lo, call: Call):
    b = call.arg(1, "other")
    if isinstance(b, Value) and call.kwargs.get("rounding_mode") is None:  # a computed divisor
        r = lo.emit("Reciprocal", [b], hint=f"{lo.node_name}_reciprocal")
        return lo.emit("Mul", [call.arg(0, "input"), r] if isinstance(call.arg(0, "input"), Value) else [r, call.arg(0, "input")])
    return _fx_div(lo, call)
div.example(var(3), torch.tensor([1.7, -0.9, 2.3], dtype=torch.float64))
div.example(var(2, 2), torch.tensor(4.0, dtype=torch.float64))


# ---- Neg ---------------------------------------------------------------------------------------------

neg = define_op("Neg")
neg.evaluate(lambda node, inputs: -inputs[0])


@neg.dual
class NegDual(ElementwiseAffineDual):
    def abs_linear(self, node, xs, bounds, config):
        return [xs[0]]


neg.onnx_import(onnx_elementwise)
neg.fx_lowering(operator.neg, torch.neg, "neg")(fx_unary("Neg"))
neg.example(var(2, 2))
