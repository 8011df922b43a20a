"""ONNX semantics of the elementwise functions, against onnxruntime, and their bounds inside
a network, against sampling: the table below is the one to extend for a new ONNX op.

Each row is a one-node model ``op(x, *constants)`` with inputs drawn inside the op's domain;
the imported graph must agree with onnxruntime, and a small network using the op (Gemm ->
op -> Gemm, its pre-activations kept inside the domain) must have sound certified bounds.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dualgraph.api import Certifier
from dualgraph.errors import DualgraphError, UnsupportedOpError
from dualgraph.frontends.onnx import load_onnx
from dualgraph.interpreter import Interpreter
from dualgraph.scheduler import BoundConfig

# op, constant inputs, input range (inputs are drawn uniformly inside it)
TABLE = [
    ("Abs", [], (-3, 3)),
    ("Exp", [], (-4, 3)),
    ("Log", [], (0.05, 6)),
    ("Sqrt", [], (0.0, 6)),
    ("Reciprocal", [], (0.2, 5)),
    ("Reciprocal", [], (-5, -0.2)),
    ("Softplus", [], (-5, 5)),
    ("Erf", [], (-3, 3)),
    ("Sin", [], (-7, 7)),
    ("Cos", [], (-7, 7)),
    ("Sign", [], (-2, 2)),
    ("Floor", [], (-3, 3)),
    ("Ceil", [], (-3, 3)),
    ("Pow", [np.array(2.0, np.float32)], (-3, 3)),
    ("Pow", [np.array(3.0, np.float32)], (-3, 3)),
    ("Pow", [np.array(0.5, np.float32)], (0, 5)),
    ("Pow", [np.array(-1.0, np.float32)], (0.2, 5)),
    ("Max", [np.linspace(-1, 1, 6).astype(np.float32)], (-3, 3)),
    ("Min", [np.array(0.5, np.float32)], (-3, 3)),
]
IDS = [f"{op}{'-' + str(float(np.ravel(c[0])[0])) if c else ''}{'-neg' if r[1] < 0 else ''}" for op, c, r in TABLE]


def one_node(op: str, consts: list, width: int = 6, attrs: dict | None = None, opset: int = 17):
    names = ["x"] + [f"c{i}" for i in range(len(consts))]
    inits = [numpy_helper.from_array(c, f"c{i}") for i, c in enumerate(consts)]
    graph = helper.make_graph([helper.make_node(op, names, ["y"], name=f"the_{op.lower()}", **(attrs or {}))], "t",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("op,consts,domain", TABLE, ids=IDS)
def test_import_agrees_with_onnxruntime(op, consts, domain):
    check_import(one_node(op, consts), op, domain)


def check_import(model, op: str, domain: tuple[float, float]) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(*domain, size=(5, 6)).astype(np.float32)
    if op in ("Sign", "Floor", "Ceil"):
        x[0, :3] = [0.0, 1.0, -1.0]  # the steps themselves
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    graph = load_onnx(model)
    got = Interpreter(graph).run(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def network(op: str, consts: list, domain: tuple[float, float], attrs: dict | None = None, opset: int = 17):
    """x[4] -> Gemm -> op -> Gemm -> y[3]; the first Gemm maps the input box [-1, 1]^4 (exactly)
    into the middle of the op's domain."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((6, 4)).astype(np.float32)
    lo, hi = domain
    spread = np.abs(w1).sum(1)                                 # the range of w1 x over the box
    scale = (0.8 * (hi - lo) / (2 * spread)).astype(np.float32)
    w1 = w1 * scale[:, None]
    b1 = np.full(6, (lo + hi) / 2, np.float32)
    w2 = rng.standard_normal((3, 6)).astype(np.float32)
    names = ["h"] + [f"c{i}" for i in range(len(consts))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
             helper.make_node(op, names, ["a"], name="the_op", **(attrs or {})),
             helper.make_node("Gemm", ["a", "w2"], ["y"], transB=1, name="fc2")]
    inits = [numpy_helper.from_array(t, n) for t, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))]
    inits += [numpy_helper.from_array(c, f"c{i}") for i, c in enumerate(consts)]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("op,consts,domain", TABLE, ids=IDS)
def test_bounds_in_a_network_hold_for_sampled_points(op, consts, domain):
    lo, hi = max(domain[0], -50.0), min(domain[1], 50.0)
    check_bounds(load_onnx(network(op, consts, (lo, hi))))


