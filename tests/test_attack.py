"""Tests of the PGD counterexample search on models whose answer is known analytically."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dualgraph.attack import pgd_attack, unsafe_margin
from dualgraph.errors import DualgraphError


def inside(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> bool:
    return bool(((x >= lo) & (x <= hi)).all())


def linear(W: torch.Tensor, b: torch.Tensor):
    return lambda x: x.flatten(1) @ W.T + b


def box_min(W, b, lo, hi, c, d) -> float:
    """Exact ``min over [lo, hi] of c^T (W x + b) - d``: each coordinate at the end its sign picks."""
    a = W.T @ c
    return float(c @ b - d + torch.minimum(a * lo, a * hi).sum())


def test_finds_the_only_counterexample_in_a_corner() -> None:
    n = 8
    lo, hi = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    f = linear(torch.ones(1, n, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    unsafe = [(torch.tensor([[-1.0]]), torch.tensor([-(n - 0.05)]))]  # sum(x) >= n - 0.05: near x = 1
    res = pgd_attack(f, lo, hi, unsafe)
    assert res.found.tolist() == [True] and res.margin.item() <= 0
    assert res.x.shape == (1, n) and res.x.dtype == torch.float64 and inside(res.x, lo, hi)
    assert f(res.x).item() >= n - 0.05 and torch.equal(res.y, f(res.x))


def test_reports_not_found_when_the_property_holds() -> None:
    W = torch.tensor([[1.0, -2.0], [0.5, 0.5]], dtype=torch.float64)
    b = torch.tensor([10.0, 10.0], dtype=torch.float64)
    lo, hi = -torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    unsafe = [(torch.tensor([[1.0, 0.0]]), torch.tensor([0.0])), (torch.tensor([[0.0, 1.0]]), torch.tensor([0.0]))]
    res = pgd_attack(linear(W, b), lo, hi, unsafe, steps=50, restarts=3)
    exact = min(box_min(W, b, lo, hi, C[0].double(), float(d[0])) for C, d in unsafe)  # 7.0: y_0 >= 10 - 3
    assert res.found.tolist() == [False] and res.iterations == 50
    assert exact == 7.0 and res.margin.item() >= exact and res.margin.item() == pytest.approx(exact)
    assert inside(res.x, lo, hi)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3))
def test_linear_models_against_the_exact_answer(seed: int, n_conj: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n_in, n_out = 5, 3
    W, b = torch.randn(n_out, n_in, generator=g, dtype=torch.float64), torch.randn(n_out, generator=g, dtype=torch.float64)
    lo = torch.randn(n_in, generator=g, dtype=torch.float64)
    hi = lo + torch.rand(n_in, generator=g, dtype=torch.float64)
    unsafe = [(torch.randn(1, n_out, generator=g, dtype=torch.float64), torch.randn(1, generator=g, dtype=torch.float64)) for _ in range(n_conj)]
    exact = min(box_min(W, b, lo, hi, C[0], float(d[0])) for C, d in unsafe)
    res = pgd_attack(linear(W, b), lo, hi, unsafe, steps=60, restarts=3, seed=seed)
    # Always: a real point of the box whose reported margin is its true loss (so >= the minimum).
    assert inside(res.x, lo, hi)
    assert res.margin.item() == pytest.approx(unsafe_margin(linear(W, b)(res.x), unsafe).item(), abs=1e-12)
    assert res.margin.item() >= exact - 1e-9
    assert not (res.found.item() and exact > 0)
    if n_conj == 1:  # one half-space: sign-gradient descent on a linear loss reaches the exact minimum
        assume(abs(exact) > 1e-6)
        assert res.found.item() == (exact < 0)
        if exact > 0:  # no early stop: all steps run and end in the minimising corner
            assert res.margin.item() == pytest.approx(exact, abs=1e-9)


def test_random_restarts_escape_a_flat_start() -> None:
    # |x| via ReLUs has zero gradient at the centre 0: only the random starts can move.
    f = lambda x: torch.relu(x) + torch.relu(-x)  # noqa: E731
    lo, hi = -torch.ones(1), torch.ones(1)
    unsafe = [(torch.tensor([[-1.0]]), torch.tensor([-0.9]))]  # |x| >= 0.9
    assert not pgd_attack(f, lo, hi, unsafe, restarts=1).found.item()
    res = pgd_attack(f, lo, hi, unsafe, restarts=4)
    assert res.found.item() and res.x.abs().item() >= 0.9 and inside(res.x, lo, hi)


def test_given_starts_replace_the_centre_and_random_ones() -> None:
    # f(x) = x on [-1, 1]: unsafe x >= 0.5. From -1 with steps of 0.25 the descent needs 6 steps.
    f = lambda x: x.flatten(1) * 1.0  # noqa: E731
    lo, hi = -torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    unsafe = [(torch.tensor([[-1.0]], dtype=torch.float64), torch.tensor([-0.5], dtype=torch.float64))]
    far = torch.tensor([[-1.0], [-0.9]], dtype=torch.float64)
    still = pgd_attack(f, lo, hi, unsafe, steps=0, starts=far)
    assert not still.found.item() and still.x.item() == -0.9  # the better start, not the centre
    assert not pgd_attack(f, lo, hi, unsafe, steps=5, step_size=0.25, starts=far[:1]).found.item()
    res = pgd_attack(f, lo, hi, unsafe, steps=6, step_size=0.25, starts=far[:1])
    assert res.found.item() and res.x.item() == 0.5


def test_batched_robustness_spec_with_per_example_rows() -> None:
    # 3 classes, f(x) = x for x in R^3: class j wins iff x_j is largest.
    f = lambda x: x.flatten(1) * 1.0  # noqa: E731
    centre = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    eps = torch.tensor([0.2, 0.6, 0.2])[:, None]  # only example 1's ball reaches the boundary
    labels = [0, 1, 2]
    unsafe = []
    for m in range(2):  # conjunction m: the m-th wrong class of each example scores >= its label
        C = torch.zeros(3, 1, 3)
        for i, y in enumerate(labels):
            j = [k for k in range(3) if k != y][m]
            C[i, 0, j], C[i, 0, y] = -1.0, 1.0  # y_label - y_j <= 0
        unsafe.append((C, torch.zeros(3, 1)))
    lo, hi = centre - eps, centre + eps
    res = pgd_attack(f, lo, hi, unsafe, batched=True, steps=40)
    assert res.found.tolist() == [False, True, False]
    assert res.x.shape == (3, 3) and res.margin.shape == (3,) and inside(res.x, lo, hi)
    assert res.margin[0].item() == pytest.approx(0.6) and res.margin[2].item() == pytest.approx(0.6)
    winner = res.x[1].argmax().item()
    assert winner != 1 or res.x[1].max() == res.x[1][[0, 2]].max()  # a tie counts (non-strict)
    # A shared spec (2-D C) broadcasts over the batch.
    shared = pgd_attack(f, lo, hi, [(torch.tensor([[0.0, 0.0, -1.0]]), torch.tensor([-1.1]))], batched=True)
    assert shared.found.tolist() == [False, False, True]


def test_time_limit_and_early_stop() -> None:
    calls = []

    def f(x):
        calls.append(len(x))
        return x.flatten(1)[:, :1] * 1.0

    lo, hi = torch.zeros(4), torch.ones(4)
    res = pgd_attack(f, lo, hi, [(torch.tensor([[1.0]]), torch.tensor([-5.0]))], time_limit=0.0, restarts=7)
    assert res.iterations == 0 and calls == [7] and inside(res.x, lo, hi) and not res.found.item()
    calls.clear()  # y_0 <= 10 holds at the start: stop at once
    res = pgd_attack(f, lo, hi, [(torch.tensor([[1.0]]), torch.tensor([10.0]))])
    assert res.found.item() and res.iterations == 0 and calls == [5]


def test_empty_sets_and_no_grad_context_and_model_untouched() -> None:
    lin = torch.nn.Linear(3, 2)
    lo, hi = torch.zeros(3), torch.ones(3)
    with torch.no_grad():
        everything = pgd_attack(lin, lo, hi, [(torch.zeros(0, 2), torch.zeros(0))])
        nothing = pgd_attack(lin, lo, hi, [], steps=5)
        res = pgd_attack(lin, lo, hi, [(torch.tensor([[1.0, -1.0]]), torch.tensor([-100.0]))], steps=5)
    assert everything.found.item() and everything.margin.item() == -torch.inf
    assert not nothing.found.item() and nothing.margin.item() == torch.inf and inside(nothing.x, lo, hi)
    assert not res.found.item() and res.iterations == 5 and lin.weight.grad is None
    assert res.x.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lo=torch.zeros(2), hi=torch.ones(3)), "differ in shape"),
        (dict(lo=torch.ones(2), hi=torch.zeros(2)), "lo <= hi"),
        (dict(lo=torch.zeros(2), hi=torch.full((2,), torch.inf)), "finite"),
        (dict(unsafe=[(torch.ones(1, 5), torch.zeros(1))]), "over 5 outputs but the function has 2"),
        (dict(unsafe=[(torch.ones(1, 2), torch.zeros(2))]), "expected C \\[k, n_out\\] and d \\[k\\]"),
        (dict(steps=-1), "steps >= 0"),
        (dict(schedule=()), "non-empty list of positive step fractions"),
        (dict(schedule=(0.5, 0.0)), "non-empty list of positive step fractions"),
    ],
)
def test_errors(kwargs, message: str) -> None:
    args = dict(f=lambda x: x * 1.0, lo=torch.zeros(2), hi=torch.ones(2), unsafe=[(torch.ones(1, 2), torch.zeros(1))])
    args.update(kwargs)
    with pytest.raises(DualgraphError, match=message):
        pgd_attack(**args)


def test_rejects_wrong_output_shape() -> None:
    with pytest.raises(DualgraphError, match="returned shape"):
        pgd_attack(lambda x: x.sum(), torch.zeros(2), torch.ones(2), [(torch.ones(1, 1), torch.zeros(1))])


def test_targeted_restarts_reach_a_conjunction_the_union_gradient_never_follows() -> None:
    """Two conjunctions: A (``y0 <= 0``, never reachable: ``y0 >= 0.1``) is the nearer one
    almost everywhere, so descending on ``min(mA, mB)`` follows A's gradient into its floor;
    with targeted restarts half of them descend on B (``y1 = 1 - 2 mean(x)``), which every
    corner with ``mean(x) > 1/2`` violates. A decaying schedule gets there too."""
    d = 50

    def f(x):
        return torch.stack([0.1 + 0.05 * (x ** 2).mean(-1), 1 - 2 * x.mean(-1)], -1)
    lo, hi = -torch.ones(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)
    unsafe = [(torch.tensor([[1.0, 0.0]]), torch.zeros(1)), (torch.tensor([[0.0, 1.0]]), torch.zeros(1))]
    assert not pgd_attack(f, lo, hi, unsafe, restarts=4, steps=50).found.item()
    for kw in (dict(), dict(schedule=(0.5, 0.1, 0.02))):
        res = pgd_attack(f, lo, hi, unsafe, restarts=4, steps=50, targeted=True, **kw)
        assert res.found.item() and float(f(res.x)[0, 1]) <= 0, kw
