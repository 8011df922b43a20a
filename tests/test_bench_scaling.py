"""`dualgraph bench scaling`: the JSON path on a tiny sweep, the worker process, the report."""

from __future__ import annotations

import json

import pytest
import torch

from dualgraph.bench import scaling
from dualgraph.cli import main
from dualgraph.models.architectures import hidden_units, mnist_small


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    import contextlib
    import io
    out = tmp_path_factory.mktemp("bench")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["bench", "scaling", "--quick", "--json", "--sizes", "8,12", "--batch", "4", "--in-process",
                   "--out", str(out)])
    assert rc == 0
    return json.loads(buf.getvalue()), out


def test_json_rows(result):
    data, _ = result
    rows = data["rows"]
    methods = {(r["library"], r["method"], r["r"]) for r in rows}
    assert {("dualgraph", "exact", None), ("dualgraph", "proj", 10), ("dualgraph", "proj", 50)} <= methods
    for r in rows:
        assert r["method"] in ("exact", "proj")
        assert r["status"] == "ok"
        assert isinstance(r["hidden_units"], int) and r["hidden_units"] > 0
        assert r["seconds"] > 0 and r["peak_mb"] >= 0
        assert (r["r"] is None) == (r["method"] == "exact")
    assert any(r["variant"] == "forward" and r["direction"] == "forward" for r in rows)  # Appendix F exact
    assert {f["method"] for f in data["fits"]} == {"exact", "proj"}
    assert all("seconds_exponent" in f for f in data["fits"])
    assert data["machine"]["cores"] >= 1 and "bench scaling" in data["command"]


def test_report_files(result):
    data, out = result
    assert (out / "scaling.png").stat().st_size > 1000
    text = (out / "scaling_report.md").read_text()
    assert "Growth exponents" in text and "hidden units" in text and data["command"] in text
    assert json.loads((out / "scaling.json").read_text())["rows"] == data["rows"]


def test_isolated_worker_measures_in_a_fresh_process():
    row = scaling.run_isolated(scaling.Spec("dualgraph", "proj", 5, "spatial", 8, batch=2, repeats=1), timeout=60)
    assert row["status"] == "ok", row
    assert row["memory"] in ("rss high-water mark", "ru_maxrss (not reset)") and row["peak_mb"] >= 0


def test_models_and_unit_counts():
    x = torch.rand(1, 1, 28, 28)
    for k in (0.25, 1, 2):
        m, shape = scaling.build_model("width", k)
        assert hidden_units(m, torch.rand(1, *shape)) == scaling._units_of("width", k)
    m, _ = scaling.build_model("width", 2)
    assert str(m) == str(mnist_small(2))
    for side in (12, 28):
        m, shape = scaling.build_model("spatial", side)
        assert hidden_units(m, torch.rand(1, *shape)) == scaling._units_of("spatial", side)
    assert hidden_units(mnist_small(1), x) == 4804


def test_fit_and_comparison():
    rows = [{"library": lib, "method": "proj", "r": 10, "hidden_units": u, "seconds": c * u, "peak_mb": u / 10,
             "plain_seconds": 1e-3 * u, "status": "ok"} for lib, c in (("dualgraph", 1.0), ("convex_adversarial", 3.0))
            for u in (1000, 4000, 16000)]
    fits = scaling.fit_exponents(rows)
    assert all(f["seconds_exponent"] == pytest.approx(1.0) for f in fits)
    (comp,) = scaling.compare(rows)
    assert comp["hidden_units"] == 16000 and comp["speedup"] == pytest.approx(3.0)


def test_bench_gpu_runs_on_the_cpu(capsys):
    """The prepared device check (bench gpu) runs end to end on the CPU with tiny settings."""
    from dualgraph.cli import main
    rc = main(["bench", "gpu", "--device", "cpu", "--steps", "1", "--batch-size", "2", "--proj", "3",
               "--certify-batches", "1", "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["what"].split()[1] for r in data["rows"]] == ["mnist-small", "cifar-resnet", "mnist-small"]
    assert all(r["images_per_second"] > 0 for r in data["rows"])


def test_bench_train_reference_fixed_swaps_only_the_objective():
    """``--impls reference-fixed``: the same draws give a lower (tighter) loss with the bounded
    objective, and the released class is restored after every call."""
    pytest.importorskip("convex_adversarial")
    import torch
    from convex_adversarial.dual_inputs import InfBallProjBounded
    from dualgraph.bench.train import reference_loss
    from dualgraph.models.architectures import build_architecture
    released = InfBallProjBounded.objective
    torch.manual_seed(0)
    model = build_architecture("small", (1, 28, 28), 10)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    as_released = float(reference_loss(5, True)(model, x, y, 0.1)[0])
    torch.manual_seed(1)
    fixed = float(reference_loss(5, True, fixed=True)(model, x, y, 0.1)[0])
    assert InfBallProjBounded.objective is released
    assert fixed < as_released
