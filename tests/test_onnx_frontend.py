"""The ONNX frontend: bad inputs, folding, normalisation, batch layouts, shapes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dualgraph import Interpreter, check_graph, define_op
from dualgraph.op_registry import remove_op
from dualgraph.errors import DualgraphError, UnsupportedOpError
from dualgraph.frontends.onnx import load_onnx, onnx_feeds, run_onnxruntime, supported_ops
from models_zoo import ZOO

F = TensorProto.FLOAT


def make_model(nodes, inputs, outputs, inits=(), opset=17):
    """A model from ``inputs``/``outputs`` given as ``(name, shape)`` and arrays ``inits``."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, F, s) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(a), name) for name, a in dict(inits).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def w(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- bad files ------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(DualgraphError) as e:
        load_onnx(tmp_path / "nope.onnx")
    assert "does not exist" in one_line(e) and "nope.onnx" in one_line(e)


def test_directory(tmp_path):
    with pytest.raises(DualgraphError) as e:
        load_onnx(tmp_path)
    assert "directory" in one_line(e)


@pytest.mark.parametrize("content", [
    np.random.default_rng(0).bytes(4096), b"", b"this is a text file, not a model\n",
    b"\x08\x07\x12\x04abcd\x3a\xff\xff\xff\xff\x0f"], ids=["random", "empty", "text", "bad-length"])
def test_not_an_onnx_file(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(DualgraphError) as e:
        load_onnx(path)
    assert "bad.onnx" in one_line(e)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.999])
def test_truncated_protobuf(tmp_path, fraction):
    data = mlp_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(DualgraphError) as e:
        load_onnx(path)
    one_line(e)


def mlp_model(opset=17):
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1, name="fc2")]
    inits = {"w1": w(8, 4), "b1": w(8, seed=1), "w2": w(3, 8, seed=2), "b2": w(3, seed=3)}
    return make_model(nodes, [("x", ["N", 4])], [("y", ["N", 3])], inits, opset)


def test_model_proto_and_path_give_the_same_graph(tmp_path):
    model = mlp_model()
    onnx.save(model, tmp_path / "m.onnx")
    a, b = load_onnx(model), load_onnx(tmp_path / "m.onnx")
    assert [n.op_type for n in a.nodes] == [n.op_type for n in b.nodes] == ["Gemm", "Relu", "Gemm"]
    x = torch.randn(5, 4)
    torch.testing.assert_close(Interpreter(a).run(x)[0], Interpreter(b).run(x)[0])


# ---- unsupported and malformed models ---------------------------------------------------------------
def test_unsupported_ops_are_all_listed():
    body = helper.make_graph([], "body", [], [])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("LSTM", ["r", "W", "R"], ["lstm_out"], name="lstm_1", hidden_size=2),
             helper.make_node("Loop", ["", "", "lstm_out"], ["l1_out"], name="l1", body=body),
             helper.make_node("Loop", ["", "", "l1_out"], ["l2_out"], name="l2", body=body),
             helper.make_node("Swish", ["l2_out"], ["s"], name="sw", domain="com.example"),
             helper.make_node("Hardmax", ["s"], ["y"], name="erf_7"),
             helper.make_node("Hardmax", ["x"], ["dead"], name="never_used")]
    model = make_model(nodes, [("x", ["N", 3])], [("y", None)], {"W": w(1, 8, 3), "R": w(1, 8, 2)})
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UnsupportedOpError) as e:
        load_onnx(model)
    msg = one_line(e)
    assert msg.startswith("unsupported ONNX ops: ")
    for part in ("LSTM (nodes 'lstm_1')", "Loop (nodes 'l1', 'l2')", "com.example.Swish (nodes 'sw')",
                 "Hardmax (nodes 'erf_7')", "supported: ", "Conv", "plugin"):
        assert part in msg
    assert "never_used" not in msg  # dead code is dropped first


def test_no_inputs():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [2])], [("y", [2])], {"x": w(2)})
    with pytest.raises(DualgraphError) as e:
        load_onnx(model)
    assert "no inputs" in one_line(e)


@pytest.mark.parametrize("shape, needle", [(["N", "C", 4], "'C'"), (["N", 3, None], "dimension 2"),
                                           (None, "no shape")])
