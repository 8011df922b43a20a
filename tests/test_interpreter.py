"""The interpreter (eval rules + ONNX frontend) against onnxruntime.

onnxruntime is run independently of the frontend's layout bookkeeping: a model with a
dynamic batch gets the whole batch, any other model one example at a time, reshaped to
the input shape its ONNX file declares.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from dualgraph import Interpreter
from dualgraph.frontends.onnx import load_onnx
from models_zoo import ZOO

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"  # as the shared_dir fixture
SHARED = SHARED_DIR if SHARED_DIR.is_dir() else None
SHARED_MODELS = sorted(SHARED.rglob("*.onnx")) if SHARED else []
BATCHES = (1, 3, 8)


def ort_reference(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    """Run onnxruntime on a batch ``x`` (batch first), one example at a time unless dynamic."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (inp,) = [i for i in session.get_inputs()]
    x = x.astype(np.float32)
    if not isinstance(inp.shape[0], int) and len(inp.shape) == x.ndim:
        return session.run(None, {inp.name: x})[0]
    return np.stack([session.run(None, {inp.name: xi.reshape(inp.shape)})[0] for xi in x])


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    """Max error relative to the output's scale (at least 1)."""
    expected = expected.reshape(actual.shape)
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(actual - expected).max())
    assert err <= rtol * scale, f"max abs error {err:.3g} exceeds {rtol:g} x scale {scale:.3g}"


def check_against_ort(model, batches=BATCHES, low=-1.0, high=1.0, seed=0) -> None:
    graph = load_onnx(model)
    interp = Interpreter(graph)
    rng = np.random.default_rng(seed)
    for batch in batches:
        x = rng.uniform(low, high, size=(batch, *graph.inputs[0].shape[1:])).astype(np.float32)
        expected = ort_reference(model, x)
        got = interp.run(torch.from_numpy(x))[0]
        assert got.dtype == torch.float32 and got.shape[0] == batch
        assert_close(got.numpy(), expected, 1e-5)
        # float64 through the IR: the same function, up to float32 rounding in onnxruntime
        got64 = interp.run(torch.from_numpy(x).double())[0]
        assert got64.dtype == torch.float64
        assert_close(got64.numpy(), expected, 1e-4)


# ---- the shared real-world models ---------------------------------------------------------------
@pytest.mark.parametrize("path", SHARED_MODELS or [None],
                         ids=[p.relative_to(SHARED).as_posix() for p in SHARED_MODELS] or ["no-shared"])
def test_shared_models_match_onnxruntime(path):
    if path is None:
        pytest.skip(f"{SHARED_DIR} is absent: no shared ONNX models to test")
    low = 0.0 if "mnist" in path.name else -1.0  # pixels in [0, 1]; other inputs normalised
    check_against_ort(path, low=low, high=1.0)


def test_shared_models_found():
    if SHARED is None:
        pytest.skip("../shared is absent: no shared ONNX models (paper_models, vnncomp2021) to list")
    names = {p.name for p in SHARED_MODELS}
    assert {"test_nano.onnx", "mnist-net_256x2.onnx", "mnist_small_0_3_stage0.onnx"} <= names


# ---- models exported from the zoo ------------------------------------------------------------------
@pytest.mark.parametrize("opset", [None, 10], ids=["default-opset", "opset10"])
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic-batch", "batch1"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_exports_match_onnxruntime_and_torch(name, dynamic, opset, zoo_onnx):
    entry = ZOO[name]
    path = zoo_onnx(name, dynamic=dynamic, opset=opset)
    check_against_ort(path, low=entry.low, high=entry.high)
    # and the torch module itself, at a batch size the export never saw
    graph = load_onnx(path)
    x = entry.inputs(5)
    with torch.no_grad():
        expected = entry.build()(x).numpy()
    assert_close(Interpreter(graph).run(x)[0].numpy(), expected, 1e-5)


