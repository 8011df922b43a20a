"""onnxruntime's activation fusions that bring their own constants.

At its default optimisation level onnxruntime replaces the subgraphs of a Gelu (``x 0.5 (1 +
erf(x / sqrt 2))``) and of its tanh form (``x 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``)
by one kernel (``Gelu``, ``FastGelu``, ``BiasGelu``), matching the subgraph's constants only
to about 1e-5 relative and then computing with its own. A model whose 0.5 is 0.500005
computes ``1.00001 x`` for large ``x``; onnxruntime computes ``x``: a certificate for the
model is none for onnxruntime's function (found by a review: a lower bound of 9999.03 where
onnxruntime gives 9999.00). :func:`check_constant_fusions` runs onnxruntime's optimiser on
models with an Erf or a Tanh and refuses one where a fused subgraph's constant is near one of
the kernels' constants but not equal to it in float32; dualgraph then bounds the subgraph as
written, which is what onnxruntime computes up to rounding.
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

MATCH_TOLERANCE = 1e-4
"""A constant this close (relative) to a kernel constant is taken for it by the matcher
(onnxruntime's own tolerance is 1e-5 relative plus 1e-8)."""


def check_constant_fusions(model: onnx.ModelProto) -> None:
    """Raise :class:`DualgraphError` if onnxruntime fuses a subgraph of ``model`` into one of
    :data:`FUSED_KERNELS` whose constants differ from the subgraph's (module docstring)."""
    if not any(n.op_type in ("Erf", "Tanh") for n in model.graph.node):
        return
    fused = [n for n in _optimised(model).graph.node if n.op_type in FUSED_KERNELS]
    if not fused:
        return
    producers = {out: n for n in model.graph.node for out in n.output}
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            constants[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    for kernel in fused:
        for name, value in _subgraph_constants(kernel, producers, constants):
            _check_constant(kernel, name, value)


def _optimised(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as onnxruntime's optimiser leaves it at the level that holds these fusions
    (extended: before the layout changes of the default level, which do not touch them)."""
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "optimised.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = path
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(path)


def _subgraph_constants(kernel: onnx.NodeProto, producers: dict, constants: dict):
    """``(name, value)`` of the float constants read by the original nodes between the fused
    kernel's inputs and its output (the kernel keeps those names)."""
    stop, seen, stack = set(kernel.input), set(), list(kernel.output)
    while stack:
        name = stack.pop()
        node = producers.get(name)
        if name in stop or node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for i in node.input:
            if i in constants and constants[i].dtype.kind == "f" and constants[i].size == 1:  # the matchers' scalars
                yield i, constants[i]
            elif i not in stop:
                stack.append(i)


def _check_constant(kernel: onnx.NodeProto, name: str, value: np.ndarray) -> None:
    v = float(value.reshape(()))
    near = min(KERNEL_CONSTANTS, key=lambda k: abs(v - k) / abs(k))
    gap = abs(v - near) / abs(near)
    if 0 < gap <= MATCH_TOLERANCE:
        raise DualgraphError(
            f"constant '{name}' ({v:.9g}): onnxruntime evaluates the subgraph ending in "
            f"'{kernel.output[0]}' as one {kernel.op_type} kernel with {near:.9g} instead ({gap:.1e} "
            "relative), i.e. another function than the model's; write the constant exactly")
