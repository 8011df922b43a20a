"""The public Python API: load a model, compute certified bounds, certify a batch.

This module is the composition root: it wires the frontends (``frontends/``), the passes
(``passes/``) and the core (IR, dual layers, scheduler). The core modules import
neither frontends nor passes.

Example::

    from dualgraph.api import load_model, Certifier
    graph = load_model("model.onnx")
    cert = Certifier(graph)
    result = cert.certify(x, y, eps=0.1, clip=(0.0, 1.0))
    result.certified        # bool per example: every margin logit[y] - logit[j] > 0 proved
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .dual_registry import Bounds
from .errors import DualgraphError
from .input_sets import InputSet, make_input_set
from .interpreter import Interpreter
from .ir import EVALUATED_IN, Graph, Value
from .rounding import unit_roundoff
from .scheduler import BoundConfig, BoundScheduler


def load_model(source, example_input: torch.Tensor | None = None, *, simplify: bool = True,
               warn_training: bool = True) -> Graph:
    """An IR graph from an ``.onnx`` path, an ``onnx.ModelProto``, a model name from ``models/``
    or an ``nn.Module`` (with ``example_input``, through torch.fx), simplified by the passes. An
    ONNX model's graph is compared with onnxruntime on random inputs as lowered, before the
    passes (:func:`~dualgraph.frontends.onnx.check_against_onnxruntime`; the passes keep the
    function, which their tests check in exact arithmetic).
    A module in training mode is lowered with inference semantics (warned, unless
    ``warn_training=False``)."""
    if isinstance(source, torch.nn.Module):
        from dualgraph.frontends.fx import load_module
        if example_input is None:
            raise DualgraphError("a torch module needs an example input to be traced")
        graph = load_module(source, example_input, warn_training=warn_training)
    elif isinstance(source, Graph):
        graph = source
    else:
        import onnx
        onnx_source = source
        if not isinstance(source, onnx.ModelProto):
            onnx_source = Path(str(source))
            if not onnx_source.exists():
                from dualgraph.models import ZOO, resolve_model
                if str(source) in ZOO or not onnx_source.suffix:  # a zoo name ("digits-small", "mnist-small-0.1")
                    onnx_source = resolve_model(str(source))
        from dualgraph.frontends.onnx import check_against_onnxruntime, load_onnx
        graph = load_onnx(onnx_source)
        check_against_onnxruntime(onnx_source, graph)  # as lowered: op by op, as onnxruntime runs it
    if simplify:
        from dualgraph.passes.pipeline import simplify as run_passes
        graph = run_passes(graph)
    return graph


def add_input_normalization(graph: Graph, mean, std) -> Graph:
    """Prepend ``(x - mean) / std`` (per channel) so inputs and eps live in pixel space.

    The passes fold it into the first affine op where that is exact.
    """
    from .interpreter import infer_shapes
    from .ir import check_graph
    x = graph.inputs[0]
    channels = x.unit_shape[0] if len(x.unit_shape) >= 1 else 1
    mean = list(mean or [0.0])
    std = list(std or [1.0])
    for name, vals in (("--mean", mean), ("--std", std)):
        if len(vals) not in (1, channels):
            wanted = "1 value (the input has one channel)" if channels == 1 else \
                f"1 or {channels} values (one per input channel)"
            raise DualgraphError(f"{name} needs {wanted}, got {len(vals)}")
    dtype = x.dtype  # the constants are the input's precision: checked as they will be
    mean, std = (torch.tensor([float(v) for v in vals], dtype=torch.float64).to(dtype).tolist() for vals in (mean, std))
    if not all(math.isfinite(v) for v in [*mean, *std]):
        raise DualgraphError(f"--mean and --std values must be finite numbers in the model's "
                             f"{str(dtype).replace('torch.', '')} input")
    if any(s < torch.finfo(dtype).tiny for s in std):
        raise DualgraphError(f"--std values must be positive (at least {torch.finfo(dtype).tiny:.3g} in the model's "
                             f"{str(dtype).replace('torch.', '')} input)")
    tail = [1] * (len(x.unit_shape) - 1)
    shape = [len(mean) if len(mean) > 1 else 1, *tail] if x.unit_shape else [1]
    mean_v = graph.add_const(graph.fresh_name("input_mean"), torch.tensor(mean, dtype=dtype).reshape(shape))
    std_v = graph.add_const(graph.fresh_name("input_std"),
                            torch.tensor(std, dtype=dtype).reshape([len(std) if len(std) > 1 else 1, *tail] if x.unit_shape else [1]))
    first = graph.nodes[0] if graph.nodes else None
    sub = graph.add_node("Sub", [x, mean_v], name=graph.fresh_name("normalize_sub"))
    div = graph.add_node("Div", [sub.output, std_v], name=graph.fresh_name("normalize_div"))
    graph.replace_all_uses(x, div.output)
    graph.set_input(sub, 0, x)  # the normalisation itself still reads the raw input
    if first is not None:
        graph.move_node(sub, before=first)
        graph.move_node(div, after=sub)
    infer_shapes(graph)
    check_graph(graph)
    return graph


def _readout(graph: Graph):
    """The trailing node that only reads the class off the logits (Softmax, or ArgMax over the
    class axis of ``[N, K]`` logits), or None."""
    node = graph.outputs[0].producer if len(graph.outputs) == 1 else None
    if node is None or len(node.var_inputs) != 1 or len(node.inputs[0].users) != 1:
        return None
    if node.op == ("", "Softmax"):  # keeps the order of the classes only over all of them (a review)
        x = node.inputs[0]
        axis = int(node.attrs.get("axis", -1)) % len(x.shape)
        return node if int(x.shape[axis]) == x.numel else None
    if node.op == ("", "ArgMax") and len(node.inputs[0].shape) == 2 and int(node.attrs.get("axis", 0)) in (1, -1):
        return node
    return None


def ends_in_readout(graph: Graph) -> bool:
    return _readout(graph) is not None


def strip_readout(graph: Graph) -> Graph:
    """Drop trailing class readouts **in place**: a Softmax (it keeps the logits' order) and an
    ArgMax over the classes (the class it reads off is what margins > 0 certify), so
    certification works on the logits; the graph itself when there is none."""
    _strip_readouts(graph)
    return graph


def _strip_readouts(graph: Graph) -> list[tuple[str, str]]:
    """:func:`strip_readout`'s work: the ops removed, outermost first."""
    removed = []
    while (node := _readout(graph)) is not None:
        graph.outputs = [node.inputs[0]]
        graph.remove_node(node)
        removed.append(node.op)
    return removed


SOFTMAX_TIE_ULPS = 64
"""Where a trailing Softmax was left out, a certificate needs every logit margin above this
many unit roundoffs of the evaluated precision (float32: 3.8e-6): ``exp`` of a margin below it
may round to 1 (a few ulps of onnxruntime's approximation included) and the probabilities tie."""


def margin_spec(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows ``e_y - e_j`` for every ``j != y``: ``[B, K-1, K]``; ``C f(x) > 0`` proves class ``y``."""
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise DualgraphError(f"labels must be in 0..{num_classes - 1} for a model with {num_classes} outputs, "
                             f"got values {int(labels.min())}..{int(labels.max())}")
    eye = torch.eye(num_classes, dtype=torch.float64)
    spec = eye[labels].unsqueeze(1) - eye.unsqueeze(0)                 # [B, K, K]
    others = ~torch.nn.functional.one_hot(labels, num_classes).bool()  # drop the j == y row
    return spec[others].view(len(labels), num_classes - 1, num_classes)


@dataclass
class CertifyResult:
    """Per-example results of :meth:`Certifier.certify`."""

    predictions: torch.Tensor   # [B] argmax of the logits at the clean input
    correct: torch.Tensor       # [B] bool
    certified: torch.Tensor     # [B] bool: correct and every margin bound > 0 (a proof only if `sound`)
    margins: torch.Tensor       # [B, K-1] lower bounds of logit[y] - logit[j]
    sound: bool = True          # False with random projections: `certified` and `margins` are estimates


class Certifier:
    """Exact dual bounds (Theorem 1) for one graph; dual graphs are built once and reused.

    ``logits=True`` (the default): a trailing Softmax or class ArgMax is left out (from a copy;
    the caller's graph is never changed), so :meth:`forward` and :meth:`lower_bounds` are about
    the logits, which is what margin certificates need (softmax keeps their order; the class
    argmax reads off is the one positive margins prove).
    ``logits=False`` keeps the graph as it is (a trailing Softmax then has no dual layer).
    Where a Softmax was left out, :meth:`certify` needs every margin above
    :attr:`margin_needed` (:data:`SOFTMAX_TIE_ULPS`), not only above 0.
    """

    def __init__(self, graph: Graph, config: BoundConfig = BoundConfig(),
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
                 logits: bool = True) -> None:
        self.graph, removed = graph, []
        if logits and ends_in_readout(graph):
            self.graph = graph.copy()
            removed = _strip_readouts(self.graph)
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise DualgraphError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
        self.scheduler = BoundScheduler(self.graph, config)
        self.interpreter = Interpreter(self.graph)
        self.output: Value = self.graph.outputs[0]
        self.input: Value = self.graph.inputs[0]
        # a stripped Softmax keeps the logits' order only up to its own rounding: logits closer than
        # a few ulps of 1 give equal probabilities, and the ArgMax then takes the first (a review)
        evaluated = {self.input.dtype, *self.graph.meta.get(EVALUATED_IN, ())}  # the coarsest precision (a Cast)
        self.margin_needed = SOFTMAX_TIE_ULPS * max(map(unit_roundoff, evaluated)) if ("", "Softmax") in removed \
            else 0.0

    @property
    def num_outputs(self) -> int:
        return self.output.numel

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(device=self.device, dtype=self.dtype)
        expect = tuple(self.input.unit_shape)
        if tuple(x.shape[1:]) != expect:
            if x[0].numel() == self.input.numel:
                return x.reshape(x.shape[0], *expect)
            raise DualgraphError(f"input shape {tuple(x.shape[1:])} does not match the model's input "
                                 f"{list(expect)} ({self.input.numel} values per example)")
        return x

    def input_set(self, x: torch.Tensor, eps: float, norm: str = "linf",
                  clip: tuple[float, float] | None = None) -> InputSet:
        return make_input_set(self._prepare(x), eps, norm, clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.interpreter.run(self._prepare(x))[0].reshape(x.shape[0], -1)

    def intermediate_bounds(self, input_set: InputSet) -> dict[Value, Bounds]:
        return self.scheduler.intermediate_bounds(input_set)

    def lower_bounds(self, input_set: InputSet, spec: torch.Tensor, *, goal: float | None = None,
                     candidates: torch.Tensor | None = None) -> torch.Tensor:
        """Certified lower bounds of ``spec @ f(x')`` for all ``x'`` in the set: ``[B, m]``,
        where ``f`` is ``self.graph`` (the logits when a trailing Softmax was left out).
        ``goal``, ``candidates``: which rows optimised slopes work on
        (:meth:`BoundScheduler.bound_output`)."""
        return self.scheduler.bound_output(input_set, spec.to(device=self.device, dtype=self.dtype),
                                           goal=goal, candidates=candidates)

    def certify(self, x: torch.Tensor, labels: torch.Tensor, eps: float, norm: str = "linf",
                clip: tuple[float, float] | None = None) -> CertifyResult:
        """Certify that every point within ``eps`` of each ``x`` is classified as its label."""
        with torch.no_grad():
            logits = self.forward(x)
            if bool(logits.isnan().any()):
                k = int(logits.isnan().any(1).nonzero()[0])
                raise DualgraphError(f"the model outputs NaN on input {k} of this batch (NaN weights, or an op "
                                     "such as Log or Sqrt of a negative value); check the model: a certificate "
                                     "about its class would mean nothing")
            preds = logits.argmax(1)
            correct = preds == labels.to(self.device)
            spec = margin_spec(labels.to(self.device), self.num_outputs)
            # optimised slopes only where they can still make a certificate
            margins = self.lower_bounds(self.input_set(x, eps, norm, clip), spec, goal=0.0, candidates=correct)
        certified = correct & (margins > self.margin_needed).all(1)
        return CertifyResult(preds.cpu(), correct.cpu(), certified.cpu(), margins.cpu(), sound=self.config.sound)