def test_unresolvable_input_shapes(shape, needle):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", shape)], [("y", None)])
    with pytest.raises(DualgraphError) as e:
        load_onnx(model)
    assert needle in one_line(e) and "'x'" in one_line(e)


def test_integer_input_rejected():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    with pytest.raises(DualgraphError) as e:
        load_onnx(helper.make_model(graph))
    assert "INT64" in one_line(e)


def test_reshape_target_from_input_values_is_rejected():
    nodes = [helper.make_node("Relu", ["x"], ["s"]),  # a target computed from the input values
             helper.make_node("Reshape", ["x", "s"], ["y"], name="dyn_reshape")]
    model = make_model(nodes, [("x", ["N", 2])], [("y", None)])
    with pytest.raises(DualgraphError) as e:
        load_onnx(model)
    assert "dyn_reshape" in one_line(e) and "constant" in one_line(e)


def test_output_that_ignores_the_input():
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Identity", ["c"], ["z"])]
    model = make_model(nodes, [("x", ["N", 2])], [("y", None), ("z", None)], {"c": w(2)})
    with pytest.raises(DualgraphError) as e:
        load_onnx(model)
    assert "'z'" in one_line(e)


def test_cast_to_integer_is_rejected():
    nodes = [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT64, name="to_int")]
    with pytest.raises(DualgraphError) as e:
        load_onnx(make_model(nodes, [("x", ["N", 2])], [("y", None)]))
    assert "to_int" in one_line(e)


def test_dropout_mask_cannot_be_used():
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"], name="drop"),
             helper.make_node("Cast", ["mask"], ["y"], to=F)]
    with pytest.raises(DualgraphError) as e:
        load_onnx(make_model(nodes, [("x", ["N", 2])], [("y", None)]))
    assert "drop" in one_line(e)


# ---- ops that would mix the examples of a batch -------------------------------------------------------
MIXING = {
    "transpose_batch": (helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0], name="bad"), {}),
    "concat_axis0": (helper.make_node("Concat", ["x", "x"], ["y"], axis=0, name="bad"), {}),
    "softmax_axis0": (helper.make_node("Softmax", ["x"], ["y"], axis=0, name="bad"), {}),
    "reshape_merge": (helper.make_node("Reshape", ["x", "s"], ["y"], name="bad"), {"s": np.array([-1], np.int64)}),
    "reshape_split": (helper.make_node("Reshape", ["x", "s"], ["y"], name="bad"), {"s": np.array([2, -1], np.int64)}),
    "reshape_literal_1": (helper.make_node("Reshape", ["x", "s"], ["y"], name="bad"), {"s": np.array([1, -1], np.int64)}),
    "flatten_axis0": (helper.make_node("Flatten", ["x"], ["y"], axis=0, name="bad"), {}),
    "reduce_batch_matmul": (helper.make_node("MatMul", ["m", "x"], ["y"], name="bad"), {"m": w(3, 5)}),
}


@pytest.mark.parametrize("case", sorted(MIXING))
def test_batch_mixing_ops_are_rejected_with_the_node_name(case):
    node, inits = MIXING[case]
    model = make_model([node], [("x", ["N", 4])], [("y", None)], inits)
    with pytest.raises(DualgraphError) as e:
        load_onnx(model)
    assert "'bad'" in one_line(e) and "batch" in one_line(e)


def test_fixed_batch_one_allows_ops_on_axis_0():
    """With a fixed batch of 1, axis 0 is an ordinary per-example axis of size 1."""
    nodes = [helper.make_node("Reshape", ["x", "s"], ["v"], name="to_vector"),      # [1,2,3] -> [6]
             helper.make_node("MatMul", ["W", "v"], ["h"], name="column_matmul"),   # [4,6] @ [6]
             helper.make_node("Unsqueeze", ["h", "ax"], ["hc"], name="unsq"),       # [4, 1]
             helper.make_node("Transpose", ["hc"], ["ht"], perm=[1, 0]),            # [1, 4]
             helper.make_node("Concat", ["ht", "ht"], ["c"], axis=0),               # [2, 4]
             helper.make_node("Softmax", ["c"], ["sm"], axis=0),
             helper.make_node("Flatten", ["sm"], ["y"], axis=0)]                    # [1, 8]
    inits = {"s": np.array([6], np.int64), "W": w(4, 6), "ax": np.array([1], np.int64)}
    model = make_model(nodes, [("x", [1, 2, 3])], [("y", [1, 8])], inits)
    graph = load_onnx(model)
    assert graph.inputs[0].shape == ("N", 2, 3) and graph.outputs[0].shape == ("N", 8)
    x = w(5, 2, 3, seed=4)
    expected = np.concatenate([ort_run(model, {"x": xi[None]})[0] for xi in x])
    np.testing.assert_allclose(Interpreter(graph).run(torch.from_numpy(x))[0].numpy(), expected, rtol=1e-5,
                               atol=1e-6)


