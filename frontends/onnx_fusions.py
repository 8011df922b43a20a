"""onnxruntime's fusions that compute another function than the subgraph they replace.

At its default optimisation level onnxruntime replaces the subgraphs of a Gelu (``x 0.5 (1 +
erf(x / sqrt 2))``) and of its tanh form (``x 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``)
by one kernel (``Gelu``, ``FastGelu``, ``BiasGelu``), matching the subgraph's constants only
to about 1e-5 relative and then computing with its own. A model whose 0.5 is 0.500005
computes ``1.00001 x`` for large ``x``; onnxruntime computes ``x``: a certificate for the
model is none for onnxruntime's function (found by a review: a lower bound of 9999.03 where
onnxruntime gives 9999.00). :func:`check_fusions` runs onnxruntime's optimiser on
models with an Erf or a Tanh and refuses one where a fused subgraph's constant is near one of
the kernels' constants but not equal to it in float32; dualgraph then bounds the subgraph as
written, which is what onnxruntime computes up to rounding.

Its layer-norm fusions (``LayerNormalization`` from ``ReduceMean, Sub, Pow, ReduceMean, Add,
Sqrt, Div``; the simplified form without the mean; their ``Skip`` forms with a residual Add)
match the subgraph by its op types and links alone: a Pow exponent of 4, ``mean(x) - x`` or
``sqrt(v + eps) / d`` is fused too, and onnxruntime then computes a layer norm where the model
computes something else (found by a review: a certified lower bound of 1.7318 where onnxruntime
gives -1.732, and a wrong ``unsat``). :func:`check_fusions` refuses a model where such a kernel
replaces anything but an exact layer norm (:func:`_check_layer_norm`).
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper

from dualgraph.errors import DualgraphError

FUSED_KERNELS = {"Gelu", "FastGelu", "BiasGelu"}
"""onnxruntime's kernels (domain ``com.microsoft``) that replace a subgraph with constants."""

KERNEL_CONSTANTS = tuple(float(np.float32(c)) for c in (
    0.5, 1.0, 2.0, 3.0, math.sqrt(2.0), 1 / math.sqrt(2.0), math.sqrt(2 / math.pi), 0.044715,
    0.044715 * math.sqrt(2 / math.pi)))
"""The constants of those kernels, as float32 (sqrt 2 for a division, 1/sqrt 2 for a product,
sqrt(2/pi), 0.044715 and their product for the tanh form)."""

UNKNOWN_OP_ERRORS = ("is not a registered function/op", "Could not find an implementation", "NOT_IMPLEMENTED")
"""onnxruntime's words for an op it has no kernel for (a plugin's): it fuses nothing then."""

LAYER_NORM_KERNELS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                      "SkipSimplifiedLayerNormalization"}
"""onnxruntime's kernels that replace a written-out layer norm (domains ``""`` and ``com.microsoft``)."""

MATCH_TOLERANCE = 1e-4
"""A constant this close (relative) to a kernel constant is taken for it by the matcher
(onnxruntime's own tolerance is 1e-5 relative plus 1e-8)."""


def check_fusions(model: onnx.ModelProto) -> None:
    """Raise :class:`DualgraphError` if onnxruntime replaces a subgraph of ``model`` by a kernel
    that computes another function: one of :data:`FUSED_KERNELS` whose constants differ from the
    subgraph's, or one of :data:`LAYER_NORM_KERNELS` over anything but a layer norm (module
    docstring). Models without the ops those fusions start from skip onnxruntime's optimiser."""
    ops = {n.op_type for n in model.graph.node}
    gelu, layer_norm = bool(ops & {"Erf", "Tanh"}), {"ReduceMean", "Sqrt"} <= ops
    if not (gelu or layer_norm):
        return
    kernels = FUSED_KERNELS | LAYER_NORM_KERNELS
    optimised = _optimised(model)
    fused = [] if optimised is None else [n for n in optimised.graph.node if n.op_type in kernels]
    if not fused:
        return
    producers = {out: n for n in model.graph.node for out in n.output}
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and (value := _constant_value(n.attribute[0])) is not None:
            constants[n.output[0]] = value
    ranks = None
    for kernel in fused:
        nodes = _replaced_nodes(kernel, producers)
        if kernel.op_type in FUSED_KERNELS:
            for node in nodes:
                for name in node.input:
                    value = constants.get(name)
                    if value is not None and value.dtype.kind == "f" and value.size == 1:  # the matchers' scalars
                        _check_constant(kernel, name, value)
        elif len(nodes) > 1 or (nodes and nodes[0].op_type != kernel.op_type):  # a fusion, not the model's own node
            if ranks is None:
                ranks = _ranks(model)
            _check_layer_norm(kernel, nodes, producers, constants, ranks)


