"""Activations that ONNX and torch name as one op but dualgraph bounds as a composition of ops it
has dual layers for (and so certifies with their relaxations, each sound):

* ``HardSigmoid(x) = clip(alpha x + beta, 0, 1)`` (ONNX defaults alpha 0.2, beta 0.5; torch's
  ``nn.Hardsigmoid`` alpha 1/6);
* ``HardSwish(x) = x * HardSigmoid_{1/6, 1/2}(x)``, a product of two variables (bilinear Mul);
* ``Elu(x) = relu(x) + alpha (exp(min(x, 0)) - 1)``, and ``Selu(x) = gamma Elu_alpha(x)``;
* ``PRelu(x) = relu(x) - slope * relu(-x)`` with a constant slope per channel;
* ``Gelu(x) = x * 0.5 (1 + erf(x / sqrt 2))`` (or its tanh form), as torch's ONNX export before
  opset 20 writes it (from opset 20 on, one Gelu node).

Each composition is written once, as a function of two callbacks: ``emit(op, inputs, hint)``
appends a node and returns its output value (``hint`` None: the op's final node) and
``const(value)`` makes a float64 constant (cast to the model's precision when run). The
ONNX import and the torch.fx lowering of an op both emit through it (:func:`onnx_emitters`,
:func:`fx_emitters`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DualgraphError, UnsupportedOpError
from ..lowering import Call, Unsupported, Var
from ..op_registry import define_op

Emit = Callable[[str, list, "str | None"], Any]

SELU_ALPHA = 1.6732632423543772
SELU_GAMMA = 1.0507009873554805


def hard_sigmoid_nodes(x, emit: Emit, const: Callable, alpha: float = 0.2, beta: float = 0.5, final: bool = True):
    line = emit("Add", [emit("Mul", [x, const(alpha)], "scale"), const(beta)], "shift")
    return emit("Clip", [line, const(0.0), const(1.0)], None if final else "clip")


def hard_swish_nodes(x, emit: Emit, const: Callable):
    return emit("Mul", [x, hard_sigmoid_nodes(x, emit, const, 1 / 6, 0.5, final=False)], None)


def elu_nodes(x, emit: Emit, const: Callable, alpha: float = 1.0, gamma: float | None = None):
    """``relu(x) + alpha (exp(min(x, 0)) - 1)``, times ``gamma`` when given (SELU)."""
    negative = emit("Add", [emit("Exp", [emit("Min", [x, const(0.0)], "negative")], "exp"), const(-1.0)], "expm1")
    total = emit("Add", [emit("Relu", [x], "relu"), emit("Mul", [negative, const(alpha)], "alpha")],
                 None if gamma is None else "elu")
    return total if gamma is None else emit("Mul", [total, const(gamma)], None)


def prelu_nodes(x, slope, emit: Emit):
    """``relu(x) - slope * relu(-x)``; ``slope`` a constant broadcasting against ``x`` (the
    ONNX import places it itself, at the node with hint ``"slope"``)."""
    below = emit("Mul", [emit("Relu", [emit("Neg", [x], "neg")], "relu_neg"), slope], "slope")
    return emit("Sub", [emit("Relu", [x], "relu"), below], None)


def gelu_nodes(x, approximate: str, emit: Emit, const: Callable):
    """``x * 0.5 (1 + erf(x / sqrt 2))``, or with ``approximate='tanh'``,
    ``x * 0.5 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``: the product of ``x`` with a
    function of ``x`` is a bilinear Mul."""
    if approximate == "none":
        inner = emit("Erf", [emit("Mul", [x, const(1 / math.sqrt(2))], "scale")], "erf")
    elif approximate == "tanh":
        cube = emit("Pow", [x, const(3.0)], "cube")
        poly = emit("Add", [x, emit("Mul", [cube, const(0.044715)], "c3")], "poly")
        inner = emit("Tanh", [emit("Mul", [poly, const(math.sqrt(2 / math.pi))], "s")], "tanh")
    else:
        raise Unsupported(f"approximate={approximate!r}")
    half = emit("Mul", [emit("Add", [inner, const(1.0)], "one"), const(0.5)], "half")
    return emit("Mul", [x, half], None)


# ---- the two frontends --------------------------------------------------------------------------------

def fx_emitters(lo) -> tuple[Emit, Callable]:
    """``(emit, const)`` for the torch.fx lowerer ``lo`` (helper nodes named after the call)."""
    name = lo.node_name

    def emit(op: str, inputs: list, hint: str | None):
        return lo.emit(op, inputs) if hint is None else lo.emit(op, inputs, hint=f"{name}_{hint}")
    return emit, lambda value: torch.tensor(value, dtype=torch.float64)


def onnx_emitters(ctx, n, x) -> tuple[Emit, Callable, list]:
    """``(emit, const, final)`` for ONNX node ``n`` with input var ``x``: helper nodes get
    derived names, the final one the node's outputs (collected in ``final``, the handler's result)."""
    final: list = []

    def emit(op: str, inputs: list, hint: str | None):
        outs = ctx.emit(n, op, inputs, {}, x.added, n.outs if hint is None else None)
        if hint is None:
            final.extend(outs)
        return outs[0].value

    def const(value: float):
        return ctx.ir_const(np.array(value, dtype=np.float64), f"{n.name}/dg_const")
    return emit, const, final


def _scalar_attr(n, key: str, default: float) -> float:
    value = n.attrs.get(key, default)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UnsupportedOpError(f"node '{n.name}' ({n.op}) has {key}={value!r}; a finite number is needed")
    return float(value)


hard_sigmoid = define_op("HardSigmoid", doc="clip(alpha x + beta, 0, 1), imported as Mul, Add and Clip")
hard_swish = define_op("HardSwish", doc="x * HardSigmoid(x) with alpha 1/6, imported as its composition")
elu = define_op("Elu", doc="relu(x) + alpha (exp(min(x, 0)) - 1), imported as its composition")
selu = define_op("Selu", doc="gamma Elu_alpha(x), imported as its composition")
prelu = define_op("PRelu", doc="relu(x) - slope relu(-x) with a constant slope, imported as its composition")
gelu = define_op("Gelu", doc="ONNX Gelu (opset 20): imported as its Erf (or Tanh) composition")


@gelu.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    approximate = n.attrs.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise UnsupportedOpError(f"node '{n.name}' (Gelu) has approximate={approximate!r}; "
                                 "only 'none' and 'tanh' are defined")
    emit, const, final = onnx_emitters(ctx, n, x)
    gelu_nodes(x.value, approximate, emit, const)
    return final


@hard_sigmoid.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    emit, const, final = onnx_emitters(ctx, n, x)
    hard_sigmoid_nodes(x.value, emit, const, _scalar_attr(n, "alpha", 0.2), _scalar_attr(n, "beta", 0.5))
    return final


@hard_swish.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    emit, const, final = onnx_emitters(ctx, n, x)
    hard_swish_nodes(x.value, emit, const)
    return final


@elu.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    emit, const, final = onnx_emitters(ctx, n, x)
    elu_nodes(x.value, emit, const, _scalar_attr(n, "alpha", 1.0))
    return final


@selu.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    emit, const, final = onnx_emitters(ctx, n, x)
    elu_nodes(x.value, emit, const, _scalar_attr(n, "alpha", SELU_ALPHA), _scalar_attr(n, "gamma", SELU_GAMMA))
    return final


@prelu.onnx_import
def _(ctx, n):
    x = ctx.var(n, 0)
    if ctx.const(n, 1, "the PRelu slope") is None:  # (a slope computed from the input is refused there)
        raise DualgraphError(f"node '{n.name}' (PRelu) has no slope input; the ONNX op needs one")
    emit, _, final = onnx_emitters(ctx, n, x)

    def emit_broadcasting(op: str, inputs: list, hint: str | None):
        if hint != "slope":
            return emit(op, inputs, hint)
        # the slope broadcast as ONNX broadcasts it (numpy rules, past the batch axis)
        return ctx.binary(n, "Mul", Var(inputs[0], x.added), n.ins[1], None, ("", n.in_names[1])).value
    prelu_nodes(x.value, None, emit_broadcasting)
    return final


@hard_sigmoid.fx_lowering(nn.Hardsigmoid, F.hardsigmoid)
def _(lo, call: Call):
    emit, const = fx_emitters(lo)
    return hard_sigmoid_nodes(lo.var(call.arg(0, "input")), emit, const, 1 / 6, 0.5)


@hard_swish.fx_lowering(nn.Hardswish, F.hardswish)
def _(lo, call: Call):
    emit, const = fx_emitters(lo)
    return hard_swish_nodes(lo.var(call.arg(0, "input")), emit, const)


@elu.fx_lowering(nn.ELU)
def _(lo, call: Call):
    emit, const = fx_emitters(lo)
    return elu_nodes(lo.var(call.arg(0, "input")), emit, const, float(call.module.alpha))


@elu.fx_lowering(F.elu)
def _(lo, call: Call):
    emit, const = fx_emitters(lo)
    return elu_nodes(lo.var(call.arg(0, "input")), emit, const, float(call.arg(1, "alpha", 1.0)))


@selu.fx_lowering(nn.SELU, F.selu)
def _(lo, call: Call):
    emit, const = fx_emitters(lo)
    return elu_nodes(lo.var(call.arg(0, "input")), emit, const, SELU_ALPHA, SELU_GAMMA)


@prelu.fx_lowering(nn.PReLU)
def _(lo, call: Call):
    x = lo.var(call.arg(0, "input"))
    weight = call.module.weight.detach()
    rank = lo.rank(x)  # one slope, or one per channel (axis 1)
    slope = weight.reshape(-1, *[1] * (rank - 2)) if weight.numel() > 1 else weight.reshape(())
    emit, _ = fx_emitters(lo)
    return prelu_nodes(x, lo.constant(slope, "weight"), emit)


@gelu.fx_lowering(nn.GELU)
def _(lo, call: Call):
    emit, const = fx_emitters(lo)
    return gelu_nodes(lo.var(call.arg(0, "input")), call.module.approximate, emit, const)


@gelu.fx_lowering(F.gelu)
def _(lo, call: Call):
    emit, const = fx_emitters(lo)
    return gelu_nodes(lo.var(call.arg(0, "input")), call.kwargs.get("approximate", "none"), emit, const)