# ---- batch layouts ----------------------------------------------------------------------------------
def test_rank1_input_gets_a_batch_axis():
    """vnncomp's test_nano style: an input of shape [k] and W @ x column products."""
    nodes = [helper.make_node("MatMul", ["W", "x"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    model = make_model(nodes, [("x", [3])], [("y", [2])], {"W": w(2, 3), "b": w(2, seed=1)})
    graph = load_onnx(model)
    assert graph.inputs[0].shape == ("N", 3) and graph.outputs[0].shape == ("N", 2)
    assert graph.meta["onnx_inputs"] == [{"name": "x", "shape": [3], "layout": "added", "dynamic": False,
                                          "dtype": "float32"}]
    assert graph.meta["onnx_outputs"][0]["layout"] == "added"
    x = w(4, 3, seed=2)
    feeds = onnx_feeds(graph, x)
    assert len(feeds) == 4 and feeds[0]["x"].shape == (3,)
    expected = run_onnxruntime(model, graph, x)[0]
    assert expected.shape == (4, 2)
    np.testing.assert_allclose(Interpreter(graph).run(torch.from_numpy(x))[0].numpy(), expected, rtol=1e-6)


def test_input_layout_meta_and_feeds():
    graph = load_onnx(mlp_model())
    assert graph.meta["onnx_inputs"][0] == {"name": "x", "shape": ["N", 4], "layout": "batch", "dynamic": True,
                                            "dtype": "float32"}
    x = np.zeros((6, 4), np.float32)
    assert [f["x"].shape for f in onnx_feeds(graph, x)] == [(6, 4)]
    fixed = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [1, 4])], [("y", [1, 4])])
    g = load_onnx(fixed)
    assert g.meta["onnx_inputs"][0]["layout"] == "batch" and not g.meta["onnx_inputs"][0]["dynamic"]
    assert [f["x"].shape for f in onnx_feeds(g, x)] == [(1, 4)] * 6
    np.testing.assert_array_equal(run_onnxruntime(fixed, g, x)[0], x)


def test_leading_fixed_dim_above_one_is_per_example():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [5, 2])], [("y", [5, 2])])
    graph = load_onnx(model)
    assert graph.inputs[0].shape == ("N", 5, 2)
    assert graph.meta["onnx_inputs"][0]["layout"] == "added"


# ---- constant folding and normalisation ------------------------------------------------------------------
class ViewNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 3, 3)
        self.fc = torch.nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.size(0), -1))


@pytest.mark.parametrize("dynamic", [True, False])
def test_shape_gather_concat_reshape_is_folded(tmp_path, dynamic):
    model, path = ViewNet().eval(), tmp_path / "view.onnx"
    axes = {"dynamic_axes": {"x": {0: "b"}, "y": {0: "b"}}} if dynamic else {}
    with pytest.warns(Warning):  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(2 if dynamic else 1, 1, 6, 6),), str(path), input_names=["x"],
                          output_names=["y"], dynamo=False, **axes)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    if dynamic:
        assert {"Shape", "Gather", "Unsqueeze", "Concat"} <= set(ops)
    graph = load_onnx(path)
    assert [n.op_type for n in graph.nodes] == ["Conv", "Relu", "Reshape", "Gemm"]
    reshape = graph.nodes[2]
    assert reshape.inputs[1].const.tolist() == [-1, 48] and reshape.output.shape == ("N", 48)
    for batch in (1, 3, 7):
        x = torch.randn(batch, 1, 6, 6)
        with torch.no_grad():
            torch.testing.assert_close(Interpreter(graph).run(x)[0], model(x), rtol=1e-5, atol=1e-6)


