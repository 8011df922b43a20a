"""Tests of dualgraph.printer on hand-built graphs (shapes set by hand, no eval rules needed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch

from dualgraph.dual_registry import Bounds
from dualgraph.ir import Graph
from dualgraph.printer import (bounds_summary, format_bounds, format_dot, format_json, format_text,
                               graph_summary)


def residual_graph() -> Graph:
    """x -> fc1 (Gemm 4x4, 20 params) -> relu -> add(relu, x) -> fc2 (Gemm 3x4, 15 params).

    ``x`` fans out (to fc1 and add), so the dual graph has one Sum node.
    """
    g = Graph("res")
    x = g.add_input("x", (4,))
    w1, b1 = g.add_const("W1", torch.ones(4, 4)), g.add_const("b1", torch.zeros(4))
    w2, b2 = g.add_const("W2", torch.ones(3, 4)), g.add_const("b2", torch.zeros(3))
    fc1 = g.add_node("Gemm", [x, w1, b1], {"transB": 1, "alpha": 1.0}, name="fc1")
    relu = g.add_node("Relu", [fc1.output], name="relu")
    add = g.add_node("Add", [relu.output, x], name="add")
    fc2 = g.add_node("Gemm", [add.output, w2, b2], {"transB": 1}, name="fc2")
    for n, width in [(fc1, 4), (relu, 4), (add, 4), (fc2, 3)]:
        n.output.shape = ("N", width)
    g.outputs = [fc2.output]
    return g


def dual_graph() -> Graph:
    try:
        from dualgraph.dual_graph import build_dual
        return build_dual(residual_graph())
    except ImportError:  # the dual rules are not importable: a dual-shaped graph by hand
        return hand_dual_graph()


def hand_dual_graph() -> Graph:
    """The dual of :func:`residual_graph` as build_dual lays it out, without the rule registry."""
    g = Graph("dual[res:fc2]")
    lam = g.add_input("lam:fc2", ())
    lam.shape = ("N", "M", 3)
    spec = [("dual:fc2", "Gemm", [lam], ["lam:add"]), ("dual:add", "Add", ["lam:add"], ["lam:relu", "lam:x@add"]),
            ("dual:relu", "Relu", ["lam:relu"], ["lam:fc1"]), ("dual:fc1", "Gemm", ["lam:fc1"], ["lam:x@fc1"]),
            ("sum:x", "Sum", ["lam:x@add", "lam:x@fc1"], ["lam:x"]), ("input:x", "InputSet", ["lam:x"], ["J:fc2"])]
    for name, op, ins, outs in spec:
        domain = "dualgraph.dual.structure" if op in ("Sum", "InputSet") else "dualgraph.dual"
        n = g.add_node((domain, op), [g.values[v] if isinstance(v, str) else v for v in ins],
                       name=name, n_outputs=len(outs), output_names=outs)
        for v in n.outputs:
            v.shape = ("N", "M") if op == "InputSet" else ("N", "M", 4)
    g.outputs = [g.values["J:fc2"]]
    return g


# A DOT statement: `id [attrs];` or `id -> id [attrs];` with quoted strings escaped properly.
_Q = r'"(?:[^"\\\n]|\\.)*"'
_ID = rf'(?:[A-Za-z_][A-Za-z_0-9]*|{_Q})'
_ATTRS = rf'\[\s*{_ID}\s*=\s*{_ID}(?:\s*,\s*{_ID}\s*=\s*{_ID})*\s*\]'
_STMT = re.compile(rf'^\s*(?:{_ID}(?:\s*->\s*{_ID})?|node)\s*(?:{_ATTRS})?\s*;$')


def check_dot(dot: str, tmp_path) -> None:
    lines = dot.strip().splitlines()
    assert re.fullmatch(rf'digraph {_Q} \{{', lines[0]) and lines[-1] == "}"
    for line in lines[1:-1]:
        assert _STMT.match(line), f"not a DOT statement: {line!r}"
    try:
        import graphviz
    except ImportError:
        graphviz = None
    if graphviz is not None:
        graphviz.Source(dot)  # constructs; rendering needs the `dot` binary
    if shutil.which("dot"):
        out = tmp_path / "g.svg"
        subprocess.run(["dot", "-Tsvg", "-o", str(out)], input=dot, text=True, check=True)
        assert out.read_text().lstrip().startswith("<")


def test_text_lists_every_node_and_summary():
    g = residual_graph()
    text = format_text(g)
    assert str(g) == text
    lines = text.splitlines()
    assert lines[0] == "graph res"
    assert "x [N, 4]" in lines[1] and "fc2 [N, 3]" in lines[2]
    for name in ["fc1", "relu", "add", "fc2"]:
        assert any(re.search(rf"\b{name}\b", line) for line in lines[4:8])
    fc1_line = next(line for line in lines if line.split()[:2] == ["0", "fc1"])
    assert "Gemm" in fc1_line and "[N, 4]" in fc1_line and fc1_line.endswith("20")
    assert lines[-1] == "nodes: 4  parameters: 35  nonlinear units: 4"
    # aligned: the op column starts at the same offset on every node line
    starts = {line.index(op) for line, op in zip(lines[4:8], ["Gemm", "Relu", "Add", "Gemm"])}
    assert len(starts) == 1
    assert graph_summary(g) == {"nodes": 4, "parameters": 35, "nonlinear_units": 4, "dual": False,
                                "sum_nodes": 0}


@pytest.mark.parametrize("make", [dual_graph, hand_dual_graph])
def test_dual_text_and_summary(make):
    d = make()
    s = graph_summary(d)
    assert s["dual"] and s["sum_nodes"] == 1 and s["nonlinear_units"] == 4
    text = format_text(d)
    assert "(dual)" in text.splitlines()[0]
    assert "dual.Relu" in text and "dual.Sum" in text and "[N, M, 4]" in text
    assert text.splitlines()[-1].endswith("sum (fan-out) nodes: 1")
    assert all(n.name in text for n in d.nodes)


def test_json_round_trip():
    g = residual_graph()
    g.nodes[0].attrs.update(big=torch.zeros(5, 5), small=torch.arange(3), dtype=torch.float64,
                            pads=(1, 1), name=b"raw")
    obj = json.loads(format_json(g))
    assert obj["name"] == "res"
    assert obj["inputs"] == [{"name": "x", "shape": ["N", 4]}]
    assert obj["outputs"] == [{"name": "fc2", "shape": ["N", 3]}]
    assert [n["name"] for n in obj["nodes"]] == ["fc1", "relu", "add", "fc2"]
    fc1 = obj["nodes"][0]
    assert fc1["op"] == "Gemm" and fc1["domain"] == "" and fc1["params"] == 20
    assert fc1["inputs"] == ["x", "W1", "b1"] and fc1["consts"] == ["W1", "b1"]
    assert fc1["outputs"] == [{"name": "fc1", "shape": ["N", 4]}]
    assert fc1["attrs"]["big"] == "tensor[5, 5]" and fc1["attrs"]["small"] == [0, 1, 2]
    assert fc1["attrs"]["pads"] == [1, 1] and fc1["attrs"]["dtype"] == "torch.float64"
    assert obj["summary"]["parameters"] == 35
    dual = json.loads(format_json(dual_graph()))
    assert dual["inputs"][0]["shape"] == ["N", "M", 3]
    assert {n["domain"] for n in dual["nodes"]} == {"dualgraph.dual", "dualgraph.dual.structure"}


def test_dot_primal_and_dual(tmp_path):
    g = residual_graph()
    dot = format_dot(g)
    check_dot(dot, tmp_path)
    assert 'label="fc1\\nGemm\\n[N, 4]"' in dot
    assert dot.count("->") == 6  # x->fc1, x->add, fc1->relu, relu->add, add->fc2, fc2->output
    d = dual_graph()
    ddot = format_dot(d)
    check_dot(ddot, tmp_path)
    # reversed: the edge carrying lam:fc1 goes from dual:relu to dual:fc1 (primal: fc1 -> relu)
    ids = {n.name: f"n{i}" for i, n in enumerate(d.nodes)}
    assert f'{ids["dual:relu"]} -> {ids["dual:fc1"]} [label="lam:fc1"];' in ddot
    assert f'{ids["dual:add"]} -> {ids["sum:x"]} [label="lam:x@add"];' in ddot


def test_missing_shapes_print_as_question_mark():
    g = Graph("partial")
    x = g.add_input("x", (2,))
    g.add_node("Relu", [x], name="r")
    assert "?" in format_text(g).splitlines()[4]
    assert json.loads(format_json(g))["nodes"][0]["outputs"][0]["shape"] is None


def test_dot_escapes_special_characters(tmp_path):
    g = Graph('we"ird:[graph]')
    x = g.add_input('in:0@a[1]', (2,))
    n = g.add_node("Relu", [x], name='r"el\\u')
    n.output.shape = ("N", 2)
    g.outputs = [n.output]
    dot = format_dot(g)
    check_dot(dot, tmp_path)
    assert 'digraph "we\\"ird:[graph]" {' in dot
    assert 'label="r\\"el\\\\u\\nRelu\\n[N, 2]"' in dot
    assert '[label="in:0@a[1]"]' in dot


def test_bounds_table_numbers():
    g = residual_graph()
    x, fc1 = g.inputs[0], g.values["fc1"]
    bx = Bounds(torch.full((2, 4), -0.5), torch.full((2, 4), 0.5))
    # example 0: widths 2, 1, 1, 4; example 1: widths 1, 1, 1, 1 -> mean 1.5, max 4
    lo = torch.tensor([[-1.0, 0.0, -2.0, -3.0], [0.5, -1.0, 1.0, -0.5]])
    up = torch.tensor([[1.0, 1.0, -1.0, 1.0], [1.5, 0.0, 2.0, 0.5]])
    rows = bounds_summary(g, {fc1: Bounds(lo, up), x: bx})
    assert [r["value"] for r in rows] == ["x", "fc1"]  # topological, not dict order
    assert rows[0]["op"] == "input" and rows[0]["crossing_frac"] == 1.0
    r = rows[1]
    assert (r["node"], r["op"], r["units"]) == ("fc1", "Gemm", 4)
    assert r["mean_width"] == pytest.approx(1.5) and r["max_width"] == pytest.approx(4.0)
    # crossing: ex0 units 0, 3; ex1 unit 3 -> 3 of 8, 1.5 per example
    assert r["crossing_frac"] == pytest.approx(3 / 8) and r["crossing_per_example"] == pytest.approx(1.5)
    assert r["active_frac"] == pytest.approx(3 / 8)  # ex0 unit 1; ex1 units 0, 2
    assert r["inactive_frac"] == pytest.approx(2 / 8)  # ex0 unit 2; ex1 unit 1
    json.dumps(rows)
    text = format_bounds(g, {x: bx, fc1: Bounds(lo, up)})
    line = next(line for line in text.splitlines() if line.split()[0] == "fc1")
    assert line.split() == ["fc1", "fc1", "Gemm", "4", "1.5", "4", "37.5%", "1.5", "37.5%", "25.0%"]