def check_bounds(graph, relaxation: str = "paper") -> None:
    cert = Certifier(graph, BoundConfig(relu_relaxation=relaxation), dtype=torch.float32)
    x = torch.zeros(1, 4)
    spec = torch.tensor([[[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [-1.0, 0.0, 1.0]]])
    bound = cert.lower_bounds(cert.input_set(x, 1.0), spec)[0]                     # [3]
    gen = torch.Generator().manual_seed(0)
    pts = torch.cat([torch.rand(4000, 4, generator=gen) * 2 - 1,
                     torch.where(torch.rand(500, 4, generator=gen) < 0.5, 1.0, -1.0)])
    values = (cert.forward(pts) @ spec[0].T).min(0).values
    assert torch.isfinite(bound).all()
    assert (bound <= values).all(), (bound, values)


# ---- ops with attributes or a newer opset -----------------------------------------------------------

ATTRIBUTED = [  # op, constant inputs, attributes, opset, input range
    ("Gelu", [], {}, 20, (-4, 3)),
    ("Gelu", [], {"approximate": "tanh"}, 20, (-4, 3)),
    ("HardSigmoid", [], {}, 17, (-4, 4)),
    ("HardSigmoid", [], {"alpha": 0.5, "beta": 0.2}, 17, (-3, 3)),
    ("HardSwish", [], {}, 17, (-5, 5)),
    ("Elu", [], {"alpha": 0.7}, 17, (-4, 3)),
    ("Selu", [], {}, 17, (-4, 3)),
    ("PRelu", [np.linspace(-0.5, 0.7, 6).astype(np.float32)], {}, 17, (-3, 3)),
    ("PRelu", [np.array([0.25], np.float32)], {}, 17, (-3, 3)),
]
AIDS = ["Gelu", "Gelu-tanh", "HardSigmoid", "HardSigmoid-attrs", "HardSwish", "Elu", "Selu", "PRelu", "PRelu-one"]


@pytest.mark.parametrize("op,consts,attrs,opset,domain", ATTRIBUTED, ids=AIDS)
def test_attributed_ops_agree_with_onnxruntime_and_bound(op, consts, attrs, opset, domain):
    """Ops imported as a composition of others (:mod:`dualgraph.ops.composites`; Gelu, which
    torch's exporter writes for ``nn.GELU`` from opset 20 on): the imported graph agrees with
    onnxruntime, and its bounds hold, with every relaxation."""
    check_import(one_node(op, consts, attrs=attrs, opset=opset), op, domain)
    for relaxation in ("paper", "crown", "alpha"):
        check_bounds(load_onnx(network(op, consts, domain, attrs=attrs, opset=opset)), relaxation)


def test_a_prelu_with_a_computed_slope_is_refused():
    graph = helper.make_graph([helper.make_node("PRelu", ["x", "x"], ["y"], name="the_prelu")], "t",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(DualgraphError, match="the_prelu.*depends on the network input"):
        load_onnx(model)


def test_gelu_with_an_unknown_approximation_is_refused():
    with pytest.raises(UnsupportedOpError, match="approximate='cubic'"):
        load_onnx(one_node("Gelu", [], attrs={"approximate": "cubic"}, opset=20))


# ---- structural and affine ops on [N, 2, 3, 4] ------------------------------------------------------

STRUCTURAL = [  # op, constant inputs, attributes, opset
    ("ReduceSum", [np.array([2], np.int64)], {"keepdims": 0}, 17),
    ("ReduceSum", [np.array([-1, 1], np.int64)], {}, 17),
    ("ReduceSum", [], {"axes": [3]}, 11),
    ("ReduceMean", [], {"axes": [1, 2], "keepdims": 0}, 17),
    ("ReduceMean", [np.array([3], np.int64)], {}, 18),
    ("Gather", [np.array([[2, 0], [1, -1]], np.int64)], {"axis": 3}, 17),
    ("Gather", [np.array(1, np.int64)], {"axis": 1}, 17),
    ("Pad", [np.array([0, 0, -1, 2, 0, 0, 2, -1], np.int64)], {"mode": "wrap"}, 19),  # crop, then wrap
]
SIDS = [f"{op}-{i}" for i, (op, *_) in enumerate(STRUCTURAL)]


def structural_model(op: str, consts: list, attrs: dict, opset: int, with_network: bool):
    names = ["z"] + [f"c{i}" for i in range(len(consts))]
    inits = [numpy_helper.from_array(c, f"c{i}") for i, c in enumerate(consts)]
    nodes = [helper.make_node(op, names, ["o"], name="the_op", **attrs)]
    x_name = "z"
    if with_network:  # x[4] -> Gemm -> [N, 2, 3, 4] -> Relu -> op -> Flatten -> Gemm -> y[3]
        rng = np.random.default_rng(2)
        inits += [numpy_helper.from_array(rng.standard_normal((24, 4)).astype(np.float32), "w1"),
                  numpy_helper.from_array(np.array([-1, 2, 3, 4], np.int64), "shape")]
        nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1),
                 helper.make_node("Reshape", ["h", "shape"], ["r"]),
                 helper.make_node("Relu", ["r"], ["z"])] + nodes + [helper.make_node("Flatten", ["o"], ["f"])]
        x_name = "x"
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(
        x_name, TensorProto.FLOAT, ["N", 4] if with_network else ["N", 2, 3, 4])],
        [helper.make_tensor_value_info("f" if with_network else "o", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("op,consts,attrs,opset", STRUCTURAL, ids=SIDS)
def test_structural_import_agrees_with_onnxruntime(op, consts, attrs, opset):
    model = structural_model(op, consts, attrs, opset, with_network=False)
    x = np.random.default_rng(0).standard_normal((3, 2, 3, 4)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"z": x})[0]
    got = Interpreter(load_onnx(model)).run(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op,consts,attrs,opset", STRUCTURAL, ids=SIDS)
def test_structural_bounds_hold_for_sampled_points(op, consts, attrs, opset):
    graph = load_onnx(structural_model(op, consts, attrs, opset, with_network=True))
    cert = Certifier(graph, dtype=torch.float32)
    n_out = graph.outputs[0].numel
    spec = torch.randn(1, 4, n_out, generator=torch.Generator().manual_seed(3))
    bound = cert.lower_bounds(cert.input_set(torch.zeros(1, 4), 1.0), spec)[0]
    gen = torch.Generator().manual_seed(0)
    pts = torch.cat([torch.rand(3000, 4, generator=gen) * 2 - 1,
                     torch.where(torch.rand(500, 4, generator=gen) < 0.5, 1.0, -1.0)])
    values = (cert.forward(pts) @ spec[0].T).min(0).values
    assert (bound <= values).all(), (bound, values)


def test_a_reduction_over_the_examples_is_refused():
    from dualgraph.errors import DualgraphError
    model = structural_model("ReduceSum", [np.array([0], np.int64)], {}, 17, with_network=False)
    with pytest.raises(DualgraphError, match="batch axis"):
        load_onnx(model)


def four_input_model(nodes, inits, n_out: int):
    """A model ``x[4] -> nodes -> y[n_out]`` (the nodes read ``x`` and write ``y``)."""
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def check_network(model, eps: float, seed: int, relaxations=("paper",), rtol: float = 1e-5):
    """The import agrees with onnxruntime, and certified lower bounds of random specifications
    over the box ``[-eps, eps]^4`` are below every sampled value (vertices included)."""
    from dualgraph.scheduler import BoundConfig
    rng = np.random.default_rng(seed)
    x = rng.uniform(-eps, eps, (7, 4)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    graph = load_onnx(model)
    np.testing.assert_allclose(Interpreter(graph).run(torch.from_numpy(x))[0].numpy(), want, rtol=rtol, atol=rtol)
    gen = torch.Generator().manual_seed(seed)
    pts = torch.cat([(torch.rand(3000, 4, generator=gen) * 2 - 1) * eps,
                     torch.where(torch.rand(500, 4, generator=gen) < 0.5, eps, -eps)])
    for relaxation in relaxations:
        cert = Certifier(graph, BoundConfig(relu_relaxation=relaxation))
        spec = torch.randn(1, 6, graph.outputs[0].numel, generator=gen)
        bound = cert.lower_bounds(cert.input_set(torch.zeros(1, 4), eps), spec)[0]
        values = (cert.forward(pts) @ spec[0].T).min(0).values
        assert (bound <= values).all(), (relaxation, bound, values)
    return graph


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_extremum_of_two_network_tensors(op):
    """``op(W1 x, W2 x, W3 x)``: three operands (a chain of two-operand nodes), all variable."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [helper.make_node("Gemm", ["x", f"w{i}"], [f"h{i}"], transB=1) for i in range(3)]
    nodes.append(helper.make_node(op, ["h0", "h1", "h2"], ["y"], name="the_op"))
    check_network(four_input_model(nodes, inits, 5), 1.0, 5, relaxations=("paper", "crown"), rtol=1e-6)


@pytest.mark.parametrize("operands", [("h0", "h1"), ("h0", "h0")], ids=["two-values", "one-value-twice"])
def test_product_of_network_tensors(operands):
    """Mul of two variables (a bilinear term) through ONNX: onnxruntime agreement, sound bounds."""
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), f"w{i}") for i in range(2)]
    nodes = [helper.make_node("Gemm", ["x", f"w{i}"], [f"h{i}"], transB=1) for i in range(2)]
    nodes.append(helper.make_node("Mul", list(operands), ["y"], name="the_product"))
    check_network(four_input_model(nodes, inits, 5), 0.5, 7)


def test_a_computed_divisor_is_a_product_with_its_reciprocal():
    """x / y with y computed (and bounded away from 0): Reciprocal then Mul, bounds sound."""
    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "w0"),
             numpy_helper.from_array((rng.standard_normal((5, 4)) * 0.1).astype(np.float32), "w1"),
             numpy_helper.from_array(np.full(5, 3.0, np.float32), "b1")]
    nodes = [helper.make_node("Gemm", ["x", "w0"], ["h0"], transB=1),
             helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1),   # about 3 +- 0.4
             helper.make_node("Div", ["h0", "h1"], ["y"], name="ratio")]
    graph = check_network(four_input_model(nodes, inits, 5), 1.0, 9)
    assert [n.op_type for n in graph.nodes][-2:] == ["Reciprocal", "Mul"]


def test_a_product_of_two_computed_matrices_is_bounded():
    """Attention's Q K^T: MatMul of two per-example matrices, both computed from the input."""
    rng = np.random.default_rng(10)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), f"w{i}") for i in range(2)]
    inits += [numpy_helper.from_array(np.array([-1, 2, 3], np.int64), "s0"),
              numpy_helper.from_array(np.array([-1, 3, 2], np.int64), "s1")]
    nodes = [helper.make_node("Gemm", ["x", "w0"], ["g0"], transB=1), helper.make_node("Reshape", ["g0", "s0"], ["q"]),
             helper.make_node("Gemm", ["x", "w1"], ["g1"], transB=1), helper.make_node("Reshape", ["g1", "s1"], ["k"]),
             helper.make_node("MatMul", ["q", "k"], ["s"], name="scores"), helper.make_node("Flatten", ["s"], ["y"])]
    check_network(four_input_model(nodes, inits, 4), 0.5, 11)


