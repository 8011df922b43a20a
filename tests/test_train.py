"""``dualgraph train``: the schedule, checkpoints and resume, export, cascades, bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch

from dualgraph.cascade import certify_cascade, load_stages, read_manifest, train_cascade
from dualgraph.cli import main
from dualgraph.data import Dataset, split_digits
from dualgraph.errors import DualgraphError
from dualgraph.scheduler import BoundConfig
from dualgraph.train import METRICS, TrainConfig, train


def small_data(n_train: int = 120, n_test: int = 60) -> tuple[Dataset, Dataset]:
    tr, te = split_digits()
    return tr.take(n_train), te.take(n_test)


FAST = dict(model="mlp", eps=0.05, epochs=2, ramp_epochs=1, eval_limit=40, batch_size=40)


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=False)["model"]


def test_schedule_is_the_papers():
    cfg = TrainConfig(eps=0.1, epochs=60, ramp_epochs=20, lr_halve_every=10)
    assert cfg.eps_at(0, 100) == pytest.approx(0.01)
    assert cfg.eps_at(1000, 100) == pytest.approx(0.01 + 0.09 * 0.5)
    assert cfg.eps_at(2000, 100) == cfg.eps_at(5000, 100) == 0.1
    assert [cfg.lr_at(e) for e in (0, 19, 20, 29, 30, 40)] == pytest.approx([1e-3] * 4 + [5e-4, 2.5e-4])
    cifar = TrainConfig(recipe="cifar", eps=2 / 255)
    assert cifar.setting("optimizer") == "sgd" and cifar.setting("lr") == 0.05 and cifar.setting("momentum") == 0.9
    assert cifar.setting("weight_decay") == 5e-4 and cifar.eps_at(0, 10) == pytest.approx(0.001)


@pytest.mark.parametrize("proj", [None, 4], ids=["exact", "projections"])
def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, proj):
    tr, te = small_data()
    whole = TrainConfig(**FAST, proj=proj)
    train(whole, tr, te, tmp_path / "whole", progress=False)
    first = TrainConfig(**{**FAST, "epochs": 1}, proj=proj)  # an epoch does not depend on the total
    train(first, tr, te, tmp_path / "split", progress=False)
    train(whole, tr, te, tmp_path / "split", resume=True, progress=False)
    a, b = weights(tmp_path / "whole" / "checkpoint.pt"), weights(tmp_path / "split" / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = list(csv.DictReader(open(tmp_path / "split" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and list(rows[0]) == list(METRICS)
    assert (tmp_path / "split" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    onnx.checker.check_model(str(tmp_path / "split" / "model.onnx"))


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    """A real kill (SIGKILL after the first checkpoint), then ``--resume``."""
    cmd = [sys.executable, "-m", "dualgraph.cli", "train", "--model", "mlp", "--eps", "0.05", "--epochs", "4",
           "--ramp-epochs", "1", "--limit", "200", "--eval-limit", "30", "--threads", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run(cmd + ["--out", str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    out = subprocess.run(cmd + ["--out", str(tmp_path / "killed"), "--resume"], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    a, b = weights(tmp_path / "whole" / "checkpoint.pt"), weights(ckpt)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cascade_trains_on_what_earlier_stages_leave(tmp_path):
    tr, te = small_data(160, 80)
    cfg = TrainConfig(**FAST)
    path = train_cascade(cfg, 2, tr, te, tmp_path, progress=False)
    manifest = json.loads(path.read_text())
    assert manifest == {"kind": "cascade", "eps": 0.05, "norm": "linf",
                        "stages": ["stage0/model.onnx", "stage1/model.onnx"]}
    files, eps, norm = read_manifest(path)
    assert norm == "linf"
    certs = load_stages(files, BoundConfig())
    report = certify_cascade(certs, ["a", "b"], te, eps, progress=False)
    # an example assigned to stage 1 is not certified by stage 0 against stage 0's prediction
    single = certify_cascade(certs[:1], ["a"], te, eps, progress=False)
    assert torch.equal(report.stage_of == 0, single.stage_of == 0)
    assert report.cumulative_certified[0] == single.cumulative_certified[0] <= report.cumulative_certified[1]
    assert report.robust_error >= report.clean_error - 1e-12 or report.cumulative_certified[-1] < 1


def test_the_released_cascade(shared_dir):
    """The authors' 3-stage cascade at eps 0.3 on the full MNIST test set: without the rounding
    allowance exactly the paper's 33.64% / 33.64% (stages 58.62% -> 87.00% -> 100%); with it
    (the default) no certificate that the raw numbers lack."""
    if shared_dir is None or not (shared_dir / "paper_models" / "mnist_small_0_3_cascade.json").exists():
        pytest.skip("../shared/paper_models and ../shared/data/mnist not found: the released cascade needs them")
    from dualgraph.data import load_mnist
    files, eps, _ = read_manifest(shared_dir / "paper_models" / "mnist_small_0_3_cascade.json")
    data = load_mnist(shared_dir / "data" / "mnist")
    raw = certify_cascade(load_stages(files, BoundConfig(rounding_allowance=False)), [], data, eps, progress=False)
    assert round(100 * raw.robust_error, 2) == 33.64 and round(100 * raw.clean_error, 2) == 33.64
    assert [round(100 * c, 2) for c in raw.cumulative_certified] == [58.62, 87.00, 100.00]


def run_cli(args, capsys, stream: str = "err") -> tuple[int, str]:
    code = main(args)
    return code, getattr(capsys.readouterr(), stream)


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "mnist", "--data-dir", "/nonexistent"], "/nonexistent"),
    (["train", "--model", "resnet50"], "unknown architecture 'resnet50'"),
    (["train", "--eps", "1.5"], "larger than the data range"),
    (["train", "--eps", "-0.1"], "eps must be a finite number >= 0"),
    (["train", "--resume", "--out", "/tmp/dualgraph-no-run-here"], "--resume: no checkpoint"),
    (["train", "--cascade", "0"], "at least 1 stage"),
    (["train", "--device", "gpu"], "--device gpu"),
    (["certify", "/tmp/dualgraph-missing.json", "--dataset", "digits"], "cannot read cascade manifest"),
])
def test_bad_input_is_one_line(args, message, capsys):
    code, err = run_cli(args, capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_manifest_errors(tmp_path, capsys):
    bad = tmp_path / "c.json"
    bad.write_text('{"kind": "cascade", "eps": 0.1, "stages": ["a.onnx"]}')
    code, err = run_cli(["certify", str(bad), "--dataset", "digits"], capsys)
    assert code == 2 and "stage file(s) not found" in err
    bad.write_text("{not json")
    code, err = run_cli(["certify", str(bad), "--dataset", "digits"], capsys)
    assert code == 2 and "not valid JSON" in err
    # stages that disagree on shapes
    from dualgraph.train import export_onnx
    from dualgraph.models.architectures import mlp
    export_onnx(mlp(64, 10), tmp_path / "a.onnx", torch.rand(2, 1, 8, 8))
    export_onnx(mlp(64, 5), tmp_path / "b.onnx", torch.rand(2, 1, 8, 8))
    bad.write_text('{"kind": "cascade", "eps": 0.1, "stages": ["a.onnx", "b.onnx"]}')
    code, err = run_cli(["certify", str(bad), "--dataset", "digits"], capsys)
    assert code == 2 and "same input and output shapes" in err


def test_fewer_epochs_than_the_ramp_is_said():
    """The ramp would never reach the target eps, silently (a review)."""
    with pytest.warns(UserWarning, match="--epochs 1 ends before the eps ramp"):
        TrainConfig(**{**FAST, "epochs": 1, "ramp_epochs": 2})


def test_resume_checks_what_it_resumes(tmp_path):
    """A review's cases: another training set (a traceback, or a silent switch with another
    --limit), a corrupt checkpoint (a traceback), fewer epochs than done (the later model exported
    without comment), and the export of the earlier run left beside a resumed run that stopped."""
    tr, te = small_data()
    train(TrainConfig(**FAST), tr, te, tmp_path / "run", progress=False)
    more = TrainConfig(**{**FAST, "epochs": 3})
    with pytest.raises(DualgraphError, match="trained on 120 examples of .*not these 100"):
        train(more, tr.take(100), te, tmp_path / "run", resume=True, progress=False)
    with pytest.raises(DualgraphError, match="has 2 epochs done; --epochs 1"):
        train(TrainConfig(**{**FAST, "epochs": 1}), tr, te, tmp_path / "run", resume=True, progress=False)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    import dualgraph.train as train_module
    real = train_module.evaluate
    train_module.evaluate = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train(more, tr, te, tmp_path / "run", resume=True, progress=False)
    finally:
        train_module.evaluate = real
    assert not (tmp_path / "run" / "model.onnx").exists()  # the first run's export is not this run's
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DualgraphError, match="is not a dualgraph checkpoint"):
        train(more, tr, te, tmp_path / "run", resume=True, progress=False)


def test_a_finished_cascade_stage_is_resumed_with_its_settings_checked(tmp_path):
    """Resuming a cascade with other settings reused its finished stages without a look (a
    review: cascade.json then named the new eps for models trained at the old one)."""
    tr, te = small_data(160, 80)
    train_cascade(TrainConfig(**FAST), 1, tr, te, tmp_path, progress=False)
    with pytest.raises(DualgraphError, match="was made with eps=0.05, not 0.1"):
        train_cascade(TrainConfig(**{**FAST, "eps": 0.1}), 1, tr, te, tmp_path, resume=True, progress=False)
    path = train_cascade(TrainConfig(**FAST), 1, tr, te, tmp_path, resume=True, progress=False)
    assert read_manifest(path)[1:] == (0.05, "linf")


def test_manifest_fields(tmp_path, capsys):
    """A stage given by an absolute path (a traceback), an eps of true (read as 1), a cascade
    trained for another norm, and --timeout (ignored) with a cascade."""
    from dualgraph.train import export_onnx
    from dualgraph.models.architectures import mlp
    export_onnx(mlp(64, 10), tmp_path / "a.onnx", torch.rand(2, 1, 8, 8))
    manifest = tmp_path / "sub" / "c.json"
    manifest.parent.mkdir()
    manifest.write_text(f'{{"kind": "cascade", "eps": 0.01, "stages": ["{tmp_path / "a.onnx"}"]}}')
    code, out = run_cli(["certify", str(manifest), "--dataset", "digits", "--limit", "5", "--no-progress"], capsys,
                        stream="out")
    assert code == 0 and str(tmp_path / "a.onnx") in out
    for fields, message in [('"eps": true', '"eps" must be a number'),
                            ('"eps": 0.01, "norm": "l2"', "trained for the l2 norm; pass --norm l2")]:
        manifest.write_text(f'{{"kind": "cascade", {fields}, "stages": ["../a.onnx"]}}')
        code, err = run_cli(["certify", str(manifest), "--dataset", "digits"], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
    manifest.write_text('{"kind": "cascade", "eps": 0.01, "stages": ["../a.onnx"]}')
    code, err = run_cli(["certify", str(manifest), "--dataset", "digits", "--timeout", "1"], capsys)
    assert code == 2 and "--timeout is not supported for a cascade" in err


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    code, err = run_cli(["train", "--out", str(tmp_path)], capsys)
    assert code == 2 and "already holds a training run" in err