# ---- single ONNX ops, including attributes exporters rarely produce ------------------------------
def node_model(op: str, x_shape, inputs=(), opset: int = 17, n_out: int = 1, batch="N", **attrs):
    """A one-node model: ``op(x, *inputs)``; ``inputs`` are arrays or None (omitted)."""
    names, inits = ["x"], []
    for i, arr in enumerate(inputs):
        if arr is None:
            names.append("")
        else:
            names.append(f"c{i}")
            inits.append(numpy_helper.from_array(np.asarray(arr), f"c{i}"))
    node = helper.make_node(op, names, [f"y{i}" for i in range(n_out)], name=f"the_{op.lower()}", **attrs)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *x_shape])
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(n_out)]
    model = helper.make_model(helper.make_graph([node], "t", [x], outs, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def f32(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def i64(*values):
    return np.array(values, dtype=np.int64)


CASES = {
    "conv_same_upper": ("Conv", (2, 7, 7), [f32(4, 2, 3, 3), f32(4)], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    "conv_same_lower": ("Conv", (2, 7, 7), [f32(3, 2, 4, 4)], {"auto_pad": "SAME_LOWER"}),
    "conv_valid": ("Conv", (2, 7, 6), [f32(3, 2, 3, 2)], {"auto_pad": "VALID", "strides": [2, 1]}),
    "conv_asym_dilated_grouped": ("Conv", (4, 6, 6), [f32(4, 2, 3, 3), f32(4)],
                                  {"pads": [0, 1, 2, 1], "dilations": [2, 1], "group": 2}),
    "conv1d": ("Conv", (3, 10), [f32(2, 3, 3), f32(2)], {"pads": [1, 2], "strides": [2]}),
    "conv3d": ("Conv", (2, 4, 4, 4), [f32(2, 2, 2, 2, 2)], {"pads": [1, 0, 0, 0, 1, 1]}),
    "avgpool_ceil_include": ("AveragePool", (2, 8, 8), [], {"kernel_shape": [3, 3], "strides": [2, 2],
                             "pads": [1, 1, 1, 1], "ceil_mode": 1, "count_include_pad": 1}),
    "avgpool_ceil_exclude": ("AveragePool", (2, 9, 8), [], {"kernel_shape": [3, 2], "strides": [2, 3],
                             "pads": [1, 0, 1, 1], "ceil_mode": 1}),
    # the last ceil_mode window would start in the end padding: dropped, as torch and onnxruntime do
    "avgpool_ceil_drop": ("AveragePool", (1, 5, 5), [], {"kernel_shape": [2, 2], "strides": [2, 2],
                          "pads": [1, 1, 1, 1], "ceil_mode": 1, "count_include_pad": 1}),
    "maxpool_ceil_drop": ("MaxPool", (1, 5, 5), [], {"kernel_shape": [2, 2], "strides": [2, 2],
                          "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    "avgpool_asym": ("AveragePool", (2, 7, 7), [], {"kernel_shape": [2, 2], "strides": [2, 2],
                     "pads": [0, 1, 1, 0]}),
    "avgpool_same": ("AveragePool", (1, 7, 7), [], {"kernel_shape": [3, 3], "strides": [2, 2],
                     "auto_pad": "SAME_UPPER", "count_include_pad": 1}),
    "avgpool1d": ("AveragePool", (2, 9), [], {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),
    "maxpool_dilated_ceil": ("MaxPool", (2, 9, 9), [], {"kernel_shape": [2, 3], "strides": [2, 2],
                             "pads": [1, 0, 0, 1], "dilations": [2, 1], "ceil_mode": 1}),
    "maxpool_same": ("MaxPool", (2, 6, 5), [], {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "global_avg": ("GlobalAveragePool", (3, 4, 5), [], {}),
    "global_max": ("GlobalMaxPool", (3, 4, 5), [], {}),
    "batchnorm_1d": ("BatchNormalization", (3, 5), [f32(3), f32(3, seed=1), f32(3, seed=2),
                     np.abs(f32(3, seed=3)) + 0.5], {"epsilon": 1e-3}),
    "pad_constant_crop": ("Pad", (3, 5), [i64(0, 1, -1, 0, 2, 1), np.float32(0.5)], {}),
    "pad_reflect": ("Pad", (3, 5), [i64(0, 0, 2, 0, 0, 1)], {"mode": "reflect"}),
    "pad_edge": ("Pad", (3, 5), [i64(0, 2, 1, 0, 1, 3)], {"mode": "edge"}),
    "pad_axes": ("Pad", (3, 5), [i64(1, 2), None, i64(-1)], {}, 18),
    "pad_wrap": ("Pad", (3, 5), [i64(0, 0, 2, 0, 0, 3)], {"mode": "wrap"}, 19),
    # onnxruntime crops the negative side first, then wraps around what is left (a review)
    "pad_wrap_mixed": ("Pad", (3, 5), [i64(0, -1, 2, 0, 2, -1)], {"mode": "wrap"}, 19),
    # Resize-10: asymmetric coordinates (opset 11's half_pixel default was taken: a review)
    "resize_opset10_linear": ("Resize", (2, 3), [np.float32([1, 1, 2])], {"mode": "linear"}, 10),
    "resize_opset10_nearest": ("Resize", (1, 5), [np.float32([1, 1, 1.25])], {"mode": "nearest"}, 10),
    "slice_negative_step": ("Slice", (4, 7), [i64(-1), i64(-100), i64(2), i64(-2)], {}),
    "slice_clamped": ("Slice", (4, 7), [i64(1, -5), i64(100, -1), i64(1, -1), i64(2, 1)], {}),
    "split_num_outputs": ("Split", (4, 7), [], {"axis": 2, "num_outputs": 3}, 18, 3),
    "split_sizes": ("Split", (3, 4), [i64(1, 2)], {"axis": 1}, 13, 2),
    "split_attr": ("Split", (3, 4), [], {"axis": -1, "split": [3, 1]}, 11, 2),
    "squeeze_default": ("Squeeze", (1, 3, 1), [], {}),
    "squeeze_axes_input": ("Squeeze", (1, 3, 1), [i64(-1)], {}),
    "unsqueeze": ("Unsqueeze", (3, 2), [i64(-1, 1)], {}),
    "unsqueeze_attr": ("Unsqueeze", (3, 2), [], {"axes": [2]}, 11),
    "transpose": ("Transpose", (2, 3, 4), [], {"perm": [0, 2, 3, 1]}),
    "flatten_axis2": ("Flatten", (1, 4, 3), [], {"axis": 2}),
    "reshape_zero_minus1": ("Reshape", (2, 3, 4), [i64(0, 0, -1)], {}),
    "softmax_axis1": ("Softmax", (3, 4), [], {"axis": 1}),
    "softmax_legacy": ("Softmax", (5,), [], {}, 11),
    "leaky_relu": ("LeakyRelu", (5,), [], {"alpha": 0.2}),
    "sigmoid": ("Sigmoid", (5,), [], {}),
    "tanh": ("Tanh", (5,), [], {}),
    "neg": ("Neg", (5,), [], {}),
    "identity": ("Identity", (5,), [], {}),
    "dropout": ("Dropout", (5,), [], {}),
    "dropout_not_training": ("Dropout", (5,), [np.float32(0.5), np.array(False)], {}),
    "clip_min_only": ("Clip", (5,), [np.float32(-0.2)], {}),
    "clip_max_only": ("Clip", (5,), [None, np.float32(0.3)], {}),
    "clip_attrs": ("Clip", (5,), [], {"min": -0.1, "max": 0.4}, 6),
    "gemm_alpha_beta": ("Gemm", (4,), [f32(4, 3), f32(1, 3)], {"alpha": 0.5, "beta": 2.0}),
    "gemm_transB_no_bias": ("Gemm", (4,), [f32(3, 4)], {"transB": 1}),
    "matmul_const_left": ("MatMul", (3, 4), [f32(2, 3)], {}),
    "matmul_vector_right": ("MatMul", (3, 4), [f32(4)], {}),
    "div_const": ("Div", (2, 3), [np.float32([1.5, -2.0, 4.0])], {}),
    "sub_const_left": ("Sub", (3,), [f32(3)], {}),
    "concat_const": ("Concat", (2, 3), [f32(1, 1, 3)], {"axis": 1}),
    "cast_float": ("Cast", (3,), [], {"to": TensorProto.FLOAT}),
}
CONST_FIRST = {"sub_const_left", "matmul_const_left"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_op_matches_onnxruntime(case):
    op, shape, inputs, attrs, *rest = CASES[case]
    opset = rest[0] if rest else 17
    n_out = rest[1] if len(rest) > 1 else 1
    model = None
    if case in CONST_FIRST:  # op(c, x): swap the operands
        model = node_model(op, shape, inputs, opset=opset, **attrs)
        node = model.graph.node[0]
        node.input[:] = [node.input[1], node.input[0]]
    if model is None:  # a constant Concat operand has one row: valid ONNX for a fixed batch of 1 only
        model = node_model(op, shape, inputs, opset=opset, n_out=n_out,
                           batch=1 if case == "concat_const" else "N", **attrs)
    graph = load_onnx(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = f32(batch, *shape, seed=batch)
        if case == "concat_const":
            expected = [np.concatenate([session.run(None, {"x": xi[None]})[0] for xi in x])]
        else:
            expected = session.run(None, {"x": x})
        got = Interpreter(graph).run(torch.from_numpy(x))
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            if not (case == "squeeze_default" and batch == 1):  # onnxruntime squeezes the batch too
                assert tuple(g.shape) == e.shape
            assert_close(g.numpy(), e, 1e-5)


def test_eval_rules_run_on_meta_tensors():
    """Shape inference evaluates every rule on meta tensors: shapes must come out right."""
    model = node_model("Slice", (4, 7), [i64(-1), i64(-100), i64(2), i64(-2)])
    graph = load_onnx(model)
    assert graph.outputs[0].shape == ("N", 4, 4)
    x = torch.empty(2, 4, 7, device="meta")
    assert Interpreter(graph).run(x)[0].shape == (2, 4, 4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_conv_and_pool_geometry_matches_onnxruntime(data):
    """Random kernels, strides, dilations, asymmetric pads, ceil_mode and count_include_pad."""
    op = data.draw(st.sampled_from(["Conv", "AveragePool", "MaxPool"]), label="op")
    nd = data.draw(st.integers(1, 2), label="spatial rank")
    ints = lambda lo, hi: [data.draw(st.integers(lo, hi)) for _ in range(nd)]  # noqa: E731
    kernel, strides, dilations = ints(1, 3), ints(1, 3), ints(1, 2)
    pads = [data.draw(st.integers(0, k - 1)) for k in kernel * 2]  # pools need pads < kernel
    spatial = [data.draw(st.integers((k - 1) * d + 1, (k - 1) * d + 6)) for k, d in zip(kernel, dilations)]
    attrs = {"kernel_shape": kernel, "strides": strides, "pads": pads, "dilations": dilations}
    inputs = []
    if op == "Conv":
        group = data.draw(st.sampled_from([1, 2]))
        inputs = [f32(4, 4 // group, *kernel), f32(4, seed=1)]
        attrs["group"] = group
    else:
        attrs["ceil_mode"] = int(data.draw(st.booleans()))
        if op == "AveragePool":
            attrs["count_include_pad"] = int(data.draw(st.booleans()))
    model = node_model(op, (4, *spatial), inputs, opset=19, **attrs)
    graph = load_onnx(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = f32(2, 4, *spatial, seed=data.draw(st.integers(0, 99)))
    expected = session.run(None, {"x": x})[0]
    got = Interpreter(graph).run(torch.from_numpy(x))[0].numpy()
    assert got.shape == expected.shape
    assert_close(got, expected, 1e-5)