# ---- output-side ops ------------------------------------------------------------------------------

def _with_readout(nodes_after, outputs):
    """digits-small with nodes appended after its logits ``y``."""
    import onnx
    from dualgraph.models import HERE
    model = onnx.load(HERE / "digits_small.onnx")
    logits = model.graph.output[0].name
    for node in nodes_after(logits):
        model.graph.node.append(node)
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    return model


def test_a_trailing_argmax_is_certified_as_the_class_it_reads():
    from dualgraph.api import load_model
    from dualgraph.data import split_digits
    model = _with_readout(lambda y: [helper.make_node("ArgMax", [y], ["cls"], axis=1, keepdims=1)],
                          [helper.make_tensor_value_info("cls", TensorProto.INT64, ["N", 1])])
    x = split_digits()[1].images[:40]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    graph = load_onnx(model)
    np.testing.assert_array_equal(Interpreter(graph).run(x)[0].numpy(), want)
    with_readout, logits = Certifier(graph), Certifier(load_model("digits-small"))
    labels = logits.forward(x).argmax(1)
    a, b = with_readout.certify(x, labels, 0.05), logits.certify(x, labels, 0.05)
    assert torch.equal(a.certified, b.certified) and torch.equal(a.margins, b.margins)


def test_output_side_ops_elsewhere_are_refused_with_what_to_export():
    from dualgraph.errors import DualgraphError, UnsupportedOpError
    model = _with_readout(lambda y: [helper.make_node("ArgMax", [y], ["cls"], axis=1, keepdims=1),
                                     helper.make_node("Equal", ["cls", "three"], ["is3"])],
                          [helper.make_tensor_value_info("is3", TensorProto.BOOL, ["N", 1])])
    model.graph.initializer.append(numpy_helper.from_array(np.array([[3]], np.int64), "three"))
    graph = load_onnx(model)
    with pytest.raises(UnsupportedOpError, match="read a class or mask off the logits.*export the model without them"):
        Certifier(graph)


