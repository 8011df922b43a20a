"""The smaller soundness and correctness points of the audit: the caller's graph is never
edited, a VNN-LIB disjunct with an empty box is false (the others are still decided), and a
point box at a value float32 cannot represent still gets its counterexample tested."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dualgraph.api import Certifier, load_model
from dualgraph.input_sets import Box
from dualgraph.verification import VerifyConfig, VerifyModel, verify_property
from dualgraph.vnnlib import parse_vnnlib


def test_certifier_leaves_the_callers_softmax_in_place():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2), torch.nn.Softmax(1))
    x = torch.rand(2, 3)
    graph = load_model(module, x)
    ops = [n.op_type for n in graph.nodes]
    cert = Certifier(graph)
    assert [n.op_type for n in graph.nodes] == ops and ops[-1] == "Softmax"
    assert graph.outputs[0].producer.op_type == "Softmax"
    assert cert.graph is not graph and cert.graph.nodes[-1].op_type != "Softmax"
    # lower_bounds are about the logits (documented); the caller's graph still computes probabilities
    logits = module[:3](x).detach()
    J = cert.lower_bounds(Box(x, x.clone()), torch.eye(2)[None])
    assert torch.allclose(J, logits, atol=1e-4)
    # logits=False keeps it: the bounds are about the probabilities (Softmax has a dual layer)
    probabilities = Certifier(graph, logits=False)
    Jp = probabilities.lower_bounds(Box(x, x.clone()), torch.eye(2)[None])
    p = module(x).detach()
    assert (Jp <= p + 1e-6).all() and torch.allclose(Jp, p, atol=1e-3)
    assert graph.nodes[-1].op_type == "Softmax"


def _identity_model(path) -> str:
    w = numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "id",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


HEAD = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"


def test_point_box_at_a_value_float32_cannot_hold_is_tested(tmp_path):
    """X_0 = 0.1 exactly (no float32 equals it); y = x, unsafe iff Y_0 >= 0.05: sat at once."""
    model = VerifyModel(_identity_model(tmp_path / "id.onnx"))
    text = HEAD + ("(assert (>= X_0 0.1))\n(assert (<= X_0 0.1))\n(assert (>= X_1 0.0))\n(assert (<= X_1 1.0))\n"
                   "(assert (>= Y_0 0.05))\n")
    result = verify_property(model, parse_vnnlib(text), 10.0, VerifyConfig())
    assert result.answer == "sat", result
    assert "nearest" in result.details["method"]
    assert "(X_0 0.1)" in result.result_text()
    assert result.seconds < 5


def test_an_empty_disjunct_does_not_hide_the_others(tmp_path):
    model = VerifyModel(_identity_model(tmp_path / "id.onnx"))
    text = HEAD + ("(assert (or (and (>= X_0 2.0) (<= X_0 1.0) (>= X_1 0.0) (<= X_1 1.0) (<= Y_0 5.0))\n"
                   "            (and (>= X_0 0.0) (<= X_0 1.0) (>= X_1 0.0) (<= X_1 1.0) (>= Y_1 0.9))))\n")
    result = verify_property(model, parse_vnnlib(text), 10.0, VerifyConfig())
    assert result.answer == "sat"
    text = HEAD + ("(assert (or (and (>= X_0 2.0) (<= X_0 1.0) (>= X_1 0.0) (<= X_1 1.0) (<= Y_0 5.0))\n"
                   "            (and (>= X_0 0.0) (<= X_0 1.0) (>= X_1 0.0) (<= X_1 1.0) (>= Y_1 1.5))))\n")
    assert verify_property(model, parse_vnnlib(text), 10.0, VerifyConfig()).answer == "unsat"


def _affine_model(path, w: float, b: float) -> str:
    """``y = w x + b`` on one float32 input."""
    inits = [numpy_helper.from_array(np.array([[w]], dtype=np.float32), "w"),
             numpy_helper.from_array(np.array([b], dtype=np.float32), "b")]
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"])], "affine",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def _check_as_the_competition_does(model_path: str, text: str, bounds: str, unsafe) -> None:
    """The counterexample file's ``X_0`` (a decimal) exactly inside ``bounds`` (``lo < x`` style
    pairs), fed to onnxruntime as its nearest float32, gives the file's ``Y_0``, which is unsafe."""
    import re
    from fractions import Fraction
    import onnxruntime as ort
    x_text, y_text = re.findall(r"\(X_0 ([^)]+)\)", text)[0], re.findall(r"\(Y_0 ([^)]+)\)", text)[0]
    x = Fraction(x_text)
    for op, bound in bounds:
        assert {"<": x < bound, "<=": x <= bound, ">": x > bound, ">=": x >= bound}[op], (x_text, op, bound)
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.array([[float(x_text)]], dtype=np.float32)})[0].item()
    assert y == float(y_text) and unsafe(Fraction(y))


ONE_INPUT = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"


@pytest.mark.parametrize("w, b, body, truth, bounds, unsafe", [
    # the box holds no float32 value, y = -1 everywhere: 0.1 * -1 < -0.1 is false (the exact
    # check was skipped for such boxes: a wrong sat at the box centre)
    (0.0, -1.0, "(assert (>= X_0 0.1))\n(assert (<= X_0 0.1))\n(assert (< (* 0.1 Y_0) -0.1))", "not sat", None, None),
    # (1, 1.00000001) holds float64 values but no float32 one: a point strictly inside is fed as 1.0
    # (the reported X_0 = 1.0 was outside the box)
    (1.0, 0.0, "(assert (> X_0 1))\n(assert (< X_0 1.00000001))\n(assert (<= Y_0 1))", "sat",
     [(">", 1), ("<", Fraction("1.00000001"))], lambda y: y <= 1),
    # X_0 = 1000.1 is fed as float32 1000.0999755859375: the proof must cover that input (it
    # covered the float64 box alone: a wrong unsat)
    (1.0, 0.0, "(assert (>= X_0 1000.1))\n(assert (<= X_0 1000.1))\n(assert (<= Y_0 1000.09999))", "sat",
     [(">=", Fraction("1000.1")), ("<=", Fraction("1000.1"))], lambda y: y <= Fraction("1000.09999")),
    # (0.5, 0.5 + 1e-20) is not empty (its float64 bounds are equal, one strict: it was dropped as
    # empty, a wrong unsat); it holds no float64 value, so there is no counterexample to write either
    (1.0, 0.0, "(assert (> X_0 0.5))\n(assert (< X_0 0.50000000000000000001))\n(assert (> Y_0 0.5))", "not unsat",
     None, None),
])
def test_boxes_without_a_float32_value(tmp_path, w, b, body, truth, bounds, unsafe):
    """Inputs are fed to the model rounded to its input precision (as the competition's checker
    feeds a counterexample file): a ``sat`` states a point exactly in the box whose rounded value
    violates the property, and an ``unsat`` covers every rounded value (a review's cases)."""
    path = _affine_model(tmp_path / "affine.onnx", w, b)
    result = verify_property(VerifyModel(path), parse_vnnlib(ONE_INPUT + body), 5.0, VerifyConfig())
    if truth == "sat":
        assert result.answer == "sat", result
        _check_as_the_competition_does(path, result.result_text(), bounds, unsafe)
    else:
        assert result.answer != truth.split()[1], result.result_text()
