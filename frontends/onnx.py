"""ONNX frontend: an ``.onnx`` file or ``onnx.ModelProto`` -> dualgraph IR.

Batch layouts. The IR puts a symbolic batch axis first on every variable value; ONNX
models come in two kinds, and every variable ONNX tensor is tracked with one of them:

* **batch** -- the ONNX tensor's axis 0 *is* the batch: the model's input had a symbolic
  leading dimension (``dynamic``: any batch can be fed to onnxruntime at once) or a fixed
  leading 1 with rank >= 2 (one example at a time). IR shape = ONNX shape, axes unchanged.
* **added** -- the ONNX tensor has no batch axis (an input like ``[5]``, or ``[1]`` as in
  vnncomp's ``test_nano.onnx``): the IR prepends one, so ONNX axis ``a`` is IR axis ``a+1``.

In models without a dynamic batch, a batch-first value whose op would touch axis 0 (say a
Reshape from ``[1, 784]`` to ``[784]``) simply switches to the *added* layout (its leading
1 becomes an ordinary per-example axis), and back when an op such as Gemm or Conv needs a
batch-first operand. With a dynamic batch such an op would mix the examples of a batch,
and the node is rejected with an error that names it.

Constant folding. Every node whose inputs are all constants is evaluated at load time
(``onnx.reference``), as are ``Shape``/``Size`` of variable values, whose shapes are
static. Folding runs in two "worlds", batch 1 and batch 2, so that a constant derived
from the batch size (exporters build Reshape targets from ``Shape(x)[0]``) is recognised
by how it changes between them: a Reshape whose target tracks the batch keeps it first.

:func:`load_onnx` records the original input/output names, shapes and layouts in
``graph.meta["onnx_inputs"]`` / ``["onnx_outputs"]``; :func:`onnx_feeds` and
:func:`run_onnxruntime` use them to run the original model on IR-layout batches.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import torch

from dualgraph.errors import DualgraphError
from dualgraph.files import read_bytes
from dualgraph.ir import Graph
from dualgraph.frontends.agreement import OVERFLOW_SHARE, differences
from dualgraph.frontends.onnx_importer import Importer, supported_ops

__all__ = ["check_against_onnxruntime", "load_onnx", "onnx_feeds", "run_onnxruntime", "supported_ops"]


# ---- public API -------------------------------------------------------------------------------
def load_onnx(source: str | os.PathLike | onnx.ModelProto) -> Graph:
    """Load an ONNX model (a file path or a ``ModelProto``) into a verified IR graph.

    Raises :class:`DualgraphError` (one line) for unreadable files, models without inputs,
    unresolvable shapes and ops that mix the examples of a batch, and one
    :class:`UnsupportedOpError` that lists every unsupported op with its nodes.
    """
    model = source if isinstance(source, onnx.ModelProto) else _read_model(Path(source))
    if not model.HasField("graph"):
        raise DualgraphError("the ONNX model has no graph; is this really an ONNX model file?")
    _check_names(model)
    return Importer(model).build()


def _check_names(model: onnx.ModelProto) -> None:
    """Every name the importer reads is text (a corrupted file can hold bytes that are not UTF-8)."""
    g = model.graph
    named = [*g.input, *g.output, *g.initializer, *g.value_info]
    names = [v.name for v in named] + [o.domain for o in model.opset_import]
    for node in g.node:
        names += [node.op_type, node.domain, node.name, *node.input, *node.output, *(a.name for a in node.attribute)]
    bad = next((n for n in names if not isinstance(n, str)), None)
    if bad is not None:
        raise DualgraphError(f"the ONNX model holds a name that is not UTF-8 text ({bytes(bad)[:20]!r}); "
                             "the file is corrupt")


def onnx_feeds(graph: Graph, *inputs: torch.Tensor | np.ndarray) -> list[dict[str, np.ndarray]]:
    """onnxruntime feeds for IR-layout inputs (batch first) of a graph from :func:`load_onnx`.

    One feed holding the whole batch when every ONNX input has a dynamic batch axis;
    otherwise one feed per example (a leading 1 for batch-first inputs, none for inputs
    whose batch axis the IR added).
    """
    specs = graph.meta["onnx_inputs"]
    if len(inputs) != len(specs):
        raise DualgraphError(f"model expects {len(specs)} input(s), got {len(inputs)}")
    arrays = [np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x,
                         dtype=spec["dtype"]) for x, spec in zip(inputs, specs)]
    if all(s["layout"] == "batch" and s["dynamic"] for s in specs):
        return [{s["name"]: a for s, a in zip(specs, arrays)}]
    return [{s["name"]: (a[i:i + 1] if s["layout"] == "batch" else a[i]) for s, a in zip(specs, arrays)}
            for i in range(arrays[0].shape[0])]


def run_onnxruntime(source: str | os.PathLike | onnx.ModelProto, graph: Graph,
                    *inputs: torch.Tensor | np.ndarray) -> list[np.ndarray]:
    """Run the original ONNX model with onnxruntime on IR-layout inputs; IR-layout outputs."""
    import onnxruntime as ort  # only needed here

    data = source.SerializeToString() if isinstance(source, onnx.ModelProto) else str(source)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # its warnings (unused initialisers, ...) are not the user's business here
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    outs = graph.meta["onnx_outputs"]
    feeds = onnx_feeds(graph, *inputs)
    results = [session.run([o["name"] for o in outs], feed) for feed in feeds]
    if len(feeds) == 1 and all(s["dynamic"] for s in graph.meta["onnx_inputs"]):
        return results[0]
    return [np.concatenate([r[j] for r in results]) if o["layout"] == "batch"
            else np.stack([r[j] for r in results]) for j, o in enumerate(outs)]


def check_against_onnxruntime(source: str | os.PathLike | onnx.ModelProto, graph: Graph) -> None:
    """Raise :class:`DualgraphError` unless ``graph`` (lowered from ``source``) computes what
    onnxruntime computes for the file: both run on two examples, one uniform in ``[0, 1]`` (an
    image) and one standard normal, in the model's own precision, and every float output entry
    must agree up to rounding (:mod:`dualgraph.frontends.agreement`). A certificate is
    about the graph; this is what makes it one about the file (``verify`` compares at its boxes'
    points as well).

    Skipped where there is no reference: inputs that are not floats (indices need valid values),
    or a file onnxruntime cannot run (ops that plugins define). Entries that are not finite on
    both sides (an overflow, a Log of a negative input) are not compared."""
    if not all(v.dtype.is_floating_point for v in graph.inputs):
        return
    from dualgraph.interpreter import Interpreter
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.cat([torch.rand((1, *v.unit_shape), generator=generator, dtype=torch.float64),
                         torch.randn((1, *v.unit_shape), generator=generator, dtype=torch.float64)]).to(v.dtype)
              for v in graph.inputs]
    if not isinstance(source, onnx.ModelProto) and str(source).endswith(".gz"):
        source = _read_model(Path(source))  # onnxruntime reads plain files only
    try:
        reference = run_onnxruntime(source, graph, *inputs)
    except Exception:  # noqa: BLE001 -- onnxruntime cannot run it: nothing to compare with
        return
    with torch.no_grad():
        lowered = Interpreter(graph).run(*inputs)
        exact = lowered if graph.inputs[0].dtype == torch.float64 else Interpreter(graph).run(*(x.double() for x in inputs))
    for k, (ours, accurate, theirs) in enumerate(zip(lowered, exact, reference)):
        if not (ours.dtype.is_floating_point and np.asarray(theirs).dtype.kind == "f") or ours.numel() != theirs.size:
            continue
        limit = OVERFLOW_SHARE * torch.finfo(ours.dtype).max
        ours, accurate = (t.detach().double().cpu().numpy().reshape(2, -1) for t in (ours, accurate))
        off = differences(ours, accurate, np.asarray(theirs, dtype=np.float64).reshape(2, -1), limit)
        if off.any():
            e, j = np.argwhere(off)[0]
            raise DualgraphError(
                f"the lowered model computes another function than onnxruntime: output "
                f"'{graph.meta['onnx_outputs'][k]['name']}' entry {j} is {float(ours[e, j])!r} against onnxruntime's "
                f"{float(np.asarray(theirs).reshape(2, -1)[e, j])!r} on a random {('uniform', 'normal')[e]} input; "
                "refusing to certify a different function -- please report this frontend bug")


# ---- reading ---------------------------------------------------------------------------------
def _read_model(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise DualgraphError(f"ONNX file '{path}' does not exist")
    if path.is_dir():
        raise DualgraphError(f"'{path}' is a directory, not an ONNX file")
    data = read_bytes(path, "ONNX file")  # .onnx.gz is decompressed
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # DecodeError, truncated files, bad external-data references
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DualgraphError(f"'{path}' is not a valid ONNX model (cannot parse it: {reason})") from None
    if not model.HasField("graph") or not (model.graph.node or model.graph.input):
        raise DualgraphError(f"'{path}' is not an ONNX model (it holds no graph)")
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data
    if any(uses_external_data(t) for t in model.graph.initializer):  # weights in files beside the model
        try:
            load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # noqa: BLE001 -- missing, truncated or misplaced data files
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise DualgraphError(f"'{path}' keeps its weights in external data that cannot be read ({reason}); "
                                 "keep the data files beside the model") from None
    return model
