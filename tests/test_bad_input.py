"""Bad input the audit listed: each is a one-line error (exit 2) or an explicit warning."""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch
import torch.nn as nn

from dualgraph.api import Certifier, load_model
from dualgraph.cli import main
from dualgraph.frontends.onnx import load_onnx
from dualgraph.errors import DualgraphError
from dualgraph.models import HERE as ZOO_DIR


def test_a_model_claiming_a_future_opset_is_refused(tmp_path):
    model = onnx.load(ZOO_DIR / "digits_small.onnx")
    model.opset_import[0].version = 99
    with pytest.raises(DualgraphError, match="claims ONNX opset 99, but opsets 1 to"):
        load_onnx(model)


def test_a_model_whose_shapes_do_not_fit_gets_one_line_naming_the_node(tmp_path, capsys):
    """A file whose declared input no longer fits its first layer (the CLI fuzz test found one
    by flipping bytes): the shape inference's failure names the node, not a torch traceback."""
    model = onnx.load(ZOO_DIR / "digits_small.onnx")
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 2  # channels: the first Conv takes 1
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    assert main(["dump", str(path)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shapes do not fit" in err and "node '" in err, err


def test_dump_refuses_flags_it_would_ignore(capsys):
    assert main(["dump", "digits-small", "--eps", "0.1", "--bounds", "--dual"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not combine with --dual" in err and len(err.splitlines()) == 1


def test_dump_bounds_explains_each_certificate(capsys):
    import json
    args = ["dump", "digits-small", "--bounds", "--eps", "0.1", "--dataset", "digits", "--limit", "4"]
    assert main(args) == 0
    text = capsys.readouterr().out
    table = text.split("certificates\n")[1].splitlines()
    assert table[0].split()[:4] == ["#", "label", "predicted", "certified"] and len(table) == 5
    assert main([*args, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    first = report["certificates"][0]
    assert set(first) == {"example", "label", "predicted", "certified", "margins", "min_margin", "most_crossing"}
    assert len(first["margins"]) == 9 and first["certified"] == (first["min_margin"] > 0 and
                                                                 first["label"] == first["predicted"])
    assert main([*args, "--format", "dot"]) == 0
    dot = capsys.readouterr().out
    assert dot.startswith("digraph") and "crossing" in dot and "width" in dot


def test_a_module_in_training_mode_is_lowered_with_a_warning():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.ReLU()).train()
    with pytest.warns(UserWarning, match=r"training mode \(BatchNorm1d, Dropout would behave differently\)"):
        load_model(net, torch.randn(2, 3))
    assert net.training  # left as it was
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(net.eval(), torch.randn(2, 3))  # no warning in eval mode


@pytest.mark.parametrize("net_dtype, bound_dtype, hint", [
    (torch.float32, torch.float32, "compute the bounds in float64"),
    (torch.float32, torch.float64, "the network's own precision cannot be analysed at this size")])
def test_sums_too_long_for_the_rounding_analysis_are_a_one_line_error(net_dtype, bound_dtype, hint):
    """An input of 3x224x224 units in float32: one sum of 150,528 terms is beyond the analysis
    (n u >= 0.005): a user error naming the remedy, where the bounds' precision is the cause."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 224 * 224, 2)).eval().to(net_dtype)
    x = torch.rand(1, 3, 224, 224, dtype=net_dtype)
    cert = Certifier(load_model(model, x), dtype=bound_dtype)
    with pytest.raises(DualgraphError, match=hint):
        cert.lower_bounds(cert.input_set(x.to(bound_dtype), 0.001), torch.eye(2, dtype=bound_dtype)[None])


def test_certify_refuses_what_its_model_would_not_compute_or_read(tmp_path, capsys):
    """Input a review found mishandled (each a clear one-line error now, or honoured):
    a radius past float64 (a traceback), a float32-subnormal or -infinite --std (checked in
    float64, used in float32), --std with the default model (dropped), --mean/--std with a
    cascade (ignored), a dataset without examples (NaN in the report)."""
    import struct

    from dualgraph.api import add_input_normalization
    from dualgraph.input_sets import parse_radius
    with pytest.raises(DualgraphError, match="'1e400' is not a radius"):
        parse_radius("1e400")
    for std in (1e-46, 1e39):
        with pytest.raises(DualgraphError, match="--(mean and --)?std values must be"):
            add_input_normalization(load_model("digits-small", simplify=False), None, [std])

    def certify(*extra):
        code = main(["certify", "--eps", "0.05", "--json", "--no-progress", "--limit", "40", *extra])
        out = capsys.readouterr()
        return code, out.out.strip(), out.err.strip()
    plain, scaled = certify(), certify("--std", "10")
    assert plain[0] == scaled[0] == 0 and plain[1] != scaled[1]  # --std is applied to the default model
    code, _, err = certify("--std", "0")
    assert code != 0 and "--std values must be positive" in err and len(err.splitlines()) == 1

    import json
    (tmp_path / "c.json").write_text(json.dumps({"kind": "cascade", "eps": 0.05, "stages": [str(ZOO_DIR / "digits_small.onnx")]}))
    assert main(["certify", str(tmp_path / "c.json"), "--dataset", "digits", "--std", "10"]) != 0
    err = capsys.readouterr().err.strip()
    assert "not applied to a cascade" in err and len(err.splitlines()) == 1

    def idx(dims, data=b""):
        return bytes((0, 0, 8, len(dims))) + b"".join(struct.pack(">I", d) for d in dims) + data
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx((0, 28, 28)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx((0,)))
    assert main(["certify", "mnist-small-0.1", "--dataset", "mnist", "--data-dir", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert "holds no examples" in err and len(err.splitlines()) == 1
