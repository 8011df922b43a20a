"""torch.nn.Module -> torch.fx -> dualgraph IR.

:func:`load_module` traces a module with ``torch.fx.symbolic_trace`` semantics and lowers
every fx node to IR nodes with ONNX semantics (the same ops :mod:`dualgraph.frontends.onnx` emits),
so passes, the interpreter and the dual-layer registry never see torch.fx.

Semantics are those of **inference** (``module.eval()``): BatchNorm uses its running
statistics, Dropout is the identity, and ``self.training`` is ``False`` while tracing. The
module itself is left as it was: its train/eval flags are restored afterwards.

How a node is lowered:

* ``call_module`` of a known layer type (exact type: a subclass that overrides ``forward``
  is traced through instead), ``call_function`` of a known function and ``call_method`` of a
  known Tensor method go through the lowering rule of an op definition
  (``OpDefinition.fx_lowering``; plugins are loaded before tracing, so theirs count too).
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
lowered graph is checked against the module on ``example_input`` (shapes and values) and on a
uniform and a normal random batch of its shapes (values, up to rounding), so a lowering that
disagrees with torch (e.g. an in-place op whose input is reused) is an error instead of a
wrong certificate.

Supporting another op: write ``rule(lo, call) -> Value`` next to the op's definition and
decorate it with ``@definition.fx_lowering(nn.MyLayer, my_function, "tensor_method_name")``.

Layout: this module traces and drives the lowering; the lowering state (``Lowering``) is in
:mod:`dualgraph.frontends.fx_lowering`, what rules receive (``Call``) in
:mod:`dualgraph.lowering`, the rules with their ops in :mod:`dualgraph.ops`, and the
frontend's own plumbing (sizes, indexing) in :mod:`dualgraph.frontends.fx_plumbing`.
"""

from __future__ import annotations

import inspect
import operator
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.fx
import torch.nn as nn
from torch.fx.node import map_arg
from torch.fx.passes.shape_prop import ShapeProp

from dualgraph.errors import DualgraphError, UnsupportedOpError
from dualgraph.frontends.agreement import OVERFLOW_SHARE, differences
from dualgraph.interpreter import infer_shapes, run_graph
from dualgraph.ir import BATCH, Graph, Value, check_graph
from dualgraph.lowering import BATCH_SIZE, Call, FxRule, Unsupported
from dualgraph.op_registry import FUNCTION_RULES, METHOD_RULES, MODULE_RULES, ensure_ops_loaded
from dualgraph.frontends import fx_plumbing  # noqa: F401  (registers the frontend's own rules)
from dualgraph.frontends.fx_lowering import POISON, Lowering, example_shape, example_shapes

__all__ = ["load_module"]


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
            "(torch.onnx.export) and load the file (dualgraph.api.load_model), or make forward traceable "
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


def _rule_for(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[FxRule | None, nn.Module | None]:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return MODULE_RULES.get(type(m)), m
    if node.op == "call_method":
        return METHOD_RULES.get(node.target), None
    try:
        return FUNCTION_RULES.get(node.target), None
    except TypeError:  # an unhashable callable cannot be in the table
        return None, None


_IN_PLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv)


def _mutates_a_reused_input(node: torch.fx.Node, module: nn.Module | None) -> bool:
    """Whether ``node`` overwrites its first input (``inplace=True``, an in-place operator) while
    another node reads that input too: torch then sees the new values there, a lowering the old
    (a review: ``identity = x; out = relu_inplace(x); out + identity`` is ``2 relu(x)`` in torch).
    Dropout is the identity at inference, in place or not."""
    first = node.args[0] if node.args else None
    if not isinstance(first, torch.fx.Node) or len(first.users) <= 1:
        return False
    if module is not None:
        return bool(getattr(module, "inplace", False)) and not isinstance(module, nn.modules.dropout._DropoutNd)
    if node.op == "call_function":
        if node.target in _IN_PLACE_OPERATORS:
            return True
        if getattr(node.target, "__name__", "").startswith(("dropout", "alpha_dropout", "feature_alpha_dropout")):
            return False
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        except (TypeError, ValueError):
            return bool(node.kwargs.get("inplace", False))
        return bool(bound.arguments.get("inplace", False))
    return False


def _lower_call(lo: Lowering, node: torch.fx.Node) -> Any:
    """Lower one call node; returns its env entry (a Value, a constant, or POISON)."""
    args = map_arg(node.args, lo.env.__getitem__)
    kwargs = map_arg(node.kwargs, lo.env.__getitem__)
    flat = list(_flatten_args((args, kwargs)))
    rule, module = _rule_for(lo.gm, node)
    where = f"{_target_name(lo.gm, node)} (node '{node.name}')"
    if any(a is POISON for a in flat):
        if rule is None:  # report it too, the user wants the whole list at once
            lo.problems.append(where)
            lo.unknown_targets = True
        return POISON
    if not any(isinstance(a, Value) for a in flat):
        if any(a is BATCH_SIZE for a in flat):
            if node.target is operator.getitem:  # indexing x.size() / x.shape
                return args[0][args[1]]
            lo.problems.append(f"{where}: computes with the batch size x.size(0), which is only "
                               "allowed as the first entry of view/reshape")
            return POISON
        try:  # nothing depends on the input: a constant subexpression
            folded = _fold(lo.gm, node, tuple(args), dict(kwargs))
        except Exception as exc:
            lo.problems.append(f"{where}: failed on constants: {type(exc).__name__}: "
                               f"{(str(exc).splitlines() or [''])[0]}")
            return POISON
        lo.note_folded(folded, flat, lo.gm.get_submodule(node.target) if node.op == "call_module" else None)
        return folded
    if rule is None:
        lo.problems.append(where)
        lo.unknown_targets = True
        return POISON
    if _mutates_a_reused_input(node, module):
        lo.problems.append(f"{where}: runs in place on a value that is used again (the IR would read the value "
                           "before the op, torch after it); pass inplace=False")
        return POISON
    try:
        return rule(lo, Call(node, tuple(args), dict(kwargs), module))
    except Unsupported as exc:
        lo.problems.append(f"{where}: {exc}")
        return POISON


