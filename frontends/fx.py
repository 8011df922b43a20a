"""torch.nn.Module -> torch.fx -> dualgraph IR.

:func:`load_module` traces a module with ``torch.fx.symbolic_trace`` semantics and lowers
every fx node to IR nodes with ONNX semantics (the same ops :mod:`frontends.onnx` emits),
so passes, the interpreter and the dual-layer registry never see torch.fx.

Semantics are those of **inference** (``module.eval()``): BatchNorm uses its running
statistics, Dropout is the identity, and ``self.training`` is ``False`` while tracing. The
module itself is left as it was: its train/eval flags are restored afterwards.

How a node is lowered:

* ``call_module`` of a known layer type (exact type: a subclass that overrides ``forward``
  is traced through instead), ``call_function`` of a known function and ``call_method`` of a
  known Tensor method go through the rule registered with :func:`lowers`.
* A node none of whose arguments depends on the network input (``self.weight.t()``,
  ``x.size(1) * x.size(2)``) is *folded*: executed once in torch and kept as a constant.
* ``x.size(0)`` / ``x.shape[0]`` is the symbolic :data:`BATCH_SIZE`; it may appear only as
  the first entry of ``view`` / ``reshape`` (where it maps to the IR batch dimension).
* Parameters and buffers (``get_attr``) become constants, detached and cloned.

Supported (see the registries for the full list): Linear / F.linear / ``x @ W`` (Gemm, or
MatMul + Add beyond 2-D), Conv1d/2d/3d and F.conv* (any padding, padding strings and modes),
ReLU, LeakyReLU, Sigmoid, Tanh, Hardtanh / ReLU6 / clamp (Clip), Softmax, BatchNorm1d/2d/3d
(running statistics), Avg/MaxPool, AdaptiveAvgPool (global, or evenly dividing), spatial
``mean``, Flatten / view / reshape, permute / transpose, (un)squeeze, basic slicing, split /
chunk, cat, F.pad, Identity / Dropout, and ``+ - * /`` between variables or with constants.

Every unsupported node is collected and reported in one :class:`UnsupportedOpError`. The
lowered graph is checked against the module on ``example_input`` (shapes and values), so a
lowering that disagrees with torch (e.g. an in-place op whose input is reused) is an error
instead of a wrong certificate.

Supporting another op: write ``rule(lo, call) -> Value`` and decorate it with
``@lowers(nn.MyLayer, my_function, "tensor_method_name")``.
"""

from __future__ import annotations

import math
import operator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import map_arg
from torch.fx.passes.shape_prop import ShapeProp

from dualgraph.errors import DualgraphError, UnsupportedOpError
from dualgraph.interpreter import infer_shapes, run_graph
from dualgraph.ir import BATCH, Graph, Value, verify

__all__ = ["BATCH_SIZE", "FUNCTION_RULES", "METHOD_RULES", "MODULE_RULES", "load_module", "lowers"]


# ---- registries -----------------------------------------------------------------------

Rule = Callable[["_Lowering", "_Call"], Any]
MODULE_RULES: dict[type, Rule] = {}
"""Leaf module types (matched by exact type) -> lowering rule."""
FUNCTION_RULES: dict[Callable, Rule] = {}
"""``call_function`` targets (torch / F / operator functions) -> lowering rule."""
METHOD_RULES: dict[str, Rule] = {}
"""``call_method`` names (Tensor methods) -> lowering rule."""


def lowers(*targets: type | Callable | str) -> Callable[[Rule], Rule]:
    """Register ``rule(lo, call)`` for module types, functions and Tensor method names."""
    def deco(rule: Rule) -> Rule:
        for t in targets:
            if isinstance(t, str):
                METHOD_RULES[t] = rule
            elif isinstance(t, type) and issubclass(t, nn.Module):
                MODULE_RULES[t] = rule
            else:
                FUNCTION_RULES[t] = rule
        return rule
    return deco


class _BatchSizeType:
    """Stands for ``x.size(0)``: the batch size, unknown until the graph runs.

    It deliberately supports no arithmetic, so folding ``x.size(0) * 2`` fails loudly
    instead of baking the example's batch size into the graph.
    """

    def __repr__(self) -> str:
        return "x.size(0)"


BATCH_SIZE = _BatchSizeType()


class _Unsupported(Exception):
    """Raised by a rule for an unsupported form of a supported op (collected, not fatal)."""


class _Poison:
    """Env entry of a node that could not be lowered; its consumers are skipped."""


_POISON = _Poison()
_REQUIRED = object()


@dataclass
class _Call:
    """One fx call node with its arguments already mapped to IR values / Python objects."""

    node: torch.fx.Node
    args: tuple
    kwargs: dict
    module: nn.Module | None = None

    def arg(self, index: int, name: str, default: Any = _REQUIRED) -> Any:
        """Argument ``name`` given positionally at ``index`` or by keyword."""
        if index < len(self.args):
            return self.args[index]
        if name in self.kwargs:
            return self.kwargs[name]
        if default is _REQUIRED:
            raise _Unsupported(f"missing argument '{name}'")
        return default

    def varargs(self, start: int, name: str) -> tuple:
        """Sizes given either as ``f(x, 2, 3)`` or as ``f(x, (2, 3))`` / ``f(x, name=(2, 3))``."""
        rest = self.args[start:]
        if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
            return tuple(rest[0])
        if rest:
            return tuple(rest)
        if name not in self.kwargs:
            raise _Unsupported(f"missing argument '{name}'")
        return tuple(self.kwargs[name])


# ---- the lowering state ---------------------------------------------------------------