def test_batch_sized_constants_broadcast():
    """zeros(x.size(0), 4) + x: ConstantOfShape built from the batch size folds to one row."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["z"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("Add", ["x", "z"], ["y"])]
    model = make_model(nodes, [("x", ["N", 4])], [("y", None)])
    graph = load_onnx(model)
    assert [n.op_type for n in graph.nodes] == ["Add"]
    x = w(3, 4)
    np.testing.assert_allclose(Interpreter(graph).run(torch.from_numpy(x))[0].numpy(), x + 0.5)


def test_constant_nodes_become_constants():
    nodes = [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w(4, 3))),
             helper.make_node("Constant", [], ["b"], value_float=0.25),
             helper.make_node("Constant", [], ["k"], value_floats=[1.0, 2.0, 3.0]),
             helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Add", ["h", "b"], ["a"]),
             helper.make_node("Mul", ["a", "k"], ["y"])]
    model = make_model(nodes, [("x", ["N", 4])], [("y", None)])
    graph = load_onnx(model)
    assert [n.op_type for n in graph.nodes] == ["MatMul", "Add", "Mul"]
    assert all(v.is_const for n in graph.nodes for v in n.inputs[1:])
    x = w(5, 4, seed=1)
    np.testing.assert_allclose(Interpreter(graph).run(torch.from_numpy(x))[0].numpy(),
                               ort_run(model, {"x": x})[0], rtol=1e-6)


def test_initializer_graph_inputs_are_constants():
    model = mlp_model()
    for init in model.graph.initializer:  # old exporters (IR < 4) list weights as inputs
        model.graph.input.append(helper.make_tensor_value_info(init.name, F, list(init.dims)))
    graph = load_onnx(model)
    assert [v.name for v in graph.inputs] == ["x"]
    assert graph.num_parameters() == 8 * 4 + 8 + 3 * 8 + 3


@pytest.mark.parametrize("opset, inputs, attrs", [
    (6, ["x"], {"min": -0.5, "max": 0.25}),
    (10, ["x"], {"max": 0.25}),
    (13, ["x", "lo", "hi"], {}),
    (13, ["x", "", "hi"], {}),
    (13, ["x", "lo"], {}),
])
def test_clip_both_opset_styles(opset, inputs, attrs):
    node = helper.make_node("Clip", inputs, ["y"], **attrs)
    model = make_model([node], [("x", ["N", 6])], [("y", None)],
                       {"lo": np.float32(-0.5), "hi": np.float32(0.25)}, opset)
    graph = load_onnx(model)
    (clip,) = graph.nodes
    assert clip.op_type == "Clip" and not clip.attrs
    assert all(v is None or v.is_const for v in clip.inputs[1:])
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6)
    got = Interpreter(graph).run(torch.from_numpy(x))[0].numpy()
    np.testing.assert_array_equal(got, ort_run(model, {"x": x})[0])
    lo = -0.5 if "min" in attrs or "lo" in inputs else None
    np.testing.assert_array_equal(got, np.clip(x, lo, 0.25 if ("max" in attrs or "hi" in inputs) else None))


def test_squeeze_unsqueeze_axes_become_attributes():
    nodes = [helper.make_node("Unsqueeze", ["x", "a"], ["u"]), helper.make_node("Squeeze", ["u", "a"], ["y"])]
    model = make_model(nodes, [("x", ["N", 3])], [("y", None)], {"a": np.array([-1], np.int64)})
    graph = load_onnx(model)
    assert [(n.op_type, n.attrs["axes"], len(n.inputs)) for n in graph.nodes] == [
        ("Unsqueeze", [2], 1), ("Squeeze", [2], 1)]


def test_dropout_becomes_identity():
    model = make_model([helper.make_node("Dropout", ["x"], ["y"])], [("x", ["N", 2])], [("y", None)])
    assert [n.op_type for n in load_onnx(model).nodes] == ["Identity"]


# ---- shapes and structure ----------------------------------------------------------------------------------
def test_inferred_shapes_of_a_cnn(zoo_onnx):
    graph = load_onnx(zoo_onnx("cnn"))
    shapes = [(n.op_type, n.output.shape) for n in graph.nodes]
    assert shapes == [("Conv", ("N", 8, 6, 6)), ("Relu", ("N", 8, 6, 6)), ("Conv", ("N", 8, 6, 6)),
                      ("Relu", ("N", 8, 6, 6)), ("Conv", ("N", 16, 6, 3)), ("Relu", ("N", 16, 6, 3)),
                      ("Reshape", ("N", 288)), ("Gemm", ("N", 10))]
    conv = graph.nodes[0]
    assert conv.attrs == {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                          "dilations": [1, 1], "group": 1}
    assert graph.outputs[0].unit_shape == (10,)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_graphs_verify(name, zoo_onnx):
    graph = load_onnx(zoo_onnx(name))
    check_graph(graph)
    assert all(v.shape[0] == "N" for n in graph.nodes for v in n.outputs)
    assert not any(n.op_type in ("Shape", "Gather", "Constant", "Cast") for n in graph.nodes)


def test_auto_pad_is_normalised_to_explicit_pads():
    node = helper.make_node("Conv", ["x", "W"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])
    graph = load_onnx(make_model([node], [("x", ["N", 1, 5, 6])], [("y", None)], {"W": w(2, 1, 2, 2)}))
    conv = graph.nodes[0]
    assert "auto_pad" not in conv.attrs and conv.attrs["pads"] == [0, 0, 1, 0]
    assert conv.output.shape == ("N", 2, 3, 3)


@pytest.mark.parametrize("op", ["AveragePool", "MaxPool", "Conv"])
def test_auto_pad_same_with_dilation_is_refused(op):
    """onnxruntime's pools pad SAME for the undilated kernel (the spec: the dilated span), so
    the network it evaluates differs from the one we would bound (found by a review: a
    certified lower bound 8.3 where onnxruntime gives 5.0); its Conv refuses the combination."""
    attrs = {"kernel_shape": [1, 3], "dilations": [1, 2], "auto_pad": "SAME_UPPER"}
    node = (helper.make_node(op, ["x", "W"], ["y"], name="p", **attrs) if op == "Conv"
            else helper.make_node(op, ["x"], ["y"], name="p", **attrs))
    consts = {"W": w(1, 1, 1, 3)} if op == "Conv" else {}
    with pytest.raises(UnsupportedOpError, match=r"node 'p' \(" + op + r"\): auto_pad SAME_UPPER with dilations"):
        load_onnx(make_model([node], [("x", ["N", 1, 1, 6])], [("y", None)], consts))


def test_plugin_ops_pass_through():
    double = define_op("Double", domain="test.plugin")
    double.evaluate(lambda node, inputs: inputs[0] * 2)
    try:
        node = helper.make_node("Double", ["x"], ["y"], domain="test.plugin", name="dbl")
        model = make_model([node], [("x", ["N", 3])], [("y", None)])
        model.opset_import.append(helper.make_opsetid("test.plugin", 1))
        graph = load_onnx(model)
        assert graph.nodes[0].op == ("test.plugin", "Double")
        assert "test.plugin.Double" in supported_ops()
        torch.testing.assert_close(Interpreter(graph).run(torch.ones(2, 3))[0], torch.full((2, 3), 2.0))
    finally:
        remove_op(double.key)


def test_shared_vnncomp_models_layouts(shared_dir):
    shared = shared_dir
    if shared is None:
        pytest.skip("../shared is absent: the VNN-COMP test models (test_nano.onnx, ...) live in ../shared/vnncomp2021")
    nano = load_onnx(shared / "vnncomp2021" / "test" / "test_nano.onnx")
    assert nano.inputs[0].shape == ("N", 1) and nano.meta["onnx_inputs"][0]["layout"] == "added"
    fc = load_onnx(shared / "vnncomp2021" / "mnistfc" / "mnist-net_256x2.onnx")
    assert fc.inputs[0].shape == ("N", 784, 1) and fc.meta["onnx_inputs"][0]["shape"] == [1, 784, 1]
    paper = load_onnx(shared / "paper_models" / "mnist_small_0_3_stage0.onnx")
    assert paper.meta["onnx_inputs"][0]["dynamic"] and paper.num_parameters() == 166406


# ---- the lowered graph against onnxruntime ----------------------------------------------------
def _dense_model() -> onnx.ModelProto:
    w = np.array([[1.0, -2.0, 0.5], [0.25, 1.5, -1.0]], np.float32)
    return make_model([helper.make_node("Gemm", ["x", "W", "b"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["y"])],
                      [("x", ["N", 3])], [("y", ["N", 2])], {"W": w, "b": np.array([0.1, -0.2], np.float32)})


def test_a_graph_that_computes_another_function_than_onnxruntime_is_refused():
    """A certificate is about the lowered graph: one whose function differs from onnxruntime's
    (here a weight changed after lowering: what a frontend bug would do) is refused, naming the
    output and the values; the graph as lowered passes."""
    from dualgraph.frontends.onnx import check_against_onnxruntime
    model = _dense_model()
    graph = load_onnx(model)
    check_against_onnxruntime(model, graph)
    gemm = next(n for n in graph.nodes if n.op == ("", "Gemm"))
    weight = gemm.inputs[1]
    weight.const = weight.const.clone()
    weight.const[0, 0] = 1.01
    with pytest.raises(DualgraphError, match=r"computes another function than onnxruntime: output 'y' entry 0 is .* "
                                             r"against onnxruntime's .* on a random (uniform|normal) input"):
        check_against_onnxruntime(model, graph)
    for value in (float("inf"), float("nan")):  # non-finite on our side only (a review: both passed)
        weight.const[:, 0] = value
        with pytest.raises(DualgraphError, match="computes another function than onnxruntime"):
            check_against_onnxruntime(model, graph)


@pytest.mark.parametrize("beside", [None, "a large output", "an infinite output"])
def test_load_model_refuses_what_onnxruntime_fuses_into_another_function(monkeypatch, beside):
    """The backstop behind the fusion checks: a written-out layer norm with ``d^4`` that
    onnxruntime runs as its LayerNormalization kernel, with ``check_fusions`` switched off, is
    refused by the comparison on random inputs when it is loaded -- also where the same output
    carries ``1e4 x`` or ``exp(1000 x)`` beside it (the tolerance is per entry: a review found a
    tolerance over the whole output that one large or infinite entry switched off)."""
    from dualgraph.api import load_model
    from dualgraph.frontends import onnx_importer
    monkeypatch.setattr(onnx_importer, "check_fusions", lambda model: None)
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]), helper.make_node("Sub", ["x", "m"], ["d"]),
             helper.make_node("Pow", ["d", "p"], ["q"]), helper.make_node("ReduceMean", ["q"], ["v"], axes=[-1]),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["s"]),
             helper.make_node("Div", ["d", "s"], ["z"]), helper.make_node("Mul", ["z", "g"], ["zg"]),
             helper.make_node("Add", ["zg", "b"], ["ln"])]
    inits = {"p": np.array(4.0, np.float32), "eps": np.array(1e-5, np.float32), "g": np.ones(4, np.float32),
             "b": np.zeros(4, np.float32)}
    if beside is None:
        nodes.append(helper.make_node("Identity", ["ln"], ["y"]))
    else:
        inits["k"] = np.array(1e4 if beside == "a large output" else 1e3, np.float32)
        nodes.append(helper.make_node("Mul", ["x", "k"], ["e0"]))
        nodes.append(helper.make_node("Identity" if beside == "a large output" else "Exp", ["e0"], ["e"]))
        nodes.append(helper.make_node("Concat", ["ln", "e"], ["y"], axis=-1))
    model = make_model(nodes, [("x", ["N", 4])], [("y", ["N", 4 if beside is None else 8])], inits)
    with pytest.raises(DualgraphError, match="computes another function than onnxruntime: output 'y'"):
        load_model(model)


def test_a_model_with_external_data_loads_from_anywhere(tmp_path, monkeypatch):
    """Weights kept in a file beside the model (what large exports write) are read from the
    model's folder, not the working directory (they were not: 'cannot read initializer'); a
    missing data file is a one-line error."""
    from dualgraph.api import load_model
    model = _dense_model()
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    graph = load_model(str(tmp_path / "m.onnx"))
    x = np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32)
    np.testing.assert_allclose(Interpreter(graph).run(torch.from_numpy(x))[0].numpy(), ort_run(_dense_model(), {"x": x})[0],
                               rtol=1e-6, atol=1e-6)
    (tmp_path / "m.data").unlink()
    with pytest.raises(DualgraphError, match="keeps its weights in external data that cannot be read") as info:
        load_model(str(tmp_path / "m.onnx"))
    one_line(info)