# ---- Where, Expand, Tile (written with Mul, Add, Concat) ------------------------------------------

def _rewritten(kind: str):
    rng = np.random.default_rng(12)
    inits = [numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "w")]
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1)]
    if kind == "where-const":
        inits += [numpy_helper.from_array(np.array([1, 0, 1, 1, 0], bool), "c"),
                  numpy_helper.from_array(np.array([np.inf, 7.0, np.nan, -2.0, -1.0], np.float32), "other")]  # non-finite only where masked out
        nodes.append(helper.make_node("Where", ["c", "h", "other"], ["y"]))
        return nodes, inits, 5
    if kind == "where-two":
        inits += [numpy_helper.from_array(np.array([[1, 0, 0, 1, 0]], bool), "c")]
        nodes += [helper.make_node("Neg", ["h"], ["g"]), helper.make_node("Where", ["c", "h", "g"], ["y"])]
        return nodes, inits, 5
    if kind == "expand":
        inits += [numpy_helper.from_array(np.array([-1, 1, 5], np.int64), "s"),
                  numpy_helper.from_array(np.array([1, 3, 5], np.int64), "to")]
        nodes += [helper.make_node("Reshape", ["h", "s"], ["r"]), helper.make_node("Expand", ["r", "to"], ["e"]),
                  helper.make_node("Flatten", ["e"], ["y"])]
        return nodes, inits, 15
    inits += [numpy_helper.from_array(np.array([1, 3], np.int64), "reps")]
    nodes.append(helper.make_node("Tile", ["h", "reps"], ["y"]))
    return nodes, inits, 15


