"""The differentiable robust loss (dualgraph.training): gradients, caching, the reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dualgraph.errors import DualgraphError
from dualgraph.scheduler import BoundConfig
from dualgraph.training import bind_parameters, lower_module, robust_bounds, robust_loss


def model() -> nn.Sequential:
    """The paper's small architecture shrunk to 8x8 inputs (convex_adversarial's kernel 4,
    stride 2, padding 1 geometry, which its transposed convolutions invert exactly)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 8, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 2 * 2, 20), nn.ReLU(), nn.Linear(20, 10)).double()


def data(n: int = 5):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("clip", [None, (0.0, 1.0)])
def test_matches_convex_adversarial(clip):
    """Exact mode: the loss, robust error and every parameter gradient equal the authors' code."""
    ca = pytest.importorskip("convex_adversarial")
    net = model()
    x, y = data()
    loss, err = robust_loss(net, x, y, 0.05, clip=clip)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    ref_loss, ref_err = ca.robust_loss(net, 0.05, x, y, bounded_input=clip is not None)
    ref_grads = torch.autograd.grad(ref_loss, list(net.parameters()))
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-10)
    assert err == pytest.approx(ref_err)
    for (name, _), g, h in zip(net.named_parameters(), grads, ref_grads):
        assert torch.allclose(g, h, rtol=1e-8, atol=1e-12), name