@dataclass
class _Lowering:
    """Environment of one lowering: fx node -> IR ``Value`` (variable) or Python constant."""

    gm: torch.fx.GraphModule
    graph: Graph
    env: dict[torch.fx.Node, Any] = field(default_factory=dict)
    shapes: dict[Value, tuple[int, ...]] = field(default_factory=dict)  # example shapes
    problems: list[str] = field(default_factory=list)
    unknown_targets: bool = False  # some problem is a target without any rule
    names: dict[int, str] = field(default_factory=dict)  # id(parameter/buffer) -> qualified name
    _consts: dict[int, tuple[torch.Tensor, Value]] = field(default_factory=dict)
    _node: torch.fx.Node | None = None

    # -- values --
    def const(self, x: torch.Tensor | float | int | bool, hint: str = "const") -> Value:
        """An IR constant for tensor or Python scalar ``x`` (one per distinct tensor)."""
        if not isinstance(x, torch.Tensor):
            x = torch.tensor(float(x), dtype=torch.float32)
        hit = self._consts.get(id(x))
        if hit is not None:
            return hit[1]
        hint = self.names.get(id(x), hint)  # parameters keep their module path, e.g. "fc1.weight"
        v = self.graph.add_const(self.graph.fresh_name(hint), x.detach().clone())
        self._consts[id(x)] = (x, v)  # keep x alive so its id is not reused
        return v

    def var(self, x: Any, what: str = "input") -> Value:
        """``x`` as a variable value; constants here would have no batch dimension."""
        if not isinstance(x, Value):
            raise _Unsupported(f"{what} must depend on the network input")
        return x

    @staticmethod
    def constant(x: Any, what: str) -> Any:
        """``x`` as a constant (tensor or number); the op is affine only in that case."""
        if isinstance(x, Value):
            raise _Unsupported(f"{what} must be a constant (parameter, buffer or number), "
                               "not computed from the network input")
        if x is BATCH_SIZE:
            raise _Unsupported(f"{what} may not use the batch size")
        return x

    def shape(self, v: Value) -> tuple[int, ...]:
        """Concrete shape of ``v`` on the example input (batch dimension included)."""
        return self.shapes[v]

    def rank(self, v: Value) -> int:
        return len(self.shapes[v])

    def out_shape(self) -> tuple[int, ...]:
        """Concrete example shape of the fx node being lowered."""
        return _example_shape(self._node)

    def emit(self, op: str, inputs: Sequence[Value | torch.Tensor | float | None],
             attrs: dict | None = None, *, hint: str | None = None, n_outputs: int = 1) -> Any:
        """Append one IR node; constants in ``inputs`` become IR constants.

        Returns its output value, or the tuple of them when ``n_outputs > 1``.
        """
        ins = [None if x is None else x if isinstance(x, Value) else self.const(x, f"{self._node.name}_c")
               for x in inputs]
        while ins and ins[-1] is None:  # trailing omitted optional inputs are simply absent
            ins.pop()
        name = self.graph.fresh_name(hint or self._node.name)
        node = self.graph.add_node(op, ins, attrs, name=name, n_outputs=n_outputs)
        node.meta["fx_node"] = self._node.name
        return node.output if n_outputs == 1 else tuple(node.outputs)

    def axis(self, v: Value, dim: int, what: str = "dim") -> int:
        """Normalise ``dim`` of ``v``; axis 0 (the batch) is rejected."""
        r = self.rank(v)
        d = int(dim) + r if int(dim) < 0 else int(dim)
        if not 0 < d < r:
            raise _Unsupported(f"{what}={dim} is the batch dimension or out of range; "
                               "ops across the examples of a batch are not supported")
        return d


def _example_shape(node: torch.fx.Node) -> tuple[int, ...]:
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        raise _Unsupported(f"node '{node.name}' does not produce a single tensor")
    return tuple(tm.shape)


def _example_shapes(node: torch.fx.Node) -> list[tuple[int, ...]]:
    """Example shapes of a node that returns a tuple of tensors (split, chunk)."""
    tms = node.meta.get("tensor_meta")
    if not isinstance(tms, (tuple, list)) or not all(hasattr(t, "shape") for t in tms):
        raise _Unsupported(f"node '{node.name}' does not produce a tuple of tensors")
    return [tuple(t.shape) for t in tms]


def _ntuple(x: Any, n: int) -> list[int]:
    """torch's int-or-tuple convention, as a list of ``n`` ints."""
    if isinstance(x, (tuple, list)):
        if len(x) == 1:
            return [int(x[0])] * n
        if len(x) != n:
            raise _Unsupported(f"expected {n} values, got {tuple(x)}")
        return [int(e) for e in x]
    return [int(x)] * n


# ---- linear layers --------------------------------------------------------------------

def _affine(lo: _Lowering, x: Any, weight: Any, bias: Any) -> Value:
    """``x W^T + b``: Gemm for 2-D inputs, MatMul (+ Add) over the last axis otherwise."""
    x = lo.var(x)
    w = lo.constant(weight, "weight")
    b = lo.constant(bias, "bias")
    if lo.rank(x) == 2:
        return lo.emit("Gemm", [x, w, b], {"transB": 1})
    y = lo.emit("MatMul", [x, w.t().contiguous()], hint=f"{lo._node.name}_matmul")
    return y if b is None else lo.emit("Add", [y, b])


@lowers(nn.Linear)
def _linear_module(lo: _Lowering, call: _Call) -> Value:
    return _affine(lo, call.arg(0, "input"), call.module.weight, call.module.bias)


