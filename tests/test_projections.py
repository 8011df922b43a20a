"""Random-projection bounds (Section 3.2, Algorithm 1, Theorem 2): statistics and plumbing.

The statistical tests use fixed seeds, so they are deterministic; their tolerances are
several standard deviations of the quantity tested (stated next to each), so that a
correct estimator passes for essentially any seed and a wrong one (a missing factor, a
biased median) fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dualgraph import projections
from dualgraph.api import Certifier, load_model, margin_spec
from dualgraph.errors import DualgraphError
from dualgraph.input_sets import L2Ball, linf_ball
from dualgraph.interpreter import Interpreter
from dualgraph.projections import (CauchyColumns, GaussianColumns, cauchy_unbiased_factor, cauchy_upper_factor,
                                   chi2_quantile, geometric_mean_abs, lower_median_abs, median_abs)
from dualgraph.scheduler import BoundConfig

TRIALS = 20000


def cauchy_samples(trials: int, r: int, seed: int) -> torch.Tensor:
    """``[trials, r]`` standard Cauchy samples from the scheme's own sampler."""
    scheme = CauchyColumns(r, torch.Generator().manual_seed(seed))
    return scheme._draw((trials, r), torch.empty(0, dtype=torch.float64))


# ---- the estimators -----------------------------------------------------------------------