@pytest.mark.parametrize("kind", ["where-const", "where-two", "expand", "tile"])
def test_ops_written_with_others_agree_and_bound(kind):
    nodes, inits, n_out = _rewritten(kind)
    graph = check_network(four_input_model(nodes, inits, n_out), 1.0, 13)
    assert not {"Where", "Expand", "Tile"} & {n.op_type for n in graph.nodes}


CONV_TRANSPOSE = [  # input [N, 2, 4, 5], weight [2, 3 / group, 3, 3], attributes
    {"strides": [2, 2]},
    {"strides": [2, 1], "pads": [1, 0, 0, 2], "output_padding": [1, 0]},
    {"strides": [2, 2], "output_shape": [9, 10]},
    {"strides": [2, 2], "output_shape": [10, 12]},  # past the full output: zeros (and the bias) at the end
    {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
    {"strides": [1, 2], "auto_pad": "SAME_LOWER", "dilations": [2, 1]},
    {"group": 2, "strides": [2, 2], "pads": [1, 1, 1, 1]},
]


@pytest.mark.parametrize("attrs", CONV_TRANSPOSE, ids=[str(i) for i in range(len(CONV_TRANSPOSE))])
def test_conv_transpose_agrees_with_onnxruntime_and_bounds(attrs):
    rng = np.random.default_rng(14)
    group = attrs.get("group", 1)
    w = rng.standard_normal((2, 4 // group if group > 1 else 3, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(rng.standard_normal((40, 4)).astype(np.float32), "w0"),
             numpy_helper.from_array(np.array([-1, 2, 4, 5], np.int64), "s"),
             numpy_helper.from_array(w, "wt"), numpy_helper.from_array(rng.standard_normal(w.shape[1] * group)
                                                                      .astype(np.float32), "bt")]
    nodes = [helper.make_node("Gemm", ["x", "w0"], ["h"], transB=1), helper.make_node("Reshape", ["h", "s"], ["r"]),
             helper.make_node("ConvTranspose", ["r", "wt", "bt"], ["c"], **attrs), helper.make_node("Flatten", ["c"], ["y"])]
    probe = four_input_model(nodes, inits, 1)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    n_out = session.run(None, {"x": np.zeros((1, 4), np.float32)})[0].shape[1]
    graph = check_network(four_input_model(nodes, inits, n_out), 0.5, 15)
    assert "ConvTranspose" in [n.op_type for n in graph.nodes]


def test_conv_transpose_lowers_from_torch():
    from dualgraph.api import load_model
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU(),
                              torch.nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1, groups=1)).eval()
    x = torch.randn(3, 2, 7, 7)
    graph = load_model(net, x)
    torch.testing.assert_close(Interpreter(graph).run(x)[0], net(x), rtol=1e-5, atol=1e-5)


