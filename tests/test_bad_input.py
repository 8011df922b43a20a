"""Bad input the audit listed: each is a one-line error (exit 2) or an explicit warning."""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch
import torch.nn as nn

from dualgraph.api import load_model
from dualgraph.cli import main
from dualgraph.frontends.onnx import load_onnx
from dualgraph.errors import DualgraphError
from dualgraph.models import HERE as ZOO_DIR


def test_a_model_claiming_a_future_opset_is_refused(tmp_path):
    model = onnx.load(ZOO_DIR / "digits_small.onnx")
    model.opset_import[0].version = 99
    with pytest.raises(DualgraphError, match="claims ONNX opset 99, but opsets 1 to"):
        load_onnx(model)


@pytest.mark.parametrize("flags,needle", [(["--bounds", "--format", "dot"], "--format dot draws the graph"),
                                          (["--bounds", "--dual"], "does not combine with --dual")])
def test_dump_refuses_flags_it_would_ignore(capsys, flags, needle):
    assert main(["dump", "digits-small", "--eps", "0.1", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_a_module_in_training_mode_is_lowered_with_a_warning():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.ReLU()).train()
    with pytest.warns(UserWarning, match=r"training mode \(BatchNorm1d, Dropout would behave differently\)"):
        load_model(net, torch.randn(2, 3))
    assert net.training  # left as it was
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(net.eval(), torch.randn(2, 3))  # no warning in eval mode