def test_median_abs_is_the_sample_median():
    x = torch.randn(7, 9, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(median_abs(x, 1), x.abs().median(1).values)  # odd r: the middle one
    y = x[:, :8]
    s = y.abs().sort(1).values
    assert torch.allclose(median_abs(y, 1), (s[:, 3] * s[:, 4]).sqrt())  # even r: geometric mean of the middle two
    assert torch.equal(median_abs(torch.zeros(2, 4, 3), 1), torch.zeros(2, 3))


@pytest.mark.parametrize("r", [1, 2, 3, 4, 9, 10, 16, 17, 50])
def test_median_abs_every_r_and_path(r, monkeypatch):
    """The comparator network (small r) and topk/kthvalue (large r) agree with a sort, ties
    (zeros) included, along any dimension; the gradient reaches only the middle entries."""
    x = torch.randn(4, r, 50, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
    x[0, :, :5] = 0.0
    x[1, : r // 2 + 1, 5:9] = 3.0
    s = x.abs().sort(1).values
    want = s[:, r // 2] if r % 2 else (s[:, r // 2 - 1] * s[:, r // 2]).sqrt()
    for network in (16, 0):
        monkeypatch.setattr(projections, "MAX_NETWORK_R", network)
        assert torch.allclose(median_abs(x, 1), want, rtol=0, atol=1e-15)
        assert torch.allclose(median_abs(x.transpose(1, 2), 2), want, rtol=0, atol=1e-15)
        leaf = x.clone().requires_grad_()
        median_abs(leaf, 1).sum().backward()
        assert ((leaf.grad != 0).sum(1) <= 2).all() and leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("r", [1, 2, 3, 4, 9, 10, 16, 17, 50])
def test_lower_median_is_torch_median_every_r_and_path(r, monkeypatch):
    """The training estimator is exactly ``torch.median`` of ``|.|`` (the lower middle one for
    even r, as the paper's code), ties included, on both paths; one entry gets the gradient."""
    x = torch.randn(4, r, 50, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
    x[0, :, :5] = 0.0
    x[1, : r // 2 + 1, 5:9] = -3.0
    want = x.abs().median(1).values
    for network in (16, 0):
        monkeypatch.setattr(projections, "MAX_NETWORK_R", network)
        assert torch.equal(lower_median_abs(x, 1), want)
        assert torch.equal(lower_median_abs(x.transpose(1, 2), 2), want)
        leaf = x.clone().requires_grad_()
        lower_median_abs(leaf, 1).sum().backward()
        assert ((leaf.grad != 0).sum(1) <= 1).all() and leaf.grad.abs().sum() > 0


def test_lower_median_underestimates_by_the_order_statistic_quantile():
    """For even r the lower median of r |Cauchy| samples has median ``tan(pi q / 2)`` with
    ``q`` the median of Beta(r/2, r/2 + 1): below 1 (the training estimator's low bias)."""
    from scipy.stats import beta
    for r in (10, 50):
        est = lower_median_abs(cauchy_samples(TRIALS, r, seed=11 + r), 1)
        q = beta.median(r // 2, r // 2 + 1)
        want = math.tan(math.pi * q / 2)
        assert want < 1
        assert abs(float(est.median()) - want) < 0.02, (r, float(est.median()), want)


def test_cauchy_sampler_is_standard_cauchy():
    c = cauchy_samples(TRIALS, 1, seed=1).flatten()
    # median |C| = 1 and P(|C| < 1) = 1/2; P(|C| < tan(pi q / 2)) = q. Binomial sd <= 0.0036
    for q in (0.25, 0.5, 0.9):
        frac = float((c.abs() < math.tan(math.pi * q / 2)).double().mean())
        assert abs(frac - q) < 0.015, (q, frac)
    assert abs(float((c > 0).double().mean()) - 0.5) < 0.015


@pytest.mark.parametrize("r", [5, 10, 50])
def test_median_estimator_is_median_unbiased(r):
    """Theorem 2's estimator needs no rescaling: P(median_i |d C_i| < d) = 1/2 (exactly, for
    odd r by symmetry of the binomial, for even r because log|C| is symmetric)."""
    d = torch.logspace(-3, 3, TRIALS, dtype=torch.float64)
    est = median_abs(d.unsqueeze(1) * cauchy_samples(TRIALS, r, seed=r), 1)
    frac = float((est < d).double().mean())
    assert abs(frac - 0.5) < 0.015  # 4 binomial sd (0.0035)


def test_median_estimator_error_shrinks_like_one_over_sqrt_r():
    """Asymptotic sd of log(median) is pi / (2 sqrt r) (density of |C| at 1 is 1/pi)."""
    sds = {}
    for r in (25, 401):
        est = median_abs(cauchy_samples(4000, r, seed=7 + r), 1)
        sds[r] = float(est.log().std())
        assert 0.85 < sds[r] / (math.pi / (2 * math.sqrt(r))) < 1.2, (r, sds[r])
    assert sds[401] < sds[25] / 3


def test_geometric_mean_estimator_is_mean_unbiased():
    r = 10
    est = cauchy_unbiased_factor(r) * geometric_mean_abs(cauchy_samples(TRIALS, r, seed=3), 1)
    # relative sd of one estimate: sqrt(cos(pi/2r)^2r / cos(pi/r)^r - 1) = 0.54; of the mean 0.004
    assert abs(float(est.mean()) - 1) < 0.02


@pytest.mark.parametrize("r,delta", [(10, 0.1), (50, 0.1), (50, 0.01)])
def test_high_probability_factor_covers(r, delta):
    """c(r, delta) * geometric mean >= the norm with probability >= 1 - delta (Chernoff bound)."""
    c = cauchy_upper_factor(r, delta)
    fails = float((c * geometric_mean_abs(cauchy_samples(TRIALS, r, seed=11 + r), 1) < 1).double().mean())
    assert fails <= delta
    # the exact CLT level would be about delta; Chernoff is conservative but not absurdly so
    assert fails >= delta / 100 or delta * TRIALS < 300


def test_high_probability_factor_shrinks_with_r():
    fs = [cauchy_upper_factor(r, 0.05) for r in (10, 100, 1000, 100000)]
    assert fs == sorted(fs, reverse=True) and fs[-1] < 1.02
    # large r: log c -> pi sqrt(log(1/delta) / (2 r))
    assert abs(math.log(fs[-1]) / (math.pi * math.sqrt(math.log(20) / 2e5)) - 1) < 0.05


def test_chi2_quantile():
    scipy_stats = pytest.importorskip("scipy.stats")
    for r, q in ((1, 0.05), (10, 0.01), (50, 0.5), (200, 0.001)):
        assert chi2_quantile(r, q) == pytest.approx(scipy_stats.chi2.ppf(q, r), rel=1e-6)


# ---- bounds of networks -------------------------------------------------------------------

def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                         nn.Linear(24, 5)).double()


@pytest.fixture(scope="module")
def net():
    model = small_cnn()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return load_model(model, x), model, x


def certifier(graph, **cfg) -> Certifier:
    if "proj" not in cfg:
        cfg["prune_stable"] = False  # estimates converge to every unit's exact bound
    return Certifier(graph, BoundConfig(**cfg), dtype=torch.float64)


def radii(bounds) -> list[torch.Tensor]:
    return [(b.upper - b.lower) / 2 for b in bounds.values()]


def test_projected_bounds_converge_to_exact(net):
    graph, _, x = net
    s = linf_ball(x, 0.05, (0.0, 1.0))
    exact = radii(certifier(graph).intermediate_bounds(s))
    errs = []
    for r in (11, 201, 4001):
        est = radii(certifier(graph, proj=r, proj_seed=0).intermediate_bounds(s))
        rel = torch.cat([((e - t).abs() / t.clamp(min=1e-12)).flatten() for e, t in zip(est, exact)])
        errs.append(float(rel.median()))
    # median relative error ~ 0.67 * pi / (2 sqrt r): 0.32, 0.074, 0.017 (deeper layers add a little)
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.04


def test_first_layer_estimate_is_the_input_term(net):
    """Before any ReLU the radius is exactly ||W_j * radius||_1: a pure Theorem 2 estimate."""
    graph, _, x = net
    s = linf_ball(x, 0.05)
    exact = radii(certifier(graph).intermediate_bounds(s))[0]
    est = radii(certifier(graph, proj=1001, proj_seed=5).intermediate_bounds(s))[0]
    log_ratio = (est / exact).log().flatten()
    # each unit: sd of log ratio ~ pi / (2 sqrt(1001)) = 0.05; one draw shared by all units
    assert float(log_ratio.abs().max()) < 0.25
    assert abs(float(log_ratio.median())) < 0.05


def test_exact_and_projected_objectives_agree_for_large_r(net):
    graph, _, x = net
    s = linf_ball(x, 0.02, (0.0, 1.0))
    spec = margin_spec(torch.tensor([0, 1, 2]), 5)
    j_exact = certifier(graph).lower_bounds(s, spec)
    j_proj = certifier(graph, proj=4001, proj_seed=1).lower_bounds(s, spec)
    assert torch.allclose(j_proj, j_exact, rtol=0.05, atol=0.05 * float(j_exact.abs().mean()))


def test_l2_gaussian_projection_converges(net):
    graph, _, x = net
    s = L2Ball(x, 0.3)
    exact = radii(certifier(graph).intermediate_bounds(s))
    est = radii(certifier(graph, proj=4001, proj_seed=2).intermediate_bounds(s))
    # first layer: eps ||row||_2 from sqrt(chi2_r / r): relative sd 1/sqrt(2r) = 0.011
    assert torch.allclose(est[0], exact[0], rtol=0.05)
    rel = torch.cat([((e - t).abs() / t).flatten() for e, t in zip(est, exact)])
    assert float(rel.median()) < 0.04


def test_reproducible_fresh_and_batched(net):
    graph, _, x = net
    s = linf_ball(x, 0.05)
    a = certifier(graph, proj=9, proj_seed=3)
    b = certifier(graph, proj=9, proj_seed=3)
    first, again = radii(a.intermediate_bounds(s)), radii(a.intermediate_bounds(s))
    same = radii(b.intermediate_bounds(s))
    assert all(torch.equal(p, q) for p, q in zip(first, same))       # reproducible under a seed
    assert not all(torch.equal(p, q) for p, q in zip(first, again))  # fresh draws on every call
    other = radii(certifier(graph, proj=9, proj_seed=4).intermediate_bounds(s))
    assert not all(torch.equal(p, q) for p, q in zip(first, other))
    # batched: example 0 alone gets the same draws (they are shared by the batch)
    alone = radii(certifier(graph, proj=9, proj_seed=3).intermediate_bounds(linf_ball(x[:1], 0.05)))
    assert all(torch.allclose(p[:1], q, rtol=1e-9) for p, q in zip(first, alone))


def test_gradients_flow_through_the_estimates():
    from dualgraph.training import robust_loss
    model = small_cnn()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    for cfg in (BoundConfig(proj=10, proj_seed=0), BoundConfig(proj=10, proj_seed=0, proj_estimator="lower-median"),
                BoundConfig(proj=11, proj_seed=0, proj_estimator="geometric"),
                BoundConfig(proj=10, proj_seed=0, proj_estimator="geometric", delta=0.05)):
        model.zero_grad()
        loss, _ = robust_loss(model, x, y, 0.1, cfg, clip=(0.0, 1.0))
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert float(p.grad.abs().sum()) > 0, name


def intermediate_values(graph, x: torch.Tensor) -> dict:
    interp = Interpreter(graph)
    env = {graph.inputs[0]: x}
    for node in graph.nodes:
        env.update(zip(node.outputs, interp.run_node(node, env, x)))
    return env


def test_high_probability_bounds_contain_sampled_activations(net):
    """With delta, every intermediate bound is an upper estimate with probability >= 1 - delta:
    sampled points of the ball stay inside, and the final J is below the sampled margins."""
    graph, _, x = net
    s = linf_ball(x, 0.05, (0.0, 1.0))
    cert = certifier(graph, proj=20, proj_seed=0, proj_estimator="geometric", delta=1e-3)
    bounds = cert.intermediate_bounds(s)
    pts = s.sample(200, torch.Generator().manual_seed(0)).flatten(0, 1)
    env = intermediate_values(graph, pts)
    for v, b in bounds.items():
        lo = b.lower.repeat(200, *[1] * (b.lower.dim() - 1))
        up = b.upper.repeat(200, *[1] * (b.upper.dim() - 1))
        assert bool(((env[v] >= lo - 1e-9) & (env[v] <= up + 1e-9)).all()), v.name
    labels = torch.tensor([0, 1, 2])
    j = cert.lower_bounds(s, margin_spec(labels, 5)).repeat(200, 1)
    spec = margin_spec(labels, 5).repeat(200, 1, 1)
    margins = torch.einsum("bmk,bk->bm", spec, env[graph.outputs[0]].flatten(1))
    assert bool((j <= margins + 1e-9).all())
    # and they are looser than the exact bounds on the first layer (an upper estimate of the radius)
    exact = certifier(graph).intermediate_bounds(s)
    first = next(iter(bounds))
    assert bool((bounds[first].upper >= exact[first].upper - 1e-9).all())


def test_config_errors(net):
    graph, _, x = net
    with pytest.raises(DualgraphError, match="geometric"):
        BoundConfig(proj=10, delta=0.1)
    with pytest.raises(DualgraphError, match="forward"):
        BoundConfig(proj=10, direction="backward")
    with pytest.raises(DualgraphError, match="set proj"):
        BoundConfig(delta=0.1)
    with pytest.raises(DualgraphError, match="positive integer"):
        BoundConfig(proj=0)
    with pytest.raises(DualgraphError, match="linear dual layers"):
        certifier(graph, proj=10, relu_relaxation="crown").intermediate_bounds(linf_ball(x, 0.05))
    assert BoundConfig().sound and not BoundConfig(proj=5).sound
    assert BoundConfig(proj=5, proj_estimator="geometric", delta=0.1).probabilistic


def test_maxpool_is_refused_only_before_a_bounded_value():
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    head = [nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32, 6)]
    # a MaxPool feeding a ReLU: its (sign-dependent) dual layer would sit inside the projections
    graph = load_model(nn.Sequential(*head, nn.ReLU(), nn.Linear(6, 3)).double(), x)
    with pytest.raises(DualgraphError, match="MaxPool"):
        certifier(graph, proj=10).intermediate_bounds(linf_ball(x, 0.05))
    # after the last ReLU it only enters the exact final pass: fine
    graph = load_model(nn.Sequential(*head).double(), x)
    cert = certifier(graph, proj=10, proj_seed=0)
    assert torch.isfinite(cert.lower_bounds(linf_ball(x, 0.05), margin_spec(torch.tensor([0, 1]), 6))).all()


def test_gaussian_scheme_needs_l2_and_cauchy_needs_box(net):
    _, _, x = net
    with pytest.raises(DualgraphError, match="L2 ball"):
        GaussianColumns(5).input_columns(linf_ball(x, 0.1), (1, 8, 8))
    with pytest.raises(DualgraphError, match="box"):
        CauchyColumns(5).input_columns(L2Ball(x, 0.1), (1, 8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_projected_bounds(net):
    graph, _, x = net
    s = linf_ball(x.cuda(), 0.05)
    a = Certifier(graph, BoundConfig(proj=16, proj_seed=0), device="cuda", dtype=torch.float64)
    b = Certifier(graph, BoundConfig(proj=16, proj_seed=0), device="cuda", dtype=torch.float64)
    ra, rb = radii(a.intermediate_bounds(s)), radii(b.intermediate_bounds(s))
    assert all(t.is_cuda and torch.isfinite(t).all() for t in ra)
    assert all(torch.equal(p, q) for p, q in zip(ra, rb))


def test_api_marks_projected_results_unsound(net):
    graph, _, x = net
    y = torch.zeros(len(x), dtype=torch.long)
    assert certifier(graph).certify(x, y, 0.01).sound
    assert not certifier(graph, proj=10, proj_seed=0).certify(x, y, 0.01).sound


def test_cli_labels_projected_results_as_estimates(capsys):
    """With --proj the certify output is an estimate: never "certified"/"verified"."""
    import json

    from dualgraph.cli import main
    assert main(["certify", "--limit", "6", "--proj", "10", "--proj-seed", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sound"] is False and data["proj"] == 10 and "estimated_robust_error" in data
    assert not any("certif" in k or "verif" in k for k in data)
    assert main(["certify", "--limit", "6", "--proj", "10", "--delta", "0.01", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["probabilistic"] is True and data["delta"] == 0.01 and data["proj_estimator"] == "geometric"
    assert data["delta_union"] == min(1.0, data["bounded_units"] * 0.01)
    assert main(["certify", "--limit", "6", "--proj", "10"]) == 0
    out = capsys.readouterr()
    assert "estimated robust error" in out.out and "not sound" in out.out
    assert "certif" not in (out.out + out.err).lower() and "verif" not in (out.out + out.err).lower()
    assert main(["certify", "--limit", "6", "--delta", "0.1"]) == 2
    assert "--proj" in capsys.readouterr().err