def _optimised(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The model as onnxruntime's optimiser leaves it at the level that holds these fusions
    (extended: before the layout changes of the default level, which do not touch them); None
    where onnxruntime cannot open the model (ops that plugins define): it fuses nothing then."""
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "optimised.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = path
        options.log_severity_level = 3
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 -- onnxruntime's own error types
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            if any(words in reason for words in UNKNOWN_OP_ERRORS):
                return None
            raise DualgraphError(f"onnxruntime cannot open the model to check what it fuses ({reason[:200]}); "
                                 "a model with external data: load it from a single file") from None
        return onnx.load(path)


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """The rank of every value whose shape onnx's inference knows (none where it fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 -- onnx's inference errors: no ranks, raw axes compared
        return {}
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    return {v.name: len(v.type.tensor_type.shape.dim) for v in values if v.type.tensor_type.HasField("shape")}


def _constant_value(attribute: onnx.AttributeProto) -> np.ndarray | None:
    """A Constant node's value, whichever attribute holds it (``value``, ``value_float``, ...);
    None for a sparse one (left out: a check that needs it refuses)."""
    value = onnx.helper.get_attribute_value(attribute)
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    return np.asarray(value) if isinstance(value, (int, float, list, bytes)) else None


def _replaced_nodes(kernel: onnx.NodeProto, producers: dict) -> list[onnx.NodeProto]:
    """The original nodes between the fused kernel's inputs and its outputs (the kernel keeps
    those names)."""
    stop, seen, stack, found = set(kernel.input), set(), list(kernel.output), []
    while stack:
        name = stack.pop()
        node = producers.get(name)
        if name in stop or node is None or id(node) in seen:
            continue
        seen.add(id(node))
        found.append(node)
        stack.extend(i for i in node.input if i not in stop)
    return found


def _check_layer_norm(kernel: onnx.NodeProto, nodes: list[onnx.NodeProto], producers: dict, constants: dict,
                      ranks: dict[str, int]) -> None:
    """Raise unless ``nodes`` compute exactly what the layer-norm ``kernel`` does: every Pow
    squares (exponent 2), every Sub is ``x - mean(x)``, every Div and Reciprocal divides by a
    ``sqrt``, the constant added under the ``sqrt`` is the kernel's ``epsilon`` (in float32) and
    every mean is over the same axes (negative ones read by ``ranks``) and keeps them. Checked
    on the nodes, whatever links onnxruntime's matcher
    followed (with or without Casts, one Sub or two)."""
    epsilon = next((a.f for a in kernel.attribute if a.name == "epsilon"), 1e-5)

    def made_by(name: str) -> str | None:
        node = producers.get(name)
        return None if node is None else node.op_type

    def refuse(node: onnx.NodeProto, what: str) -> None:
        raise DualgraphError(
            f"onnxruntime evaluates the subgraph ending in '{kernel.output[0]}' as one {kernel.op_type} kernel, "
            f"but node '{node.name or node.output[0]}' ({node.op_type}) {what}, so the model computes another "
            "function; write the layer norm exactly (or as one LayerNormalization node)")

    axes = set()
    for node in nodes:
        if node.op_type == "Pow":
            exponent = constants.get(node.input[1])
            if exponent is None or not np.all(exponent.astype(np.float64) == 2.0):
                refuse(node, "does not square its input (its exponent is not the constant 2)")
        elif node.op_type == "Sub":
            mean = producers.get(node.input[1])
            if mean is None or mean.op_type != "ReduceMean" or mean.input[0] != node.input[0]:
                refuse(node, "is not x - mean(x)")
        elif node.op_type in ("Div", "Reciprocal"):
            divisor = node.input[1] if node.op_type == "Div" else node.input[0]
            if made_by(divisor) != "Sqrt" or (node.op_type == "Div" and made_by(node.input[0]) == "Sqrt"):
                refuse(node, "does not divide by the square root of the variance")
        elif node.op_type == "Sqrt":
            add = producers.get(node.input[0])
            offsets = [] if add is None or add.op_type != "Add" else [constants[i] for i in add.input if i in constants]
            if len(offsets) != 1 or not np.all(offsets[0].astype(np.float32) == np.float32(epsilon)):
                refuse(node, f"is not the square root of the variance plus the kernel's epsilon {epsilon:.9g}")
        elif node.op_type == "ReduceMean":
            given = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
            if given is None and len(node.input) > 1 and node.input[1] in constants:
                given = [int(a) for a in constants[node.input[1]].ravel()]
            if next((a.i for a in node.attribute if a.name == "keepdims"), 1) != 1:
                refuse(node, "drops the reduced dimensions (keepdims 0), which the kernel keeps")
            rank = ranks.get(node.input[0])
            if given is not None and rank is not None:
                given = [a % rank for a in given]
            axes.add(None if given is None else tuple(sorted(given)))
            if len(axes) > 1:
                refuse(node, "takes its mean over other axes than the other mean")


def _check_constant(kernel: onnx.NodeProto, name: str, value: np.ndarray) -> None:
    v = float(value.reshape(()))
    near = min(KERNEL_CONSTANTS, key=lambda k: abs(v - k) / abs(k))
    gap = abs(v - near) / abs(near)
    if 0 < gap <= MATCH_TOLERANCE:
        raise DualgraphError(
            f"constant '{name}' ({v:.9g}): onnxruntime evaluates the subgraph ending in "
            f"'{kernel.output[0]}' as one {kernel.op_type} kernel with {near:.9g} instead ({gap:.1e} "
            "relative), i.e. another function than the model's; write the constant exactly")
