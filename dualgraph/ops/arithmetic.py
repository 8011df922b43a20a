"""Elementwise arithmetic: Add, Sub, Mul, Div, Neg (numpy broadcasting; exact dual layers).

Add and Sub may combine two variables; Mul and Div are affine only with a constant operand
(the divisor, for Div), and their dual layers refuse anything else.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from ..ir import Value
from ..lowering import Call, Unsupported
from ..op_registry import SAME, define_op, random_const, var
from .common import ElementwiseAffineDual, fx_unary, onnx_elementwise, require_const


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
    pass


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
    def abs_linear(self, node, xs, bounds, config):
        return self.eval_with_abs_constants(node, xs, ("", "Add"))  # |a - b| <= |a| + |b|


sub.onnx_import(_onnx_binary)
sub.fx_lowering(operator.sub, operator.isub, torch.sub, torch.subtract, "sub")(_fx_binary("Sub", commutative=False))
sub.example(var(3), random_const(3, seed=20))
sub.example(random_const(3, seed=21), var(3))
sub.example(var(2, 2), var(2, 2))


# ---- Mul (one constant operand) ----------------------------------------------------------------------

mul = define_op("Mul")
mul.evaluate(lambda node, inputs: inputs[0] * inputs[1])


@mul.dual
class MulDual(ElementwiseAffineDual):
    def backward(self, node, lam, bounds, config):
        if len(node.var_inputs) != 1:
            require_const(node, 0, 1)
        return super().backward(node, lam, bounds, config)


mul.onnx_import(_onnx_binary)
mul.fx_lowering(operator.mul, operator.imul, torch.mul, torch.multiply, "mul")(_fx_binary("Mul", commutative=True))
mul.example(var(3), random_const(3, seed=22))
mul.example(random_const(3, seed=23), var(2, 3))
mul.example(var(2, 2), torch.tensor(-2.5, dtype=torch.float64))


# ---- Div (constant divisor) --------------------------------------------------------------------------

div = define_op("Div")
div.evaluate(lambda node, inputs: inputs[0] / inputs[1])


@div.dual
class DivDual(ElementwiseAffineDual):
    def backward(self, node, lam, bounds, config):
        require_const(node, 1)
        return super().backward(node, lam, bounds, config)


div.onnx_import(_onnx_binary)
div.fx_lowering(operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div")(
    _fx_binary("Div", commutative=False))
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
