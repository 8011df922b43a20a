"""`dualgraph bench resnet`: the networks, their reference conversion, and a tiny run end to end."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from dualgraph.bench import resnet
from dualgraph.cli import main


def test_networks_have_the_intended_sizes():
    assert 11.1e6 < sum(p.numel() for p in resnet.build_net("resnet18").parameters()) < 11.3e6
    assert resnet.residual_blocks(resnet.build_net("paper")) == 4
    assert resnet.residual_blocks(resnet.build_net("resnet8")) == 8
    assert resnet.residual_blocks(resnet.build_net("resnet18")) == 8
    pooled = resnet.build_net("pooled")
    assert resnet.residual_blocks(pooled) == 0 and sum(isinstance(m, torch.nn.MaxPool2d) for m in pooled) == 3
    # the VNN-COMP 2021 CIFAR ResNets: 112,006 and 123,734 parameters (resnet_2b, resnet_4b)
    for name, blocks, parameters in (("resnet2b", 2, 112_006), ("resnet4b", 4, 123_734)):
        model = resnet.build_net(name)
        assert resnet.size_of(model) == {"blocks": blocks, "parameters": parameters}
        assert model(torch.rand(1, *resnet.INPUT_SHAPE)).shape == (1, resnet.CLASSES)
    with pytest.raises(Exception, match="unknown network"):
        resnet.build_net("resnet")


def test_weights_keep_the_activation_scale_through_depth():
    model = resnet.build_net("resnet8")
    x = torch.rand(8, *resnet.INPUT_SHAPE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        after_stem = model[:2](x).square().mean().sqrt()
        after_blocks = model[:10](x).square().mean().sqrt()
    assert 0.5 < float(after_blocks / after_stem) < 2.0


@pytest.mark.parametrize("net", ["resnet1", "resnet4b", "resnet18"])
def test_reference_conversion_computes_the_same_function(net):
    pytest.importorskip("convex_adversarial")
    model = resnet.build_net(net)
    x = torch.rand(2, *resnet.INPUT_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(resnet.reference_model(model)(x), model(x), rtol=1e-4, atol=1e-5)


def test_peer_estimates_take_the_benchmarks_48_and_24_properties():
    row = dict(library="dualgraph", status="ok")
    rows = [dict(row, net="resnet2b", relaxation="crown", eps=2 / 255, seconds_per_example=0.25),
            dict(row, net="resnet2b", relaxation="crown", eps=1 / 255, seconds_per_example=9.0),  # not its radius
            dict(row, net="resnet4b", relaxation="crown", eps=1 / 255, seconds_per_example=1.0),
            dict(row, net="resnet4b", relaxation="crown", eps=2 / 255, seconds_per_example=9.0),  # not its radius
            dict(row, net="resnet4b", relaxation="paper", eps=1 / 255, seconds_per_example=0.5),  # no resnet2b
            dict(row, net="resnet2", relaxation="crown", eps=2 / 255, seconds_per_example=9.0)]
    (estimate,) = resnet.peer_estimates(rows)
    assert estimate["seconds_72"] == 48 * 0.25 + 24 * 1.0
    assert estimate["speedup"] == round(54.3 / 36.0, 2)
    assert resnet.PEER_PROPERTIES == 72
    assert [f["blocks"] for f in resnet.depth_exponents([dict(r, blocks=2) for r in rows])] == []
    assert resnet.depth_series("resnet8") and not resnet.depth_series("resnet4b")


def test_eps_fractions():
    assert resnet.parse_eps("1/255, 0.5") == [1 / 255, 0.5]
    assert resnet.parse_eps("0.5/255") == [0.5 / 255]


@pytest.mark.parametrize("text, problem", [("1/0", "not a radius"), ("x", "not a radius"), ("-1/255", ">= 0")])
def test_bad_eps_is_a_one_line_error(text, problem):
    from dualgraph.errors import DualgraphError
    with pytest.raises(DualgraphError, match=problem):
        resnet.parse_eps(text)


@pytest.fixture(scope="module")
def tiny_run():
    """One block, both relaxations and the reference, one timed run each."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["bench", "resnet", "--nets", "resnet1", "--eps", "1/255", "--repeats", "1", "--json"]) == 0
    return json.loads(buf.getvalue())


def test_tiny_run_reports_every_figure(tiny_run):
    rows = tiny_run["rows"]
    ours = [r for r in rows if r["library"] == "dualgraph"]
    assert {r["relaxation"] for r in ours} == {"paper", "crown"}
    for r in ours:
        assert r["status"] == "ok", r
        assert r["seconds_per_example"] > 0 and r["peak_mb"] is not None and 0 <= r["crossing"] <= 1
        assert r["direction"] in ("forward", "backward")
        assert [p["value"] for p in r["phases"]] and r["final_seconds"] >= 0
        assert 0 < r["gmacs_crossing"] <= r["gmacs_all"] and all(p["row_mmacs"] > 0 for p in r["phases"])
        if r["direction"] == "backward":
            assert all(p["seconds"] is not None for p in r["phases"])
    print(resnet.format_tables(tiny_run))
    print(resnet.format_phases(tiny_run))


def test_tiny_run_beside_the_reference(tiny_run):
    """The reference runs the same network: its exact-arithmetic margins are never below
    dualgraph's sound ones (lower by the rounding allowance, never above)."""
    pytest.importorskip("convex_adversarial")
    rows = {(r["library"], r["relaxation"]): r for r in tiny_run["rows"]}
    ref, ours = rows["convex_adversarial", "paper"], rows["dualgraph", "paper"]
    assert ref["status"] == "ok" and 0 <= ref["crossing"] <= 1, ref
    assert (torch.tensor(ours["margins"]) <= torch.tensor(ref["margins"]) + 1e-4).all()
    (comparison,) = tiny_run["comparison"]
    assert comparison["net"] == "resnet1" and comparison["speedup"] > 0
    assert comparison["dualgraph_lowest_margin"] <= comparison["reference_lowest_margin"] + 1e-4
    text = resnet.report_markdown(tiny_run)
    assert "relaxation `paper`" in text and "relaxation `crown`" in text and tiny_run["command"] in text


def test_row_multiply_counts_follow_the_windows():
    """``DirectionCost.row_macs`` (the benchmark's multiply-add figures), counted by hand on
    conv(3 -> 4) - ReLU - conv(4 -> 5), 3x3 with padding on 8x8: a row from a unit of the
    second conv's output is a 1-pixel window there (its transpose: 5 * 4 * 9 = 180, one
    application per target channel, as the rows run), a 3x3 window at the ReLU (4 * 9 = 36)
    and through the first conv's transpose (4 * 3 * 9 * 9 = 972)."""
    from torch import nn
    from dualgraph.api import Certifier, load_model
    from dualgraph.scheduler import BoundConfig
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(320, 10))
    sched = Certifier(load_model(model, torch.rand(1, 3, 8, 8)), BoundConfig()).scheduler
    first, second = sched.bound_targets
    assert sched.direction.row_macs(first) == 4 * 3 * 9
    assert sched.direction.row_macs(second) == 5 * 4 * 9 + 4 * 9 + 4 * 3 * 9 * 9
    assert sched.direction.operation_counts[1] == 256 * 108 + 320 * 1188
