"""A value read in several input slots of one node (``Add(b, b)``, ``Concat(h, h)``) or
through a multi-output producer (``Split``) gets one dual contribution per slot.

The hand-built cases are the ones the soundness audit found: before the fix, the dual
builder expected ``k^2`` contributions for ``k`` slots, so the branch through a Split output
silently vanished from the bound (an unsound ``unsat``) and ``x + x`` was "independent of the
input". The hypothesis generator (``strategies.MultiUse``) covers the general shapes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from dualgraph.api import load_model
from dualgraph.errors import DualgraphError
from dualgraph.input_sets import Box
from dualgraph.ir import Graph, check_graph
from dualgraph.scheduler import BoundConfig, BoundScheduler
from dualgraph.verification import VerifyConfig, VerifyModel, verify_property
from dualgraph.vnnlib import parse_vnnlib

DIRECTIONS = ("backward", "forward")


def _split_model(path, tail) -> str:
    """``a, b = Split(x)``; ``y = Concat(a, tail(a, b))`` with ``tail`` adding nodes to ``nodes``."""
    nodes = [helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1)]
    inits = [helper.make_tensor("sizes", TensorProto.INT64, [2], [1, 1])]
    out = tail(nodes, inits)
    nodes.append(helper.make_node("Concat", ["a", out], ["y"], axis=1))
    graph = helper.make_graph(nodes, "fan_in", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return str(path)


def _neg_twice_b(nodes, inits):
    nodes += [helper.make_node("Add", ["b", "b"], ["bb"]), helper.make_node("Neg", ["bb"], ["t"])]
    return "t"


def _cliff(nodes, inits):
    """``-1000 relu(b + b + 0.001 a - 1.998)``: -2.5 at x = (0.5, 1), 0 wherever b + b < 1.998."""
    inits += [helper.make_tensor("k", TensorProto.FLOAT, [1], [0.001]),
              helper.make_tensor("c", TensorProto.FLOAT, [1], [1.998]),
              helper.make_tensor("m", TensorProto.FLOAT, [1], [-1000.0])]
    nodes += [helper.make_node("Add", ["b", "b"], ["bb"]), helper.make_node("Mul", ["a", "k"], ["ka"]),
              helper.make_node("Add", ["bb", "ka"], ["s"]), helper.make_node("Sub", ["s", "c"], ["z"]),
              helper.make_node("Relu", ["z"], ["r"]), helper.make_node("Mul", ["r", "m"], ["t"])]
    return "t"


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("simplify", [False, True])
def test_split_output_used_twice_by_one_node_keeps_its_branch(tmp_path, direction, simplify):
    graph = load_model(_split_model(tmp_path / "m.onnx", _neg_twice_b), simplify=simplify)
    sched = BoundScheduler(graph, BoundConfig(direction=direction))
    box = Box(torch.tensor([[0.0, 0.5]], dtype=torch.float64), torch.tensor([[1.0, 1.0]], dtype=torch.float64))
    J = sched.bound_output(box, torch.eye(2, dtype=torch.float64)[None])
    # y1 = -2 b reaches -2 at b = 1: the bound must be at most that (it is exact here)
    assert J[0, 1] <= -2.0 and J[0, 1] > -2.0 - 1e-5, J  # float32 model: a rounding allowance
    assert -1e-5 < J[0, 0] <= 0.0


def test_verify_finds_the_counterexample_the_old_builder_hid(tmp_path):
    path = _split_model(tmp_path / "cliff.onnx", _cliff)
    text = ("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
            "(declare-const Y_1 Real)\n(assert (>= X_0 0.0))\n(assert (<= X_0 1.0))\n"
            "(assert (>= X_1 0.0))\n(assert (<= X_1 1.0))\n(assert (<= Y_1 -0.5))\n")
    result = verify_property(VerifyModel(path), parse_vnnlib(text), 30.0, VerifyConfig())
    assert result.answer == "sat", result


class SplitCat(torch.nn.Module):
    def forward(self, x):
        parts = torch.split(x, [1, 2], dim=1)
        return torch.cat([parts[0], parts[1] + parts[1]], 1)


class TwiceSelf(torch.nn.Module):
    def forward(self, x):
        h = torch.relu(x - 0.25)
        return torch.cat([h, h], 1) + torch.cat([x + x, x - x], 1)


@pytest.mark.parametrize("module", [SplitCat(), TwiceSelf()], ids=["split-cat", "twice-self"])
@pytest.mark.parametrize("via", ["fx", "onnx"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_natural_modules_are_bounded_soundly_and_exactly(tmp_path, module, via, direction):
    x = torch.tensor([[0.1, 0.7, 0.4]], dtype=torch.float64)
    if via == "fx":
        graph = load_model(module, x)
    else:
        path = tmp_path / "m.onnx"
        torch.onnx.export(module, (x.float(),), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
        graph = load_model(path)
    sched = BoundScheduler(graph, BoundConfig(direction=direction))
    n_out = module(x).shape[1]
    eye = torch.eye(n_out, dtype=torch.float64)[None]
    # eps = 0: every bound is the value itself (no branch may vanish, none be counted twice)
    box = Box(x, x.clone())
    J = sched.bound_output(box, torch.cat([eye, -eye], 1))
    y = module(x)[0]
    assert torch.allclose(J[0, :n_out], y, atol=1e-6) and torch.allclose(-J[0, n_out:], y, atol=1e-6)
    # eps > 0: below every sampled value
    box = Box(x - 0.2, x + 0.2)
    J = sched.bound_output(box, eye)
    pts = box.sample(200, torch.Generator().manual_seed(0))[:, 0]
    assert (J[0] <= module(pts).amin(0) + 1e-6).all()


def test_ir_verify_rejects_user_lists_that_miscount_slots():
    g = Graph("g")
    x = g.add_input("x", (2,))
    node = g.add_node("Add", [x, x])
    g.outputs = [node.output]
    check_graph(g)  # two slots, two entries
    x.users.remove(node)
    with pytest.raises(DualgraphError, match="1 times, but the node reads it in 2 input slots"):
        check_graph(g)


def test_constant_on_the_left_of_matmul_is_affine(tmp_path):
    w = np.array([[1.0, -2.0], [0.5, 3.0], [0.0, 1.0]], dtype=np.float32)     # [3, 2] @ x [N, 2, 1]
    nodes = [helper.make_node("MatMul", ["w", "x"], ["y"])]
    graph = helper.make_graph(nodes, "left", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 1])],
                              [onnx.numpy_helper.from_array(w, "w")])
    path = tmp_path / "left.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    model = load_model(path)
    sched = BoundScheduler(model, BoundConfig())
    lo = torch.tensor([[[0.0], [1.0]]], dtype=torch.float64)
    J = sched.bound_output(Box(lo, lo + 1.0), torch.eye(3, dtype=torch.float64)[None])
    W = torch.tensor(w, dtype=torch.float64)
    # min over x0 in [0,1], x1 in [1,2] of W x: per row, each term at its own minimising end
    want = torch.stack([torch.where(W[:, j] >= 0, W[:, j] * lo[0, j, 0], W[:, j] * (lo[0, j, 0] + 1))
                        for j in range(2)], 1).sum(1)
    assert torch.allclose(J[0], want, atol=1e-6), (J, want)