def _lower(gm: torch.fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Graph:
    graph = Graph(type(gm).__name__)
    lo = Lowering(gm, graph)
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
                if v is not POISON and not isinstance(v, Value):
                    lo.problems.append(f"output '{getattr(o, 'name', o)}': must be a tensor computed from "
                                       "the input (not a constant, dict or nested structure)")
                graph.outputs.append(v)
        else:
            out = _lower_call(lo, node)
            if isinstance(out, Value) and out not in lo.shapes:
                lo.shapes[out] = example_shape(node)
            elif isinstance(out, tuple) and out and all(isinstance(v, Value) for v in out):
                lo.shapes.update((v, s) for v, s in zip(out, example_shapes(node)) if v not in lo.shapes)
            lo.env[node] = out
    if lo.problems:
        supported = f" Supported: {_supported()}." if lo.unknown_targets else ""
        raise UnsupportedOpError(
            f"the torch.fx frontend cannot lower {graph.name}: {'; '.join(lo.problems)}.{supported} "
            "Export the model to ONNX, or lower it in an op definition (dualgraph.define_op(...).fx_lowering, "
            "README 'Writing a dual layer')")
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
    # Lowering.const detaches and clones it when it enters the graph.
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
    _check_at_random_inputs(graph, module, inputs)


def _check_at_random_inputs(graph: Graph, module: nn.Module, inputs: Sequence[torch.Tensor]) -> None:
    """The lowered graph must reproduce the module at random inputs too, entry by entry up to
    rounding (:mod:`dualgraph.frontends.agreement`): an example can hide a lowering of another
    function (one that agrees wherever the example's entries are positive, say). One uniform
    batch in ``[0, 1]`` and one standard normal batch, shaped like ``example_input``."""
    if not all(x.dtype.is_floating_point for x in inputs):
        return  # indices need valid values: the example is the only reference
    generator = torch.Generator().manual_seed(0)
    for kind, draw in (("uniform", torch.rand), ("normal", torch.randn)):
        batch = [draw(x.shape, generator=generator, dtype=torch.float64).to(x) for x in inputs]
        with torch.no_grad(), _eval_mode(module):
            try:
                ref = module(*(x.clone() for x in batch))
            except Exception:  # noqa: BLE001 -- the module refuses such inputs: nothing to compare with
                return
            ours = run_graph(graph, *batch)
            accurate = ours if batch[0].dtype == torch.float64 else run_graph(graph, *(x.double() for x in batch))
        refs = list(ref) if isinstance(ref, (tuple, list)) else [ref]
        for v, got, exact, want in zip(graph.outputs, ours, accurate, refs):
            if not (got.dtype.is_floating_point and want.dtype.is_floating_point):
                continue
            limit = OVERFLOW_SHARE * torch.finfo(got.dtype).max
            got, exact, want = (t.detach().double().cpu().numpy().ravel() for t in (got, exact, want))
            off = differences(got, exact, want, limit)
            if off.any():
                j = int(off.nonzero()[0][0])
                raise DualgraphError(
                    f"output '{v.name}' of the lowered graph differs from the module on a random {kind} "
                    f"input (entry {j}: {got[j]!r} against the module's {want[j]!r}; example_input agreed): "
                    "the lowering computes another function -- export the model to ONNX instead, and "
                    "please report this frontend bug")


_TRAINING_SENSITIVE = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


def _warn_if_training(module: nn.Module) -> None:
    """Say so when layers that behave differently in training mode are lowered as at inference."""
    live = sorted({type(m).__name__ for m in module.modules() if m.training and isinstance(m, _TRAINING_SENSITIVE)})
    if live:
        warnings.warn(f"{type(module).__name__} is in training mode ({', '.join(live)} would behave differently); "
                      "it is lowered with inference semantics, as after module.eval(): call .eval() first to "
                      "silence this", UserWarning, stacklevel=3)


def load_module(module: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor], *,
                warn_training: bool = True) -> Graph:
    """Lower ``module`` to a verified IR graph with inference (eval-mode) semantics.

    ``example_input`` is one batch (batch dimension first) or a tuple with one batch per
    ``forward`` argument; it fixes the per-example shapes and is used to check the result.
    Raises :class:`UnsupportedOpError` listing every node that cannot be lowered, and
    :class:`DualgraphError` for untraceable modules or a graph that disagrees with torch.
    A module with Dropout or BatchNorm layers in training mode is lowered with their inference
    semantics, with a warning unless ``warn_training=False`` (the robust loss, which means it).
    """
    if warn_training:
        _warn_if_training(module)
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    if not inputs or not all(isinstance(x, torch.Tensor) and x.dim() >= 1 for x in inputs):
        raise DualgraphError("example_input must be a tensor (or a tuple of tensors) with the batch dimension first")
    ensure_ops_loaded()  # built-in and plugin lowering rules, before tracing decides what is a leaf
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
    check_graph(graph)
    return graph