def test_softmax_inside_a_network_is_bounded():
    """Attention as exported: scores, Softmax over the keys, then the weighted values."""
    rng = np.random.default_rng(16)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), f"w{i}") for i in range(3)]
    inits += [numpy_helper.from_array(np.array([-1, 2, 3], np.int64), "s0"),
              numpy_helper.from_array(np.array([-1, 3, 2], np.int64), "s1"),
              numpy_helper.from_array(np.array([-1, 2, 3], np.int64), "s2")]
    nodes = [helper.make_node("Gemm", ["x", "w0"], ["g0"], transB=1), helper.make_node("Reshape", ["g0", "s0"], ["q"]),
             helper.make_node("Gemm", ["x", "w1"], ["g1"], transB=1), helper.make_node("Reshape", ["g1", "s1"], ["k"]),
             helper.make_node("Gemm", ["x", "w2"], ["g2"], transB=1), helper.make_node("Reshape", ["g2", "s2"], ["v"]),
             helper.make_node("MatMul", ["q", "k"], ["scores"]), helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["o"]), helper.make_node("Flatten", ["o"], ["y"])]
    graph = check_network(four_input_model(nodes, inits, 6), 0.3, 17)
    assert "Softmax" in [n.op_type for n in graph.nodes]


@pytest.mark.parametrize("axis,affine", [(-1, True), (1, False), (2, True)])
def test_layer_normalization_agrees_and_bounds(axis, affine):
    """LayerNormalization on [N, 2, 3] (opset 17's own op), over the last axis or the last two."""
    rng = np.random.default_rng(18)
    shape = {-1: [3], 1: [2, 3], 2: [3]}[axis]
    inits = [numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([-1, 2, 3], np.int64), "s")]
    names = ["r"]
    if affine:
        inits += [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "gamma"),
                  numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "beta")]
        names += ["gamma", "beta"]
    else:
        inits.append(numpy_helper.from_array(np.ones(shape, np.float32), "gamma"))
        names.append("gamma")
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1), helper.make_node("Reshape", ["h", "s"], ["r"]),
             helper.make_node("LayerNormalization", names, ["n"], axis=axis, epsilon=1e-3),
             helper.make_node("Flatten", ["n"], ["y"])]
    graph = check_network(four_input_model(nodes, inits, 6), 0.2, 19, rtol=1e-4)
    assert "LayerNormalization" in [n.op_type for n in graph.nodes]


def test_layer_norm_lowers_from_torch():
    from dualgraph.api import load_model
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.ReLU(), torch.nn.Linear(6, 2)).eval()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5), net[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(5, 4)
    graph = load_model(net, x)
    torch.testing.assert_close(Interpreter(graph).run(x)[0], net(x), rtol=1e-5, atol=1e-5)


RESIZE = [  # attributes, scales or sizes (ONNX, [N, 2, 3, 4]), opset
    ({"mode": "nearest"}, {"scales": [1, 1, 2, 2]}, 13),
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
     {"scales": [1, 1, 2, 1.5]}, 13),
    ({"mode": "nearest", "nearest_mode": "ceil", "coordinate_transformation_mode": "align_corners"},
     {"sizes": [1, 2, 5, 7]}, 13),
    ({"mode": "linear"}, {"scales": [1, 1, 2, 2]}, 13),
    ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, {"sizes": [1, 2, 5, 3]}, 13),
    ({"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, {"sizes": [1, 2, 1, 6]}, 13),
    ({"mode": "linear", "coordinate_transformation_mode": "asymmetric"}, {"scales": [1, 1, 0.5, 2]}, 13),
    ({"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"}, {"scales": [1, 1, 1.5, 0.75]}, 19),
]


@pytest.mark.parametrize("attrs,given,opset", RESIZE, ids=[str(i) for i in range(len(RESIZE))])
def test_resize_agrees_with_onnxruntime_and_bounds(attrs, given, opset):
    rng = np.random.default_rng(20)
    inits = [numpy_helper.from_array(rng.standard_normal((24, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([-1, 2, 3, 4], np.int64), "s"),
             numpy_helper.from_array(np.array(given.get("scales", []), np.float32), "scales")]
    names = ["r", "", "scales"]
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1), helper.make_node("Reshape", ["h", "s"], ["r"])]
    if "sizes" in given:  # as exports write them: the batch from Shape, the rest constant
        inits += [numpy_helper.from_array(np.array(given["sizes"][1:], np.int64), "rest"),
                  numpy_helper.from_array(np.array([0], np.int64), "zero"),
                  numpy_helper.from_array(np.array([1], np.int64), "one")]
        nodes += [helper.make_node("Shape", ["r"], ["shape"]), helper.make_node("Slice", ["shape", "zero", "one"], ["n"]),
                  helper.make_node("Concat", ["n", "rest"], ["sizes"], axis=0)]
        names = ["r", "", "", "sizes"]
    nodes += [helper.make_node("Resize", names, ["z"], **attrs), helper.make_node("Flatten", ["z"], ["y"])]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    n_out = session.run(None, {"x": np.zeros((1, 4), np.float32)})[0].shape[1]
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out]))
    check_network(model, 0.5, 21)