@lowers(F.linear)
def _linear_function(lo: _Lowering, call: _Call) -> Value:
    return _affine(lo, call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias", None))


@lowers(operator.matmul, torch.matmul, torch.mm, "matmul", "mm")
def _matmul(lo: _Lowering, call: _Call) -> Value:
    # Only variable @ constant is affine and keeps the batch axis first.
    x = lo.var(call.arg(0, "input"))
    w = lo.constant(call.arg(1, "other"), "right operand of matmul")
    if not isinstance(w, torch.Tensor) or w.dim() < 1:
        raise _Unsupported("the right operand must be a constant tensor")
    return lo.emit("MatMul", [x, w])


# torch padding modes -> ONNX Pad modes
_PAD_MODES = {"constant": "constant", "zeros": "constant", "reflect": "reflect",
              "replicate": "edge", "circular": "wrap"}


def _conv(lo: _Lowering, x: Any, weight: Any, bias: Any, stride: Any, padding: Any,
          dilation: Any, groups: Any, padding_mode: str = "zeros") -> Value:
    x = lo.var(x)
    w = lo.constant(weight, "weight")
    b = lo.constant(bias, "bias")
    kernel = list(w.shape[2:])
    nd = len(kernel)
    strides, dilations = _ntuple(stride, nd), _ntuple(dilation, nd)
    if padding == "valid":
        pads = [0] * (2 * nd)
    elif padding == "same":
        # torch pads d*(k-1) in total, the odd unit at the end (right/bottom).
        total = [d * (k - 1) for d, k in zip(dilations, kernel)]
        pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    else:
        p = _ntuple(padding, nd)
        pads = p + p  # ONNX layout: all begins, then all ends
    if padding_mode != "zeros" and any(pads):
        # torch pads explicitly (F.pad with that mode), then convolves without padding.
        spatial = torch.tensor([0, 0, *pads[:nd], 0, 0, *pads[nd:]], dtype=torch.int64)
        x = lo.emit("Pad", [x, spatial], {"mode": _PAD_MODES[padding_mode]}, hint=f"{lo._node.name}_pad")
        pads = [0] * (2 * nd)
    return lo.emit("Conv", [x, w, b], {"kernel_shape": kernel, "strides": strides, "pads": pads,
                                       "dilations": dilations, "group": int(groups)})


@lowers(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_module(lo: _Lowering, call: _Call) -> Value:
    m = call.module
    if m.padding_mode not in _PAD_MODES:
        raise _Unsupported(f"padding_mode='{m.padding_mode}'")
    return _conv(lo, call.arg(0, "input"), m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups,
                 m.padding_mode)


@lowers(F.conv1d, F.conv2d, F.conv3d)
def _conv_function(lo: _Lowering, call: _Call) -> Value:
    return _conv(lo, call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias", None),
                 call.arg(3, "stride", 1), call.arg(4, "padding", 0), call.arg(5, "dilation", 1),
                 call.arg(6, "groups", 1))


# ---- activations ----------------------------------------------------------------------

def _unary(op_type: str) -> Rule:
    def rule(lo: _Lowering, call: _Call) -> Value:
        return lo.emit(op_type, [lo.var(call.arg(0, "input"))])
    rule.__name__ = f"_{op_type.lower()}"
    return rule


lowers(nn.ReLU, F.relu, torch.relu, "relu")(_unary("Relu"))
lowers(nn.Sigmoid, F.sigmoid, torch.sigmoid, "sigmoid")(_unary("Sigmoid"))
lowers(nn.Tanh, F.tanh, torch.tanh, "tanh")(_unary("Tanh"))
lowers(operator.neg, torch.neg, "neg")(_unary("Neg"))


@lowers(nn.LeakyReLU)
def _leaky_relu_module(lo: _Lowering, call: _Call) -> Value:
    return lo.emit("LeakyRelu", [lo.var(call.arg(0, "input"))], {"alpha": float(call.module.negative_slope)})


@lowers(F.leaky_relu)
def _leaky_relu_function(lo: _Lowering, call: _Call) -> Value:
    slope = lo.constant(call.arg(1, "negative_slope", 0.01), "negative_slope")
    return lo.emit("LeakyRelu", [lo.var(call.arg(0, "input"))], {"alpha": float(slope)})


def _clip(lo: _Lowering, x: Any, lo_: Any, hi: Any) -> Value:
    bounds = []
    for b, what in ((lo_, "min"), (hi, "max")):
        b = lo.constant(b, what)
        if isinstance(b, torch.Tensor) and b.numel() != 1:
            raise _Unsupported(f"{what} must be a scalar")
        bounds.append(None if b is None else torch.tensor(float(b), dtype=torch.float32))
    return lo.emit("Clip", [lo.var(x), *bounds])


@lowers(nn.Hardtanh, nn.ReLU6)  # ReLU6 is a Hardtanh(0, 6) subclass with its own type
def _hardtanh_module(lo: _Lowering, call: _Call) -> Value:
    return _clip(lo, call.arg(0, "input"), call.module.min_val, call.module.max_val)


@lowers(F.hardtanh)
def _hardtanh_function(lo: _Lowering, call: _Call) -> Value:
    return _clip(lo, call.arg(0, "input"), call.arg(1, "min_val", -1.0), call.arg(2, "max_val", 1.0))


@lowers(F.relu6)
def _relu6_function(lo: _Lowering, call: _Call) -> Value:
    return _clip(lo, call.arg(0, "input"), 0.0, 6.0)


@lowers(torch.clamp, torch.clip, "clamp", "clip")
def _clamp(lo: _Lowering, call: _Call) -> Value:
    return _clip(lo, call.arg(0, "input"), call.arg(1, "min", None), call.arg(2, "max", None))


def _softmax(lo: _Lowering, x: Any, dim: Any) -> Value:
    x = lo.var(x)
    if dim is None:
        raise _Unsupported("softmax needs an explicit dim")
    return lo.emit("Softmax", [x], {"axis": lo.axis(x, dim)})


@lowers(nn.Softmax)
def _softmax_module(lo: _Lowering, call: _Call) -> Value:
    return _softmax(lo, call.arg(0, "input"), call.module.dim)


@lowers(F.softmax, torch.softmax, "softmax")
def _softmax_function(lo: _Lowering, call: _Call) -> Value:
    if call.kwargs.get("dtype") is not None:
        raise _Unsupported("softmax with dtype=")
    return _softmax(lo, call.arg(0, "input"), call.arg(1, "dim", None))


# ---- identities -----------------------------------------------------------------------

@lowers(nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
        F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
def _identity(lo: _Lowering, call: _Call) -> Value:
    # Dropout is the identity at inference, whatever its `training` flag said when traced.
    return lo.emit("Identity", [lo.var(call.arg(0, "input"))])


@lowers("contiguous", "clone", "detach")
def _passthrough(lo: _Lowering, call: _Call) -> Value:
    # Memory-layout / autograd bookkeeping: no value changes, so no IR node at all.
    return lo.var(call.arg(0, "input"))


# ---- normalisation and pooling --------------------------------------------------------

def _batch_norm(lo: _Lowering, x: Any, mean: Any, var: Any, weight: Any, bias: Any, eps: float) -> Value:
    x = lo.var(x)
    mean, var = lo.constant(mean, "running_mean"), lo.constant(var, "running_var")
    if mean is None or var is None:
        raise _Unsupported("BatchNorm without running statistics normalises with batch "
                           "statistics, which mixes the examples of a batch")
    weight = torch.ones_like(mean) if weight is None else lo.constant(weight, "weight")
    bias = torch.zeros_like(mean) if bias is None else lo.constant(bias, "bias")
    return lo.emit("BatchNormalization", [x, weight, bias, mean, var], {"epsilon": float(eps)})


@lowers(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batch_norm_module(lo: _Lowering, call: _Call) -> Value:
    m = call.module  # inference semantics: always the running statistics
    return _batch_norm(lo, call.arg(0, "input"), m.running_mean, m.running_var, m.weight, m.bias, m.eps)


@lowers(F.batch_norm)
def _batch_norm_function(lo: _Lowering, call: _Call) -> Value:
    if call.arg(5, "training", False):
        raise _Unsupported("training=True uses batch statistics")
    return _batch_norm(lo, call.arg(0, "input"), call.arg(1, "running_mean"), call.arg(2, "running_var"),
                       call.arg(3, "weight", None), call.arg(4, "bias", None), call.arg(7, "eps", 1e-5))


def _pool(lo: _Lowering, op_type: str, x: Any, kernel: Any, stride: Any, padding: Any,
          ceil_mode: bool, extra: dict) -> Value:
    x = lo.var(x)
    nd = lo.rank(x) - 2
    if nd < 1:
        raise _Unsupported("pooling needs [batch, channels, spatial...] input")
    k = _ntuple(kernel, nd)
    s = k if stride is None or stride == [] or stride == () else _ntuple(stride, nd)
    p = _ntuple(padding, nd)
    attrs = {"kernel_shape": k, "strides": s, "pads": p + p, "ceil_mode": int(bool(ceil_mode)), **extra}
    return lo.emit(op_type, [x], attrs)


def _avg_pool(lo: _Lowering, x: Any, kernel: Any, stride: Any, padding: Any, ceil_mode: bool,
              count_include_pad: bool, divisor_override: Any) -> Value:
    if divisor_override is not None:
        raise _Unsupported("divisor_override")
    return _pool(lo, "AveragePool", x, kernel, stride, padding, ceil_mode,
                 {"count_include_pad": int(bool(count_include_pad))})


def _max_pool(lo: _Lowering, x: Any, kernel: Any, stride: Any, padding: Any, dilation: Any,
              ceil_mode: bool, return_indices: bool) -> Value:
    if return_indices:
        raise _Unsupported("return_indices=True")
    nd = lo.rank(lo.var(x)) - 2
    return _pool(lo, "MaxPool", x, kernel, stride, padding, ceil_mode, {"dilations": _ntuple(dilation, nd)})


@lowers(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
def _avg_pool_module(lo: _Lowering, call: _Call) -> Value:
    m = call.module
    return _avg_pool(lo, call.arg(0, "input"), m.kernel_size, m.stride, m.padding, m.ceil_mode,
                     m.count_include_pad, getattr(m, "divisor_override", None))


@lowers(F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
def _avg_pool_function(lo: _Lowering, call: _Call) -> Value:
    return _avg_pool(lo, call.arg(0, "input"), call.arg(1, "kernel_size"), call.arg(2, "stride", None),
                     call.arg(3, "padding", 0), call.arg(4, "ceil_mode", False),
                     call.arg(5, "count_include_pad", True), call.arg(6, "divisor_override", None))


@lowers(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
def _max_pool_module(lo: _Lowering, call: _Call) -> Value:
    m = call.module
    return _max_pool(lo, call.arg(0, "input"), m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                     m.return_indices)


@lowers(F.max_pool1d, F.max_pool2d, F.max_pool3d)
def _max_pool_function(lo: _Lowering, call: _Call) -> Value:
    return _max_pool(lo, call.arg(0, "input"), call.arg(1, "kernel_size"), call.arg(2, "stride", None),
                     call.arg(3, "padding", 0), call.arg(4, "dilation", 1), call.arg(5, "ceil_mode", False),
                     call.arg(6, "return_indices", False))


def _adaptive_avg_pool(lo: _Lowering, x: Any, output_size: Any) -> Value:
    x = lo.var(x)
    spatial = lo.shape(x)[2:]
    sizes = list(output_size) if isinstance(output_size, (tuple, list)) else [output_size] * len(spatial)
    out = [s if o is None else int(o) for o, s in zip(sizes, spatial)]  # None: keep that size
    if all(o == 1 for o in out):
        return lo.emit("GlobalAveragePool", [x])
    if any(s % o for s, o in zip(spatial, out)):
        raise _Unsupported(f"adaptive pooling of {tuple(spatial)} to {tuple(out)} (sizes must divide)")
    # Evenly dividing windows: an ordinary average pool with kernel = stride = in / out.
    k = [s // o for s, o in zip(spatial, out)]
    return lo.emit("AveragePool", [x], {"kernel_shape": k, "strides": k, "pads": [0] * (2 * len(k)),
                                       "ceil_mode": 0, "count_include_pad": 0})


@lowers(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
def _adaptive_avg_pool_module(lo: _Lowering, call: _Call) -> Value:
    return _adaptive_avg_pool(lo, call.arg(0, "input"), call.module.output_size)


@lowers(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
def _adaptive_avg_pool_function(lo: _Lowering, call: _Call) -> Value:
    return _adaptive_avg_pool(lo, call.arg(0, "input"), call.arg(1, "output_size"))


@lowers(torch.mean, "mean")
def _mean(lo: _Lowering, call: _Call) -> Value:
    # Only the spatial mean x.mean((2, 3)) of ResNet heads: a global average pool.
    x = lo.var(call.arg(0, "input"))
    dims = call.arg(1, "dim", None)
    dims = sorted(lo.axis(x, d) for d in ((dims,) if isinstance(dims, int) else dims or ()))
    if dims != list(range(2, lo.rank(x))) or not dims:
        raise _Unsupported("mean over dims other than all spatial dims (2, 3, ...)")
    y = lo.emit("GlobalAveragePool", [x], hint=f"{lo._node.name}_pool")
    if call.arg(2, "keepdim", False):
        return lo.emit("Identity", [y])
    return _reshape_to(lo, y, lo.out_shape())


# ---- shapes ---------------------------------------------------------------------------

def _reshape_to(lo: _Lowering, x: Value, shape: Sequence[int]) -> Value:
    """Reshape ``x`` to the example output ``shape``, whose first entry is the batch."""
    target = torch.tensor([0, *shape[1:]], dtype=torch.int64)  # 0: copy the batch dimension
    return lo.emit("Reshape", [x, target])


def _flatten(lo: _Lowering, x: Any, start: int, end: int) -> Value:
    x = lo.var(x)
    r = lo.rank(x)
    start, end = start + r if start < 0 else start, end + r if end < 0 else end
    if start == 0:
        raise _Unsupported("flattening the batch dimension (use start_dim=1)")
    if start == 1 and end == r - 1:
        return lo.emit("Flatten", [x], {"axis": 1})
    return _reshape_to(lo, x, lo.out_shape())


@lowers(nn.Flatten)
def _flatten_module(lo: _Lowering, call: _Call) -> Value:
    return _flatten(lo, call.arg(0, "input"), call.module.start_dim, call.module.end_dim)


@lowers(torch.flatten, "flatten")
def _flatten_function(lo: _Lowering, call: _Call) -> Value:
    return _flatten(lo, call.arg(0, "input"), call.arg(1, "start_dim", 0), call.arg(2, "end_dim", -1))


@lowers(torch.reshape, "view", "reshape")
def _reshape(lo: _Lowering, call: _Call) -> Value:
    x = lo.var(call.arg(0, "input"))
    shape = call.varargs(1, "shape")
    rest = shape[1:]
    if any(e is BATCH_SIZE or isinstance(e, Value) for e in rest):
        raise _Unsupported("the batch size may appear only as the first entry of the shape")
    unit = math.prod(lo.shape(x)[1:])
    batch_first = shape[0] is BATCH_SIZE or (shape[0] == -1 and -1 not in rest and math.prod(rest) == unit)
    if not batch_first:
        raise _Unsupported(f"shape {shape}: the first entry must be x.size(0) (or -1 with the rest "
                           "fixed) so that the batch dimension is kept")
    return _reshape_to(lo, x, lo.out_shape())


@lowers(getattr)
def _getattr(lo: _Lowering, call: _Call) -> Any:
    x, name = lo.var(call.arg(0, "input")), call.args[1]
    if name == "shape":
        return (BATCH_SIZE, *lo.shape(x)[1:])
    if name == "ndim":
        return lo.rank(x)
    raise _Unsupported(f"attribute '{name}' of a tensor")


@lowers("size")
def _size(lo: _Lowering, call: _Call) -> Any:
    x = lo.var(call.arg(0, "input"))
    sizes = (BATCH_SIZE, *lo.shape(x)[1:])
    dim = call.arg(1, "dim", None)
    return sizes if dim is None else sizes[int(dim)]


@lowers("dim")
def _dim(lo: _Lowering, call: _Call) -> int:
    return lo.rank(lo.var(call.arg(0, "input")))


@lowers(torch.permute, "permute")
def _permute(lo: _Lowering, call: _Call) -> Value:
    x = lo.var(call.arg(0, "input"))
    perm = [d + lo.rank(x) if d < 0 else d for d in map(int, call.varargs(1, "dims"))]
    if perm[0] != 0:
        raise _Unsupported("the batch dimension must stay first")
    return lo.emit("Transpose", [x], {"perm": perm})


@lowers(torch.transpose, "transpose")
def _transpose(lo: _Lowering, call: _Call) -> Value:
    x = lo.var(call.arg(0, "input"))
    a, b = lo.axis(x, call.arg(1, "dim0")), lo.axis(x, call.arg(2, "dim1"))
    perm = list(range(lo.rank(x)))
    perm[a], perm[b] = perm[b], perm[a]
    return lo.emit("Transpose", [x], {"perm": perm})


@lowers(torch.unsqueeze, "unsqueeze")
def _unsqueeze(lo: _Lowering, call: _Call) -> Value:
    x = lo.var(call.arg(0, "input"))
    d = int(call.arg(1, "dim"))
    d = d + lo.rank(x) + 1 if d < 0 else d
    if d == 0:
        raise _Unsupported("unsqueeze(0) would move the batch dimension")
    return lo.emit("Unsqueeze", [x], {"axes": [d]})


@lowers(torch.squeeze, "squeeze")
def _squeeze(lo: _Lowering, call: _Call) -> Value:
    x = lo.var(call.arg(0, "input"))
    shape = lo.shape(x)
    dim = call.arg(1, "dim", None)
    if dim is None:  # all size-1 axes except the batch (whose example size says nothing)
        axes = [i for i in range(1, len(shape)) if shape[i] == 1]
    else:
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        axes = [a for a in (lo.axis(x, d) for d in dims) if shape[a] == 1]  # torch skips size != 1
    return lo.emit("Squeeze", [x], {"axes": axes}) if axes else x


@lowers(torch.cat, torch.concat, torch.concatenate)
def _cat(lo: _Lowering, call: _Call) -> Value:
    parts = [lo.var(t, "every concatenated tensor") for t in call.arg(0, "tensors")]
    dim = call.arg(1, "dim", call.kwargs.get("axis", 0))
    return lo.emit("Concat", parts, {"axis": lo.axis(parts[0], dim)})


@lowers(torch.split, torch.chunk, "split", "chunk")
def _split(lo: _Lowering, call: _Call) -> tuple[Value, ...]:
    # split(x, size_or_sections, dim) and chunk(x, chunks, dim) alike: the part sizes are
    # read off the example outputs, which fixes the ragged last part of chunk too.
    x = lo.var(call.arg(0, "input"))
    axis = lo.axis(x, call.arg(2, "dim", 0))
    sizes = [s[axis] for s in _example_shapes(call.node)]
    return lo.emit("Split", [x, torch.tensor(sizes, dtype=torch.int64)], {"axis": axis}, n_outputs=len(sizes))


@lowers(operator.getitem)
def _getitem(lo: _Lowering, call: _Call) -> Any:
    seq, index = call.args[0], call.args[1]
    if not isinstance(seq, Value):  # a Python list/tuple holding variables
        return seq[index]
    return _slice(lo, seq, index)


def _slice(lo: _Lowering, x: Value, index: Any) -> Value:
    """Basic indexing ``x[:, a:b, ..., c]`` -> Slice (+ Squeeze for integer indices)."""
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (lo.rank(x) - len(index) + 1) + index[at + 1:]
    if not index or not isinstance(index[0], slice) or index[0] != slice(None) or len(index) > lo.rank(x):
        raise _Unsupported(f"index {index}: must start with ':' (keep the batch) and use slices/ints")
    starts, ends, axes, steps, squeeze = [], [], [], [], []
    for axis, i in enumerate(index[1:], start=1):
        size = lo.shape(x)[axis]
        if isinstance(i, slice):
            if i == slice(None):
                continue
            s, e, st = i.indices(size)
            if st <= 0:
                raise _Unsupported("negative slice steps")
        elif isinstance(i, int) and not isinstance(i, bool):
            s = i + size if i < 0 else i
            e, st = s + 1, 1
            squeeze.append(axis)
        else:
            raise _Unsupported(f"index {i!r} (only slices and ints)")
        starts.append(s), ends.append(e), axes.append(axis), steps.append(st)
    y = x
    if axes:
        y = lo.emit("Slice", [x, *(torch.tensor(v, dtype=torch.int64) for v in (starts, ends, axes, steps))],
                    hint=f"{lo._node.name}_slice" if squeeze else None)
    return lo.emit("Squeeze", [y], {"axes": squeeze}) if squeeze else y


@lowers(F.pad)
def _pad(lo: _Lowering, call: _Call) -> Value:
    x = lo.var(call.arg(0, "input"))
    pad = [int(p) for p in lo.constant(call.arg(1, "pad"), "pad")]
    mode = call.arg(2, "mode", "constant")
    value = call.arg(3, "value", None)
    if mode not in _PAD_MODES:
        raise _Unsupported(f"mode='{mode}'")
    if any(p < 0 for p in pad):
        raise _Unsupported("negative padding (cropping)")
    r = lo.rank(x)
    begins, ends = [0] * r, [0] * r
    for k in range(len(pad) // 2):  # torch lists (begin, end) pairs from the last axis backwards
        begins[r - 1 - k], ends[r - 1 - k] = pad[2 * k], pad[2 * k + 1]
    if begins[0] or ends[0]:
        raise _Unsupported("padding the batch dimension")
    pads = torch.tensor(begins + ends, dtype=torch.int64)
    if mode != "constant":
        return lo.emit("Pad", [x, pads], {"mode": _PAD_MODES[mode]})
    fill = torch.tensor(float(value or 0.0), dtype=torch.float32)
    return lo.emit("Pad", [x, pads, fill], {"mode": "constant"})


# ---- arithmetic -----------------------------------------------------------------------

def _check_broadcast(lo: _Lowering, x: Value, c: Any) -> None:
    """A constant operand must broadcast over the batch, never against it."""
    if not isinstance(c, torch.Tensor):
        return
    # Right-aligned broadcasting: the constant's axes at or before the batch axis must be 1.
    leading = c.shape[:max(0, c.dim() - lo.rank(x) + 1)]
    if any(d != 1 for d in leading):
        raise _Unsupported(f"constant of shape {tuple(c.shape)} broadcasts against the batch dimension")


def _binary(op_type: str, commutative: bool) -> Rule:
    def rule(lo: _Lowering, call: _Call) -> Value:
        a, b = call.arg(0, "input"), call.arg(1, "other")
        if call.kwargs.get("rounding_mode") is not None:
            raise _Unsupported("rounding_mode")
        alpha = call.kwargs.get("alpha", 1)
        if alpha != 1:  # torch.add(a, b, alpha=k) = a + k * b
            b = lo.emit("Mul", [b, float(alpha)], hint=f"{lo._node.name}_alpha") if isinstance(b, Value) else b * alpha
        if not isinstance(a, Value) and commutative:  # keep the variable first: c + x -> x + c
            a, b = b, a
        var = a if isinstance(a, Value) else b
        for operand in (a, b):
            if not isinstance(operand, Value):
                _check_broadcast(lo, var, lo.constant(operand, "operand"))
        return lo.emit(op_type, [a, b])
    rule.__name__ = f"_{op_type.lower()}"
    return rule


lowers(operator.add, operator.iadd, torch.add, "add")(_binary("Add", commutative=True))
lowers(operator.sub, operator.isub, torch.sub, torch.subtract, "sub")(_binary("Sub", commutative=False))
lowers(operator.mul, operator.imul, torch.mul, torch.multiply, "mul")(_binary("Mul", commutative=True))
lowers(operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div")(_binary("Div", commutative=False))


# ---- tracing --------------------------------------------------------------------------

class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with every layer type we have a rule for kept as a leaf.

    torch.nn layers are leaves by default anyway (so an unknown one such as nn.LSTM shows up
    as one unsupported call); user modules and Sequentials are traced through.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in MODULE_RULES or super().is_leaf_module(m, module_qualified_name)


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Inference semantics for the duration, then every submodule's own flag back."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


class _Bare(nn.Module):
    """Wraps a bare known layer (``load_module(nn.Conv2d(...), x)``) so that it is a leaf
    call lowered by its rule; fx would otherwise trace the layer's own forward."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _trace(module: nn.Module) -> torch.fx.GraphModule:
    tracer = _Tracer()
    try:
        fx_graph = tracer.trace(_Bare(module) if type(module) in MODULE_RULES else module)
    except Exception as exc:  # fx raises TraceError, TypeError, ... for data-dependent Python
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DualgraphError(
            f"torch.fx cannot trace {type(module).__name__}: {first}; export the model to ONNX "
            "(torch.onnx.export) and load it with frontends.onnx, or make forward traceable "
            "(no Python control flow on tensor values)") from exc
    return torch.fx.GraphModule(tracer.root, fx_graph, type(module).__name__)


# ---- driver ---------------------------------------------------------------------------

def _target_name(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """Readable name of what an fx node calls: nn.LSTM, torch.sort, Tensor.sort, ..."""
    if node.op == "call_module":
        return _type_name(type(gm.get_submodule(node.target)))
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return _function_name(node.target)


def _type_name(cls: type) -> str:
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else f"{cls.__module__}.{cls.__qualname__}"


def _function_name(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or "torch"
    module = {"_operator": "operator", "torch._C._nn": "torch.nn.functional",
              "torch._C._VariableFunctions": "torch", "builtins": ""}.get(module, module)
    name = getattr(fn, "__name__", repr(fn))
    return f"{module}.{name}" if module else name


def _supported() -> str:
    """Short list of what has a rule: layer types, then function / Tensor method names."""
    mods = sorted({_type_name(t) for t in MODULE_RULES})
    funcs = sorted({getattr(f, "__name__", str(f)) for f in FUNCTION_RULES} | set(METHOD_RULES))
    return f"layers {', '.join(mods)}; functions and Tensor methods {', '.join(funcs)}"


def _flatten_args(obj: Any) -> Iterator[Any]:
    if isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _flatten_args(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _flatten_args(o)
    elif isinstance(obj, slice):
        yield from (obj.start, obj.stop, obj.step)
    else:
        yield obj


def _fold(gm: torch.fx.GraphModule, node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
    """Execute a node whose arguments are all constants, as torch would."""
    with torch.no_grad():
        if node.op == "call_module":
            return gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)


def _rule_for(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[Rule | None, nn.Module | None]:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return MODULE_RULES.get(type(m)), m
    if node.op == "call_method":
        return METHOD_RULES.get(node.target), None
    try:
        return FUNCTION_RULES.get(node.target), None
    except TypeError:  # an unhashable callable cannot be in the table
        return None, None


def _lower_call(lo: _Lowering, node: torch.fx.Node) -> Any:
    """Lower one call node; returns its env entry (a Value, a constant, or _POISON)."""
    args = map_arg(node.args, lo.env.__getitem__)
    kwargs = map_arg(node.kwargs, lo.env.__getitem__)
    flat = list(_flatten_args((args, kwargs)))
    rule, module = _rule_for(lo.gm, node)
    where = f"{_target_name(lo.gm, node)} (node '{node.name}')"
    if any(a is _POISON for a in flat):
        if rule is None:  # report it too, the user wants the whole list at once
            lo.problems.append(where)
            lo.unknown_targets = True
        return _POISON
    if not any(isinstance(a, Value) for a in flat):
        if any(a is BATCH_SIZE for a in flat):
            if node.target is operator.getitem:  # indexing x.size() / x.shape
                return args[0][args[1]]
            lo.problems.append(f"{where}: computes with the batch size x.size(0), which is only "
                               "allowed as the first entry of view/reshape")
            return _POISON
        try:  # nothing depends on the input: a constant subexpression
            return _fold(lo.gm, node, tuple(args), dict(kwargs))
        except Exception as exc:
            lo.problems.append(f"{where}: failed on constants: {type(exc).__name__}: "
                               f"{(str(exc).splitlines() or [''])[0]}")
            return _POISON
    if rule is None:
        lo.problems.append(where)
        lo.unknown_targets = True
        return _POISON
    try:
        return rule(lo, _Call(node, tuple(args), dict(kwargs), module))
    except _Unsupported as exc:
        lo.problems.append(f"{where}: {exc}")
        return _POISON


def _lower(gm: torch.fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Graph:
    graph = Graph(type(gm).__name__)
    lo = _Lowering(gm, graph)
    lo.names = {id(t): name for name, t in [*gm.named_parameters(), *gm.named_buffers()]}
    placeholders = iter(inputs)
    for node in gm.graph.nodes:
        lo._node = node
        if node.op == "placeholder":
            x = next(placeholders, None)
            if x is None:  # an argument with a default value, left at its default
                lo.env[node] = node.args[0]
                continue
            v = graph.add_input(graph.fresh_name(node.name), x.shape[1:], x.dtype)
            lo.shapes[v] = tuple(x.shape)
            lo.env[node] = v
        elif node.op == "get_attr":
            lo.env[node] = _get_attr(gm, node.target)
        elif node.op == "output":
            outs = node.args[0]
            outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
            for o in outs:
                v = lo.env.get(o) if isinstance(o, torch.fx.Node) else None
                if v is not _POISON and not isinstance(v, Value):
                    lo.problems.append(f"output '{getattr(o, 'name', o)}': must be a tensor computed from "
                                       "the input (not a constant, dict or nested structure)")
                graph.outputs.append(v)
        else:
            out = _lower_call(lo, node)
            if isinstance(out, Value) and out not in lo.shapes:
                lo.shapes[out] = _example_shape(node)
            elif isinstance(out, tuple) and out and all(isinstance(v, Value) for v in out):
                lo.shapes.update((v, s) for v, s in zip(out, _example_shapes(node)) if v not in lo.shapes)
            lo.env[node] = out
    if lo.problems:
        supported = f" Supported: {_supported()}." if lo.unknown_targets else ""
        raise UnsupportedOpError(
            f"the torch.fx frontend cannot lower {graph.name}: {'; '.join(lo.problems)}.{supported} "
            "Export the model to ONNX, or register a rule with frontends.fx.lowers")
    return graph


def _check_arity(gm: torch.fx.GraphModule, n_inputs: int) -> None:
    """One example tensor per forward argument (arguments with defaults may be left out)."""
    params = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in params if not n.args]
    if not len(required) <= n_inputs <= len(params):
        raise DualgraphError(
            f"{type(gm).__name__}.forward takes {len(required)} tensor argument(s) "
            f"({', '.join(n.target for n in required)}) but got {n_inputs} example input(s); "
            "pass a tuple with one example batch per argument")


def _get_attr(gm: torch.fx.GraphModule, target: str) -> Any:
    # The tensor itself (not a detached view): its id names the IR constant, and
    # _Lowering.const detaches and clones it when it enters the graph.
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _check_against_module(graph: Graph, module: nn.Module, inputs: Sequence[torch.Tensor]) -> None:
    """The lowered graph must reproduce the module on the example (shapes, then values)."""
    with torch.no_grad(), _eval_mode(module):
        ref = module(*(x.clone() for x in inputs))
    refs = list(ref) if isinstance(ref, (tuple, list)) else [ref]
    batch = inputs[0].shape[0]
    for v, r in zip(graph.outputs, refs):
        want = (BATCH, *r.shape[1:])
        if r.dim() == 0 or r.shape[0] != batch or tuple(v.shape) != want:
            raise DualgraphError(
                f"output '{v.name}' of the lowered graph has shape {v.shape} but the module returns "
                f"{tuple(r.shape)} for a batch of {batch}; the model must keep the batch dimension first")
    with torch.no_grad():
        got = run_graph(graph, *inputs)
    # Loose enough for float32 rounding (and TF32 convolutions on CUDA), tight enough for any
    # real mistranslation, which is off by the order of the values themselves.
    rel = 1e-2 if inputs[0].is_cuda else 1e-4
    for v, g, r in zip(graph.outputs, got, refs):
        diff = (g.to(r.dtype) - r).abs()
        diff[g.isnan() & r.isnan()] = 0.0  # the same NaN on both sides is agreement
        scale = float(r.nan_to_num().abs().max()) if r.numel() else 0.0
        err = float(diff.max()) if r.numel() else 0.0
        if not err <= rel * max(1.0, scale):  # `not <=` also catches a NaN on one side only
            raise DualgraphError(
                f"output '{v.name}' of the lowered graph differs from the module by {err:.3g} on "
                "example_input (an in-place op whose input is reused, or a frontend bug); export the "
                "model to ONNX instead")


def load_module(module: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]) -> Graph:
    """Lower ``module`` to a verified IR graph with inference (eval-mode) semantics.

    ``example_input`` is one batch (batch dimension first) or a tuple with one batch per
    ``forward`` argument; it fixes the per-example shapes and is used to check the result.
    Raises :class:`UnsupportedOpError` listing every node that cannot be lowered, and
    :class:`DualgraphError` for untraceable modules or a graph that disagrees with torch.
    """
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    if not inputs or not all(isinstance(x, torch.Tensor) and x.dim() >= 1 for x in inputs):
        raise DualgraphError("example_input must be a tensor (or a tuple of tensors) with the batch dimension first")
    with _eval_mode(module):
        gm = _trace(module)
        _check_arity(gm, len(inputs))
        try:
            with torch.no_grad():  # clones: an in-place op in forward must not edit the caller's batch
                ShapeProp(gm).propagate(*(x.clone() for x in inputs))  # example shapes of all fx nodes
        except Exception as exc:
            cause = exc  # ShapeProp wraps the real error; report that one
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise DualgraphError(f"running {type(module).__name__} on example_input failed: "
                                 f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}") from exc
        graph = _lower(gm, inputs)
    infer_shapes(graph)
    _check_against_module(graph, module, inputs)
    verify(graph)
    return graph