def test_gradient_matches_finite_differences():
    net = model()
    x, y = data()
    params = list(net.parameters())
    loss, _ = robust_loss(net, x, y, 0.05, clip=(0.0, 1.0))
    grads = torch.autograd.grad(loss, params)
    g = torch.Generator().manual_seed(2)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, direction))
    h = 1e-6

    def at(t: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(t * d)
            val = float(robust_loss(net, x, y, 0.05, clip=(0.0, 1.0))[0])
            for p, d in zip(params, direction):
                p.sub_(t * d)
        return val
    numeric = (at(h) - at(-h)) / (2 * h)
    assert numeric == pytest.approx(analytic, rel=1e-5, abs=1e-9)


def test_lowered_once_and_relowered_when_a_parameter_is_replaced():
    net = model()
    x, y = data(3)
    robust_loss(net, x, y, 0.05)
    low = lower_module(net, x)
    robust_loss(net, x, y, 0.05, BoundConfig(proj=5, proj_seed=0))
    assert lower_module(net, x) is low
    net[5].weight = nn.Parameter(net[5].weight.detach().clone())
    low2 = lower_module(net, x)
    assert low2 is not low
    loss, _ = robust_loss(net, x, y, 0.05)
    loss.backward()
    assert net[5].weight.grad is not None


def test_bounds_are_valid_margins():
    """J_j <= logit_y - logit_j at the centre (the ball contains it)."""
    net = model()
    x, y = data()
    with torch.no_grad():
        j = robust_bounds(net, x, y, 0.05)
        logits = net(x)
    others = ~torch.nn.functional.one_hot(y, 10).bool()
    margins = (logits.gather(1, y[:, None]) - logits)[others].view(len(y), 9)
    assert bool((j <= margins + 1e-9).all())


def test_folded_parameter_is_an_error():
    class Folded(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return torch.relu(x @ self.w.t())  # w.t() is folded into a new constant

    from dualgraph.frontends.fx import load_module
    mod = Folded()
    graph = load_module(mod, torch.rand(2, 4))
    with pytest.raises(DualgraphError, match="w"):
        bind_parameters(graph, mod)
    assert bind_parameters(graph, mod, strict=False) == {}


def assert_bounds_are_the_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """At eps 0 the bounds of ``logit_y - logit_j`` are the module's margins themselves (and never
    above them): the lowering follows the module's current parameters."""
    with torch.no_grad():
        J = robust_bounds(model, x, y, 0.0)
        out = model(x)
    others = torch.stack([torch.tensor([j for j in range(out.shape[1]) if j != int(t)]) for t in y])
    margins = out.gather(1, y[:, None]) - out.gather(1, others)
    assert (J <= margins + 1e-5).all() and torch.allclose(J, margins, atol=1e-4)


class TiedWeights(nn.Module):
    """``l1.weight`` used as it is and transposed (an autoencoder's tied decoder)."""

    def __init__(self, transposed_constant: bool):
        super().__init__()
        self.l1, self.out, self.transposed_constant = nn.Linear(6, 6), nn.Linear(6, 3), transposed_constant

    def forward(self, x):
        h = torch.relu(self.l1(x))
        back = torch.nn.functional.linear(h, self.l1.weight.t()) if self.transposed_constant else h @ self.l1.weight
        return self.out(torch.relu(back))


def test_a_constant_computed_from_a_used_parameter_is_refused():
    """``F.linear(h, W.t())`` folds ``W.t()`` into a constant of the lowering's moment; ``W`` is also
    bound directly, so nothing noticed: after optimiser steps the bounds were above the network's
    true margins at eps 0 (a review). Refused now; ``h @ W`` (the op on the activations) trains
    and its bounds stay below the margins."""
    torch.manual_seed(0)
    x, y = torch.rand(8, 6), torch.randint(0, 3, (8,))
    with pytest.raises(DualgraphError, match=r"constants from parameters \(l1.weight\)"):
        robust_loss(TiedWeights(True), x, y, 0.01)
    model = TiedWeights(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        loss, _ = robust_loss(model, x, y, 0.01, clip=(0, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_bounds_are_the_margins(model, x, y)


class SequenceTied(nn.Module):
    """``nn.Linear`` on a ``[B, 2, 3]`` input (its rule transposes the weight) and the same weight
    used directly: the transposed copy was neither bound nor refused (a review: bounds above the
    margins after steps), and a Linear on a sequence alone was refused as unbound."""

    def __init__(self, tied: bool):
        super().__init__()
        self.l1, self.out, self.tied = nn.Linear(3, 3), nn.Linear(6, 2), tied

    def forward(self, x):
        h = torch.relu(self.l1(x))
        if self.tied:
            h = torch.relu(h @ self.l1.weight)
        return self.out(h.flatten(1))


@pytest.mark.parametrize("tied", [False, True])
def test_a_linear_layer_on_sequences_trains_bound_to_its_weight(tied):
    torch.manual_seed(0)
    x, y = torch.rand(8, 2, 3), torch.randint(0, 2, (8,))
    model = SequenceTied(tied)
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    for step in range(10):
        loss, _ = robust_loss(model, x, y, 0.0)
        opt.zero_grad()
        loss.backward()
        if step == 0:  # the gradient reaches the weight (later steps may leave every unit off)
            assert bool(model.l1.weight.grad.abs().sum() > 0)
        opt.step()
    assert_bounds_are_the_margins(model, x, y)


def test_projected_training_step_reduces_the_loss():
    net = model()
    x, y = data(8)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    cfg = BoundConfig(proj=20, proj_seed=0)
    first = None
    for _ in range(8):
        loss, _ = robust_loss(net, x, y, 0.02, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    exact, _ = robust_loss(net, x, y, 0.02)
    assert exact.item() < first


def test_gradient_of_trailing_batchnorm_matches_finite_differences():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.BatchNorm1d(4)).double().eval()
    with torch.no_grad():
        net[3].running_mean.normal_()
        net[3].running_var.uniform_(0.5, 2)
        net[3].weight.normal_()
    x, y = torch.rand(5, 6, dtype=torch.float64), torch.randint(0, 4, (5,))
    loss, _ = robust_loss(net, x, y, 0.05)
    loss.backward()
    w, d, h = net[3].weight, torch.randn(4, dtype=torch.float64), 1e-6
    with torch.no_grad():
        w += h * d
        up = robust_loss(net, x, y, 0.05)[0].item()
        w -= 2 * h * d
        down = robust_loss(net, x, y, 0.05)[0].item()
        w += h * d
    assert (up - down) / (2 * h) == pytest.approx(float((w.grad * d).sum()), rel=1e-5)


class SharedLinear(nn.Module):
    """``c.weight`` is ``b.weight`` (registered under two names): the frontend named the
    constant by one alias and binding looked for the other, refusing a sound model (a review)."""

    def __init__(self):
        super().__init__()
        self.b, self.c, self.out = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)
        self.c.weight = self.b.weight

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.c(x)))))


def test_a_parameter_shared_by_two_modules_is_bound_under_either_name():
    torch.manual_seed(0)
    x, y = torch.rand(8, 3), torch.randint(0, 2, (8,))
    model = SharedLinear()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(5):
        loss, _ = robust_loss(model, x, y, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_bounds_are_the_margins(model, x, y)
