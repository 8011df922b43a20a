"""The paper authors' released MNIST models: our exact bounds certify the same images.

`tests/data/paper_reference.json` holds, for the first 500 MNIST test images, which
images the reference implementation (convex-adversarial 0.4.4, the paper's code; exact
bounds, float32) certifies and its smallest margin bound, for the 3-stage cascade's first
model at eps 0.3 (L∞ ∩ [0,1]) and the Wong & Kolter 2017 model at eps 0.1 (with and
without the pixel box). Same relaxation, so the certified sets must agree image by image
and the margins to float32 tolerance -- without the rounding allowance, which the
reference does not have; with it (the default) certificates are a subset and margins are
lower by at most the allowance. Needs ../shared (models and MNIST).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dualgraph.api import Certifier, load_model, margin_spec
from dualgraph.data import load_mnist
from dualgraph.scheduler import BoundConfig

REFERENCE = json.loads((Path(__file__).parent / "data" / "paper_reference.json").read_text())
CASES = [k for k in REFERENCE if k != "source"]
SLICE = 150  # images per case in the test (the closing note has full-set figures)


@pytest.fixture(scope="module")
def mnist(shared_dir):
    if shared_dir is None or not (shared_dir / "data" / "mnist").exists():
        pytest.skip("../shared/data/mnist not found: the paper-model comparison needs the MNIST test set")
    return load_mnist(shared_dir / "data" / "mnist")


@pytest.mark.parametrize("case", CASES)
def test_certified_set_matches_reference(case, mnist, shared_dir):
    ref = REFERENCE[case]
    path = shared_dir / "paper_models" / f"{ref['model']}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not found: the authors' released models live in ../shared/paper_models")
    graph = load_model(path)
    x, y = mnist.images[:SLICE], mnist.labels[:SLICE]
    clip = (0.0, 1.0) if ref["clip"] else None
    results = {}
    for allowance in (False, True):
        cert = Certifier(graph, BoundConfig(rounding_allowance=allowance))
        batches = [cert.certify(x[i:i + 50], y[i:i + 50], ref["eps"], clip=clip) for i in range(0, SLICE, 50)]
        results[allowance] = (torch.cat([r.certified for r in batches]),
                              torch.cat([r.margins.min(1).values for r in batches]))
    ours, margins = results[False]
    expected = torch.tensor([c == "1" for c in ref["certified"][:SLICE]])
    assert torch.equal(ours, expected), f"images certified differently: {torch.nonzero(ours != expected).flatten().tolist()}"
    ref_min = torch.tensor(ref["min_margin"][:SLICE])
    assert torch.allclose(margins, ref_min, atol=2e-4, rtol=1e-4)
    # the sound default: a subset, margins lower by the allowance (small next to the margins)
    sound, sound_margins = results[True]
    assert not (sound & ~ours).any()
    assert (sound_margins <= margins).all()
    assert (margins - sound_margins).max() < 0.05 * (1 + margins.abs().max())


@pytest.mark.parametrize("relaxation", ["paper", "crown"])
def test_directions_and_patches_agree_on_the_paper_model(mnist, shared_dir, relaxation):
    """Backward with patches, backward dense and forward (Appendix F, the paper relaxation
    only) give the same bounds; pruning stable units (the default) changes no crossing
    unit's bound and no margin. (Compared without the rounding allowance, whose size each
    path bounds its own way.)"""
    path = shared_dir / "paper_models" / "mnist_small_0_3_stage0.onnx"
    if not path.exists():
        pytest.skip(f"{path} not found: the authors' released models live in ../shared/paper_models")
    graph = load_model(path)
    x, y = mnist.images[:3].double(), mnist.labels[:3]
    results, margins = [], []
    raw = dict(rounding_allowance=False, relu_relaxation=relaxation)
    forward = "forward" if relaxation == "paper" else "backward"  # CROWN's dual is not linear
    configs = (BoundConfig(direction="backward", prune_stable=False, **raw),
               BoundConfig(direction="backward", patches=False, prune_stable=False, **raw),
               BoundConfig(direction=forward, **raw),
               BoundConfig(direction="backward", **raw), BoundConfig(direction="backward", patches=False, **raw))
    for cfg in configs:
        cert = Certifier(graph, cfg, dtype=torch.float64)
        input_set = cert.input_set(x, 0.3, clip=(0.0, 1.0))
        results.append(cert.intermediate_bounds(input_set))
        margins.append(cert.lower_bounds(input_set, margin_spec(y, 10).double()))
    exact = results[0]
    for cfg_index, other in enumerate(results[1:], start=1):
        pruned = configs[cfg_index].prune_stable and configs[cfg_index].direction == "backward"
        for v, b in exact.items():
            crossing = (b.lower < 0) & (b.upper > 0)
            same = crossing if pruned else torch.ones_like(crossing)
            assert torch.allclose(b.lower[same], other[v].lower[same], atol=1e-9)
            assert torch.allclose(b.upper[same], other[v].upper[same], atol=1e-9)
            if pruned:
                got_crossing = (other[v].lower < 0) & (other[v].upper > 0)
                assert torch.equal(got_crossing, crossing), v.name
                assert (other[v].lower <= b.lower + 1e-9).all() and (other[v].upper >= b.upper - 1e-9).all()
        assert torch.allclose(margins[cfg_index], margins[0], atol=1e-9)