def _resize_cases(count: int = 48):
    rng = np.random.default_rng(31)
    for _ in range(count):
        mode = str(rng.choice(["nearest", "linear"]))
        attrs = {"mode": mode, "coordinate_transformation_mode": str(rng.choice(
            ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric"]))}
        if mode == "nearest":
            attrs["nearest_mode"] = str(rng.choice(["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]))
        size_in, size_out = int(rng.integers(2, 10)), int(rng.integers(1, 22))
        given = "sizes" if rng.random() < 0.5 else "scales"
        yield attrs, size_in, size_out, given


REVIEWED_RESIZES = [  # a review's sweep of 2-D resizes, reduced to one axis
    ({"mode": "nearest", "coordinate_transformation_mode": "half_pixel_symmetric", "nearest_mode": "floor"},
     6, 22, "sizes"),
    ({"mode": "nearest", "coordinate_transformation_mode": "half_pixel_symmetric", "nearest_mode": "floor"},
     3, 29, "scales"),
    ({"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, 2, 2, "scales"),
]


@pytest.mark.parametrize("attrs,size_in,size_out,given", list(_resize_cases()) + REVIEWED_RESIZES)
def test_resize_indices_and_weights_are_onnxruntime_s(attrs, size_in, size_out, given):
    """onnxruntime computes Resize's sizes, scales, source coordinates and weights in float32; in
    float64, 7 -> 9 by half_pixel reads input 2 where onnxruntime reads 3, and a scale of
    float32(5/3) makes 4 columns of 3 where onnxruntime makes 5 (a review's sweep: about 900 of
    8,400 cases differed). Random cases, the IR against onnxruntime; a size kept is the input
    whatever the scale, and half_pixel_symmetric ends in float64 (a second review)."""
    scale = np.float32(size_out) / np.float32(size_in) if size_out != size_in else np.float32(1.3339229822158813)
    inits = [numpy_helper.from_array(np.array([1, 1, scale] if given == "scales" else [], np.float32), "scales")]
    names = ["x", "", "scales"]
    if given == "sizes":
        inits.append(numpy_helper.from_array(np.array([1, 1, size_out], np.int64), "sizes"))
        names = ["x", "", "", "sizes"]
    graph = helper.make_graph([helper.make_node("Resize", names, ["y"], **attrs)], "t",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, size_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    x = np.random.default_rng(size_in * 31 + size_out).standard_normal((1, 1, size_in)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = Interpreter(load_onnx(model)).run(torch.from_numpy(x))[0].numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reduction,const_updates", [("none", False), ("add", False), ("none", True)])
def test_scatter_nd_agrees_and_bounds(reduction, const_updates):
    """ScatterND as exports write in-place slice assignment (batch 1: the indices address it)."""
    rng = np.random.default_rng(22)
    inits = [numpy_helper.from_array(rng.standard_normal((12, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([1, 4, 3], np.int64), "s"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "s2"),
             numpy_helper.from_array(np.array([[0, 1], [0, 3]], np.int64), "idx")]
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1), helper.make_node("Reshape", ["h", "s"], ["r"])]
    if const_updates:
        inits.append(numpy_helper.from_array(rng.standard_normal((2, 3)).astype(np.float32), "upd"))
    else:
        nodes += [helper.make_node("Gemm", ["x", "w2"], ["g"], transB=1), helper.make_node("Reshape", ["g", "s2"], ["upd"])]
    nodes += [helper.make_node("ScatterND", ["r", "idx", "upd"], ["z"], reduction=reduction),
              helper.make_node("Flatten", ["z"], ["y"])]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ir = load_onnx(model)
    cert = Certifier(ir)
    for x in rng.uniform(-1, 1, (4, 1, 4)).astype(np.float32):
        np.testing.assert_allclose(cert.forward(torch.from_numpy(x)).numpy(), session.run(None, {"x": x})[0],
                                   rtol=1e-5, atol=1e-5)
    spec = torch.randn(1, 5, 12, generator=torch.Generator().manual_seed(23))
    bound = cert.lower_bounds(cert.input_set(torch.zeros(1, 4), 0.5), spec)[0]
    gen = torch.Generator().manual_seed(0)
    pts = torch.cat([torch.rand(2000, 4, generator=gen) - 0.5, torch.where(torch.rand(300, 4, generator=gen) < 0.5, 0.5, -0.5)])
    values = (cert.forward(pts) @ spec[0].T).min(0).values
    assert (bound <= values).all()


def test_one_hot_and_upsample_agree_with_onnxruntime():
    """OneHot of an ArgMax (an output-side readout, evaluated only) and the deprecated Upsample."""
    rng = np.random.default_rng(24)
    inits = [numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(5, np.int64), "depth"),
             numpy_helper.from_array(np.array([0.0, 1.0], np.float32), "values")]
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1),
             helper.make_node("ArgMax", ["h"], ["cls"], axis=1, keepdims=0),
             helper.make_node("OneHot", ["cls", "depth", "values"], ["y"], axis=-1)]
    model = four_input_model(nodes, inits, 5)
    x = rng.uniform(-1, 1, (6, 4)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(Interpreter(load_onnx(model)).run(torch.from_numpy(x))[0].numpy(), want)
    # a class past the depth is a row of off values in onnxruntime (it wrapped around: a review)
    inits[1] = numpy_helper.from_array(np.array(3, np.int64), "depth")
    model = four_input_model(nodes, inits, 3)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert (want.sum(1) == 0).any()
    np.testing.assert_array_equal(Interpreter(load_onnx(model)).run(torch.from_numpy(x))[0].numpy(), want)

    inits = [numpy_helper.from_array(rng.standard_normal((4, 12)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([-1, 2, 2, 3], np.int64), "s"),
             numpy_helper.from_array(np.array([1.0, 1.0, 2.0, 2.0], np.float32), "scales")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "s"], ["r"]),
             helper.make_node("Upsample", ["r", "scales"], ["u"], mode="nearest"), helper.make_node("Flatten", ["u"], ["y"])]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 48])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    check_network(model, 0.5, 25)


def test_a_dropout_in_training_mode_is_refused():
    """onnxruntime drops random entries then (the IR read it as the identity: a review)."""
    graph = helper.make_graph([helper.make_node("Dropout", ["x", "r", "t"], ["y"], name="drop")], "t",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(np.array(0.5, np.float32), "r"),
                               numpy_helper.from_array(np.array(True), "t")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(DualgraphError, match=r"node 'drop' \(Dropout\) runs in training mode"):
        load_onnx(model)


def test_a_float64_pad_value_keeps_its_precision():
    """0.1 in a float64 model is float64's 0.1 (it was rounded to float32's: a review)."""
    graph = helper.make_graph([helper.make_node("Pad", ["x", "p", "v"], ["y"])], "t",
                              [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", 3])],
                              [numpy_helper.from_array(np.array([0, 1, 0, 0], np.int64), "p"),
                               numpy_helper.from_array(np.array(0.1, np.float64), "v")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    y = Interpreter(load_onnx(model)).run(torch.zeros(1, 2, dtype=torch.float64))[0]
    assert float(y[0, 0]) == 0.1


def test_resize_10_nearest_downsampling_is_refused():
    graph = helper.make_graph([helper.make_node("Resize", ["x", "s"], ["y"], mode="nearest", name="down")], "t",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4])],
                              [numpy_helper.from_array(np.array([1, 1, 0.75], np.float32), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
    with pytest.raises(DualgraphError, match=r"node 'down' \(Resize, opset 10\): nearest downsampling"):
        load_onnx(model)


def test_scatter_nd_refuses_repeated_indices_without_a_reduction():
    """ONNX leaves them undefined, and the adjoint would add what the evaluation overwrites (an
    independent review found the unsound bound: the checker's own example fails on it)."""
    from dualgraph.errors import DualgraphError
    from dualgraph.op_registry import OpExample, find_op
    from dualgraph.testing import example_node
    with pytest.raises(DualgraphError, match="repeated indices"):
        example_node(find_op("ScatterND"), OpExample((var_spec(3), torch.tensor([[1], [1]]), var_spec(2)), {}, 1))


def var_spec(*shape):
    from dualgraph.op_registry import var
    return var(*shape)
