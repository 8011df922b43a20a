"""Human- and machine-readable views of a graph (primal or dual) and of its bounds.

Used by ``dualgraph dump`` and by ``str(graph)``. Four views of the IR -- text
(:func:`format_text`), JSON (:func:`format_json`), Graphviz DOT (:func:`format_dot`) and the
numbers behind the text's summary line (:func:`graph_summary`) -- and a per-layer report of
bounds (:func:`format_bounds`, :func:`bounds_summary`).

This module only reads the graph: it never sorts, infers shapes or evaluates anything, so
it can print a graph that is half built or broken (a value without a shape shows ``?``).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import torch

from .dual_graph import DUAL_DOMAIN, FAN_OUT_SUM, STRUCTURE_DOMAIN
from .dual_registry import DUAL_RULES
from .ir import Graph, Node, Value
from .op_registry import ensure_ops_loaded

SMALL_TENSOR = 16  # attribute tensors up to this many elements are printed in full


# ---- small helpers -------------------------------------------------------------------

def _op_name(node: Node) -> str:
    domain, op_type = node.op
    if not domain:
        return op_type
    return f"{'dual' if domain in (DUAL_DOMAIN, STRUCTURE_DOMAIN) else domain}.{op_type}"


def _shape(v: Value | None) -> str:
    if v is None or v.shape is None:
        return "?"
    return "[" + ", ".join(str(d) for d in v.shape) + "]"


def _units(v: Value) -> int:
    """Scalar units per example: integer dims after the batch dim (a dual value's ``M`` is skipped)."""
    if v.shape is None:
        return 0
    n = 1
    for d in (v.shape if v.is_const else v.shape[1:]):
        if not isinstance(d, str):
            n *= int(d)
    return n


def _param_values(node: Node) -> list[Value]:
    """Constants a node applies. A dual node has none of its own: it applies its primal node's
    weights (transposed), so those are reported, which keeps the dual listing informative."""
    primal = node.meta.get("primal")
    src = primal if isinstance(primal, Node) else node
    return [v for v in src.inputs if v is not None and v.is_const]


def _params(node: Node) -> int:
    return sum(v.const.numel() for v in _param_values(node))


def is_dual(graph: Graph) -> bool:
    return any(n.op[0] in (DUAL_DOMAIN, STRUCTURE_DOMAIN) for n in graph.nodes)


def _json_safe(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist() if x.numel() <= SMALL_TENSOR else f"tensor[{', '.join(map(str, x.shape))}]"
    if isinstance(x, (list, tuple)):
        return [_json_safe(e) for e in x]
    if isinstance(x, dict):
        return {str(k): _json_safe(e) for k, e in x.items()}
    if isinstance(x, bytes):
        return x.decode("utf-8", errors="replace")
    if isinstance(x, (Node, Value)):
        return x.name
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)  # dtypes, enums, anything exotic a frontend put in attrs


def _json_shape(v: Value) -> list | None:
    return None if v.shape is None else [d if isinstance(d, str) else int(d) for d in v.shape]


def _is_number(s: str) -> bool:
    try:
        float(s.rstrip("%"))
        return True
    except ValueError:
        return False


def text_table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Left-aligned columns, numbers right-aligned, two spaces apart."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    numeric = [bool(rows) and all(_is_number(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


# ---- the graph -------------------------------------------------------------------------

def _nonlinear(node: Node) -> bool:
    """Whether the node's dual layer relaxes it (needs bounds): the registry says, per op."""
    rule, primal = node.meta.get("rule"), node.meta.get("primal", node)
    if rule is None:
        ensure_ops_loaded()
        key = node.op
        if key[0] == DUAL_DOMAIN:  # a dual node is named after its primal op, "[domain.]op_type"
            domain, _, op_type = key[1].rpartition(".")
            key = (domain, op_type)
        rule = DUAL_RULES.get(key)
    return rule is not None and rule.bounds_needed(primal)


def graph_summary(graph: Graph) -> dict[str, Any]:
    """Counts: nodes, parameters (shared constants once), nonlinear units per example, Sum nodes."""
    consts = {id(v): v for n in graph.nodes for v in _param_values(n)}
    units = sum(_units(v) for n in graph.nodes if _nonlinear(n) for v in n.var_inputs)
    dual = is_dual(graph)
    return {"nodes": len(graph.nodes), "parameters": sum(v.const.numel() for v in consts.values()),
            "nonlinear_units": units, "dual": dual,
            "sum_nodes": sum(1 for n in graph.nodes if n.op == FAN_OUT_SUM)}


def format_text(graph: Graph) -> str:
    """One header, one aligned line per node (in the graph's topological order), one summary."""
    lines = [f"graph {graph.name}{'  (dual)' if is_dual(graph) else ''}",
             "  inputs:  " + (", ".join(f"{v.name} {_shape(v)}" for v in graph.inputs) or "-"),
             "  outputs: " + (", ".join(f"{v.name} {_shape(v)}" for v in graph.outputs) or "-")]
    rows = [[str(i), n.name, _op_name(n), ", ".join(v.name for v in n.var_inputs) or "-",
             ", ".join(v.name for v in n.outputs), " ".join(_shape(v) for v in n.outputs), str(_params(n))]
            for i, n in enumerate(graph.nodes)]
    lines += text_table(["#", "node", "op", "inputs", "outputs", "shape", "params"], rows)
    s = graph_summary(graph)
    tail = f"nodes: {s['nodes']}  parameters: {s['parameters']}  nonlinear units: {s['nonlinear_units']}"
    if s["dual"]:
        tail += f"  sum (fan-out) nodes: {s['sum_nodes']}"
    return "\n".join([*lines, tail])


def format_json(graph: Graph, indent: int | None = 2) -> str:
    """The graph as a JSON object; shapes are lists with ``"N"``/``"M"`` for symbolic dims."""
    def io(v: Value) -> dict:
        return {"name": v.name, "shape": _json_shape(v)}
    nodes = [{"name": n.name, "op": n.op_type, "domain": n.op[0],
              "inputs": [None if v is None else v.name for v in n.inputs],
              "consts": [v.name for v in n.inputs if v is not None and v.is_const],
              "outputs": [io(v) for v in n.outputs], "attrs": _json_safe(n.attrs), "params": _params(n)}
             for n in graph.nodes]
    obj = {"name": graph.name, "inputs": [io(v) for v in graph.inputs],
           "outputs": [io(v) for v in graph.outputs], "nodes": nodes, "summary": graph_summary(graph)}
    return json_text(obj, indent=indent)


def json_text(obj: Any, indent: int | None = None) -> str:
    """``json.dumps`` with every float written with 12 significant digits, so that a computed
    ``0.44`` prints as ``0.44``, not ``0.43999999999999995``."""
    def clean(o: Any) -> Any:
        if isinstance(o, float):
            return float(f"{o:.12g}")
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o
    return json.dumps(clean(obj), indent=indent)


def _dot_str(s: str) -> str:
    """A DOT double-quoted string; names may hold ':', '@', '[', quotes or backslashes."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot_label(*parts: str) -> str:
    # escape each part, then join with DOT's line-break escape (which must stay unescaped)
    return '"' + "\\n".join(_dot_str(p)[1:-1] for p in parts) + '"'


def format_dot(graph: Graph, notes: Mapping[Value, str] | None = None, title: str | None = None) -> str:
    """Graphviz DOT: boxes for nodes, ellipses for graph inputs/outputs, edges named by value
    (with ``notes[value]`` under the name, e.g. its bounds); ``title``: the graph's label (and
    a DOT comment), e.g. that the bounds are estimates.

    Edges follow the graph's own data flow, so a dual graph is drawn reversed with respect
    to its primal (from ``lam:<output>`` down to the input set). Node ids are synthetic
    (``n0``, ``i0``...) so arbitrary value names only ever appear inside quoted labels.
    """
    lines = [f"digraph {_dot_str(graph.name)} {{", '  node [fontname="Helvetica"];']
    if title:
        lines += [f"  // {title}", f"  label={_dot_str(title)}; labelloc=t;"]
    src: dict[int, str] = {}
    for i, v in enumerate(graph.inputs):
        src[id(v)] = f"i{i}"
        lines.append(f"  i{i} [shape=ellipse, label={_dot_label(v.name, _shape(v))}];")
    for i, n in enumerate(graph.nodes):
        style = ", style=dashed" if n.op == FAN_OUT_SUM else ""
        shapes = " ".join(_shape(v) for v in n.outputs)
        lines.append(f"  n{i} [shape=box{style}, label={_dot_label(n.name, _op_name(n), shapes)}];")
        for v in n.inputs:
            if v is not None and id(v) in src:  # constants have no source: they are params
                note = (notes or {}).get(v)
                label = _dot_label(v.name, note) if note else _dot_str(v.name)
                lines.append(f"  {src[id(v)]} -> n{i} [label={label}];")
        for v in n.outputs:
            src[id(v)] = f"n{i}"
    for i, v in enumerate(graph.outputs):
        lines.append(f"  o{i} [shape=ellipse, label={_dot_label(v.name, _shape(v))}];")
        if id(v) in src:
            lines.append(f"  {src[id(v)]} -> o{i} [label={_dot_str(v.name)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---- bounds ----------------------------------------------------------------------------

def bounds_summary(graph: Graph, bounds: Mapping[Value, Any]) -> list[dict[str, Any]]:
    """Per bounded value, in topological order: widths and how many units cross zero.

    ``bounds`` maps values to ``Bounds(lower, upper)`` of shape ``[B, *unit]``. Widths are
    averaged/maxed over batch and units; ``*_frac`` are fractions of all (example, unit)
    pairs; ``crossing_per_example`` is the mean count of units with ``lower < 0 < upper``
    (the ReLUs the relaxation has to approximate; the others are exact).
    """
    order = list(graph.inputs) + [v for n in graph.nodes for v in n.outputs]
    seen = {id(v) for v in order}
    order += [v for v in bounds if id(v) not in seen]  # bounds of values outside the graph: last
    rows = []
    for v in order:
        if v not in bounds:
            continue
        lo, up = (t.detach().double() for t in bounds[v][:2])
        lo, up = torch.broadcast_tensors(lo, up)
        batch = lo.shape[0] if lo.dim() else 1
        width = (up - lo).reshape(-1)
        crossing = ((lo < 0) & (up > 0)).reshape(batch, -1)
        empty = width.numel() == 0
        frac = (lambda m: float("nan") if empty else m.double().mean().item())
        rows.append({
            "value": v.name, "node": v.producer.name if v.producer else None,
            "op": _op_name(v.producer) if v.producer else "input",
            "units": crossing.shape[1],
            "mean_width": frac(width), "max_width": float("nan") if empty else width.max().item(),
            "crossing_frac": frac(crossing), "crossing_per_example": crossing.sum(1).double().mean().item(),
            "active_frac": frac(lo >= 0), "inactive_frac": frac(up <= 0)})
    return rows


def bound_notes(graph: Graph, bounds: Mapping[Value, Any]) -> dict[Value, str]:
    """Per bounded value, a short note for DOT edges: mean width and crossing units per example."""
    by_name = {r["value"]: r for r in bounds_summary(graph, bounds)}
    return {v: f"width {by_name[v.name]['mean_width']:.3g}, {by_name[v.name]['crossing_per_example']:.1f} crossing"
            for v in bounds if v.name in by_name}


def certificate_rows(graph: Graph, bounds: Mapping[Value, Any], labels, predictions, margins,
                     margin_needed: float = 0.0) -> list[dict[str, Any]]:
    """Why each example is (not) certified: its label and prediction, the certified lower bound of
    ``logit[label] - logit[j]`` per class ``j`` (certified when all are above ``margin_needed``,
    :attr:`~dualgraph.api.Certifier.margin_needed`, and the prediction is right), and the bounded
    value where most of its units cross zero (where the relaxation is loosest)."""
    rows = []
    crossing = {v: ((b[0] < 0) & (b[1] > 0)).flatten(1).sum(1) for v, b in bounds.items()}
    for i in range(len(labels)):
        label, pred = int(labels[i]), int(predictions[i])
        others = [j for j in range(margins.shape[1] + 1) if j != label]
        per_class = {str(j): float(margins[i, k]) for k, j in enumerate(others)}
        counts = {v: int(c[i] if c.shape[0] > 1 else c[0]) for v, c in crossing.items()}
        worst = max(counts, key=counts.get) if counts else None
        rows.append({"example": i, "label": label, "predicted": pred,
                     "certified": bool(pred == label and all(m > margin_needed for m in per_class.values())),
                     "margins": per_class, "min_margin": min(per_class.values()) if per_class else float("inf"),
                     "most_crossing": None if worst is None else {"value": worst.name, "units": counts[worst]}})
    return rows


def format_certificates(rows: list[dict[str, Any]]) -> str:
    """:func:`certificate_rows` as an aligned text table (margins: the two smallest classes)."""
    table = []
    for r in rows:
        smallest = sorted(r["margins"].items(), key=lambda kv: kv[1])[:2]
        worst = r["most_crossing"]
        table.append([str(r["example"]), str(r["label"]), str(r["predicted"]), "yes" if r["certified"] else "no",
                      f"{r['min_margin']:.4g}", ", ".join(f"{c}: {m:.3g}" for c, m in smallest),
                      f"{worst['value']} ({worst['units']})" if worst else "-"])
    header = ["#", "label", "predicted", "certified", "min margin", "smallest margins (class: bound)",
              "most crossing units at"]
    return "\n".join(["certificates", *text_table(header, table)])


def format_bounds(graph: Graph, bounds: Mapping[Value, Any]) -> str:
    """:func:`bounds_summary` as an aligned text table."""
    rows = [[r["value"], r["node"] or "-", r["op"], str(r["units"]), f"{r['mean_width']:.4g}",
             f"{r['max_width']:.4g}", f"{100 * r['crossing_frac']:.1f}%", f"{r['crossing_per_example']:.1f}",
             f"{100 * r['active_frac']:.1f}%", f"{100 * r['inactive_frac']:.1f}%"]
            for r in bounds_summary(graph, bounds)]
    header = ["value", "node", "op", "units", "mean width", "max width", "crossing", "crossing/ex",
              "active", "inactive"]
    return "\n".join([f"bounds of {graph.name}", *text_table(header, rows)])
