"""One generic checker that every registered dual layer, plugins included, must pass.

The contract (:mod:`dualgraph.dual_registry`): for a node ``y = f(z_1..z_p)``, rows ``lam``
and bounds ``l <= z_i <= u``, ``rule.backward`` returns ``lam_i`` and offsets with

    lam . f(z) >= sum_i lam_i . z_i + lower                       (1)
    lam . f(z) <= sum_i lam_i . z_i + upper   if rule.linear      (2)

for EVERY ``z`` in the bounds. The checker iterates over ``DUAL_RULES`` (after loading the
plugins), builds the small example nodes listed for the op in :data:`EXAMPLES` (a
registered op without examples fails, so a new rule must add some), draws bounds mixing
crossing, stable, degenerate (``l == u``) and very wide intervals, rows shared by the batch
(``b = 1``) or per example, and checks (1) and (2) at random points, box vertices and
special points (0 and the ops' breakpoints clamped into the box), for both ReLU
relaxation settings. Affine rules are also checked to be exact (``(1)`` with equality).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import dualgraph.dual_layers  # noqa: F401  (fills DUAL_RULES)
from dualgraph.dual_registry import (DUAL_RULES, AffineRule, Bounds, DualRule, DualStep, Relaxation,
                                     const_args, dual_rule, eval_node, register_relaxation)
from dualgraph.errors import UnsupportedOpError
from dualgraph.interpreter import EVAL_RULES, infer_shapes, register_eval
from dualgraph.ir import Graph, Node
from dualgraph.plugins import load_plugins
from dualgraph.scheduler import BoundConfig, BoundScheduler
from dualgraph.dual_graph import build_dual


load_plugins()

DTYPE = torch.float64
B = 2            # examples (bounds are per example)
M = 3            # specification rows
CONFIGS = (BoundConfig(relu_relaxation="paper"), BoundConfig(relu_relaxation="crown"))
SPECIAL = (0.0, -0.5, 0.3, 1.0, -1.0, 6.0, 2.0)  # breakpoints of the example ops, clamped into [l, u]


# ---- building example nodes -------------------------------------------------------------------

@dataclass(frozen=True)
class V:
    """A variable input of the given per-example shape."""

    shape: tuple[int, ...]


SAME = object()  # the first variable input again (x + x)


def c(*values, shape=None, dtype=DTYPE) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype)
    return t.reshape(shape) if shape is not None else t


def ints(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def rand_const(*shape, seed=0, positive=False) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return t.abs() + 0.5 if positive else t


def node(op: str, inputs: list, attrs: dict | None = None, n_outputs: int = 1, domain: str = "") -> Callable[[], Node]:
    """A factory for one node ``op(inputs)`` in its own graph, shapes inferred."""
    def make() -> Node:
        g = Graph(f"example_{op}")
        vals = []
        for k, spec in enumerate(inputs):
            if spec is None:
                vals.append(None)
            elif spec is SAME:
                vals.append(vals[0])
            elif isinstance(spec, V):
                vals.append(g.add_input(f"x{k}", spec.shape, DTYPE))
            else:
                vals.append(g.add_const(f"c{k}", spec))
        n = g.add_node((domain, op), vals, attrs, name=f"{op.lower()}_under_test", n_outputs=n_outputs)
        g.outputs = list(n.outputs)
        infer_shapes(g, DTYPE)
        return n
    make.op = (domain, op)
    make.desc = f"{op}({', '.join(_desc(s) for s in inputs)}; {attrs or {}})"
    return make


def _desc(spec) -> str:
    if spec is None:
        return "None"
    if spec is SAME:
        return "same"
    if isinstance(spec, V):
        return f"x{list(spec.shape)}"
    return f"const{list(spec.shape)}"


EXAMPLES: dict[tuple[str, str], list[Callable[[], Node]]] = {}


def example(*factories: Callable[[], Node]) -> None:
    for f in factories:
        EXAMPLES.setdefault(f.op, []).append(f)


# affine ops
example(
    node("Gemm", [V((4,)), rand_const(3, 4, seed=1), rand_const(3, seed=2)], {"transB": 1, "alpha": 0.7, "beta": 1.3}),
    node("Gemm", [V((4,)), rand_const(4, 3, seed=3)]),
    node("Gemm", [V((2,)), rand_const(2, 5, seed=4), rand_const(1, 5, seed=5)], {"beta": -2.0}),
    node("MatMul", [V((4,)), rand_const(4, 3, seed=6)]),
    node("MatMul", [V((2, 4)), rand_const(4, 3, seed=7)]),
    node("Conv", [V((2, 6, 6)), rand_const(3, 2, 3, 3, seed=8), rand_const(3, seed=9)],
         {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    node("Conv", [V((2, 7, 7)), rand_const(2, 2, 2, 2, seed=10)], {"dilations": [2, 2]}),
    node("Conv", [V((4, 5, 5)), rand_const(4, 2, 3, 3, seed=11), rand_const(4, seed=12)],
         {"group": 2, "pads": [1, 1, 1, 1], "strides": [1, 2]}),
    node("Conv", [V((2, 4, 4)), rand_const(2, 1, 2, 2, seed=13)], {"group": 2, "pads": [0, 1, 1, 0]}),
    node("Conv", [V((1, 6, 6)), rand_const(1, 1, 3, 3, seed=14)], {"strides": [2, 2]}),
    node("Conv", [V((1, 5, 5)), rand_const(2, 1, 2, 2, seed=15)], {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    node("Conv", [V((2, 7)), rand_const(3, 2, 3, seed=16), rand_const(3, seed=17)], {"strides": [2], "pads": [1, 1]}),
    node("Add", [V((3,)), rand_const(3, seed=18)]),
    node("Add", [rand_const(1, 3, seed=19), V((2, 3))]),
    node("Add", [V((3,)), V((3,))]),
    node("Add", [V((3,)), SAME]),
    node("Sub", [V((3,)), rand_const(3, seed=20)]),
    node("Sub", [rand_const(3, seed=21), V((3,))]),
    node("Sub", [V((2, 2)), V((2, 2))]),
    node("Mul", [V((3,)), rand_const(3, seed=22)]),
    node("Mul", [rand_const(3, seed=23), V((2, 3))]),
    node("Mul", [V((2, 2)), c(-2.5)]),
    node("Div", [V((3,)), rand_const(3, seed=24, positive=True) * c(1.0, -1.0, 1.0)]),
    node("Div", [V((2, 2)), c(4.0)]),
    node("Neg", [V((2, 2))]),
    node("BatchNormalization", [V((3, 2, 2)), rand_const(3, seed=25), rand_const(3, seed=26), rand_const(3, seed=27),
                                rand_const(3, seed=28, positive=True)], {"epsilon": 1e-3}),
    node("BatchNormalization", [V((3,)), rand_const(3, seed=29), rand_const(3, seed=30), rand_const(3, seed=31),
                                rand_const(3, seed=32, positive=True)]),
    node("AveragePool", [V((2, 5, 5))], {"kernel_shape": [2, 2], "strides": [2, 2]}),
    node("AveragePool", [V((1, 4, 4))], {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}),
    node("AveragePool", [V((1, 4, 4))], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                         "count_include_pad": 1}),
    node("AveragePool", [V((1, 5, 5))], {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    node("AveragePool", [V((2, 6))], {"kernel_shape": [3], "strides": [2]}),
    node("GlobalAveragePool", [V((2, 3, 3))]),
)
# structural ops
example(
    node("Identity", [V((3,))]),
    node("Dropout", [V((2, 3))]),
    node("Dropout", [V((3,)), c(0.5)]),
    node("Flatten", [V((2, 3, 2))], {"axis": 1}),
    node("Reshape", [V((2, 3)), ints(0, 3, 2)]),
    node("Reshape", [V((6,)), ints(0, 2, -1)]),
    node("Transpose", [V((2, 3, 4))], {"perm": [0, 3, 1, 2]}),
    node("Squeeze", [V((1, 3))], {"axes": [1]}),
    node("Squeeze", [V((3, 1)), ints(2)]),
    node("Unsqueeze", [V((3,))], {"axes": [2]}),
    node("Unsqueeze", [V((2, 3)), ints(1)]),
    node("Concat", [V((2,)), V((3,))], {"axis": 1}),
    node("Concat", [V((2, 3)), V((2, 1)), V((2, 2))], {"axis": 2}),
    node("Concat", [V((3,)), rand_const(1, 2, seed=33)], {"axis": 1}),
    node("Concat", [V((2,)), SAME], {"axis": -1}),
    node("Split", [V((5,)), ints(2, 3)], {"axis": 1}, n_outputs=2),
    node("Split", [V((2, 4))], {"axis": 2}, n_outputs=2),
    node("Slice", [V((6,)), ints(1), ints(5), ints(1), ints(2)]),
    node("Slice", [V((3, 5)), ints(0, 4), ints(2, 0), ints(1, 2), ints(1, -1)]),
    node("Slice", [V((4, 3)), ints(-3), ints(100), ints(1)]),
    node("Pad", [V((2, 3, 3)), ints(0, 0, 1, 0, 0, 0, 0, 2)], {"mode": "constant"}),
    node("Pad", [V((2, 3)), ints(0, 1, 1, 0, 0, 2), c(0.5)], {"mode": "constant"}),
    node("Pad", [V((2, 4)), ints(0, 0, 2, 0, 0, 1)], {"mode": "reflect"}),
    node("Pad", [V((2, 3)), ints(0, 1, 1, 0, 1, 1)], {"mode": "edge"}),
)
# activations
example(
    node("Relu", [V((5,))]),
    node("Relu", [V((2, 3, 3))]),
    node("LeakyRelu", [V((5,))]),
    node("LeakyRelu", [V((5,))], {"alpha": 0.2}),
    node("LeakyRelu", [V((2, 3))], {"alpha": 2.0}),
    node("Clip", [V((5,)), c(-0.5), c(1.0)]),
    node("Clip", [V((5,)), c(0.0)]),
    node("Clip", [V((5,)), None, c(0.3)]),
    node("Clip", [V((2, 2)), c(0.0), c(6.0)]),
    node("Sigmoid", [V((6,))]),
    node("Tanh", [V((6,))]),
    node("MaxPool", [V((2, 4, 4))], {"kernel_shape": [2, 2], "strides": [2, 2]}),
    node("MaxPool", [V((1, 4, 4))], {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}),
    node("MaxPool", [V((1, 5, 5))], {"kernel_shape": [2, 2], "strides": [1, 1], "dilations": [2, 2]}),
    node("MaxPool", [V((2, 3, 5))], {"kernel_shape": [2, 3], "strides": [1, 2], "pads": [0, 1, 1, 0]}),
)


# ---- random bounds, rows and points -----------------------------------------------------------

def random_bounds(shape: tuple[int, ...], gen: torch.Generator, mode: str) -> Bounds:
    """Elementwise bounds ``[B, *shape]`` mixing interval kinds (or one kind, per ``mode``)."""
    full = (B, *shape)

    def r(lo, hi):
        return lo + (hi - lo) * torch.rand(full, generator=gen, dtype=DTYPE)

    kinds = {
        "crossing": lambda: (-r(0.05, 3.0), r(0.05, 3.0)),
        "positive": lambda: (lambda l: (l, l + r(0.0, 2.0)))(r(0.0, 2.0)),
        "negative": lambda: (lambda u: (u - r(0.0, 2.0), u))(-r(0.0, 2.0)),
        "degenerate": lambda: (lambda z: (z, z.clone()))(torch.where(r(0, 1) < 0.2, 0.0, r(-2.0, 2.0))),
        "wide": lambda: (-r(10.0, 1e3), r(10.0, 1e3)),
        "far": lambda: (lambda l: (l, l + r(0.0, 5.0)))(r(-40.0, 40.0)),
        "thin": lambda: (lambda l: (l, l + 1e-9))(r(-2.0, 2.0)),
        "touching": lambda: (torch.where(r(0, 1) < 0.5, 0.0, -r(0.0, 2.0)), r(0.0, 2.0)),
    }
    names = list(kinds)
    if mode != "mixed":
        return Bounds(*kinds[mode]())
    choice = torch.randint(len(names), full, generator=gen)
    lo, hi = torch.empty(full, dtype=DTYPE), torch.empty(full, dtype=DTYPE)
    for k, name in enumerate(names):
        l, u = kinds[name]()
        lo, hi = torch.where(choice == k, l, lo), torch.where(choice == k, u, hi)
    return Bounds(lo, hi)


BOUND_MODES = ("mixed", "crossing", "mixed", "degenerate", "wide", "far", "positive", "negative", "mixed", "thin")


def sample_points(b: Bounds, gen: torch.Generator, n: int = 24) -> torch.Tensor:
    """Random points, vertices, and special points of the box: ``[n', B, *shape]``."""
    l, u = b
    t = torch.rand((n, *l.shape), generator=gen, dtype=DTYPE)
    pts = [l + t * (u - l)]
    pick = torch.rand((n, *l.shape), generator=gen, dtype=DTYPE) < 0.5
    pts.append(torch.where(pick, u, l))
    pts += [torch.full_like(l, s).clamp(min=l, max=u).unsqueeze(0) for s in SPECIAL]
    pts += [l.unsqueeze(0), u.unsqueeze(0)]
    return torch.cat(pts)


def dot(lam: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``lam [b, m, *s]`` . ``z [n, B, *s]`` -> ``[n, max(b, B), m]``."""
    return (lam.unsqueeze(0) * z.unsqueeze(2)).flatten(3).sum(-1)


def as_offset(x) -> torch.Tensor:
    """An offset (float or ``[b, m]``) broadcastable against ``[n, B, m]``."""
    if isinstance(x, torch.Tensor):
        assert x.dim() == 2 and x.shape[1] == M and x.shape[0] in (1, B), f"offset of shape {tuple(x.shape)}"
        return x.unsqueeze(0)
    return torch.tensor(float(x), dtype=DTYPE)


# ---- the generic checker -----------------------------------------------------------------------

def check_rule(rule: DualRule, n: Node, config, gen: torch.Generator, mode: str, b_rows: int,
               exact: bool = False) -> None:
    """Inequalities (1) and (2) for one node, one draw of bounds and rows."""
    var_inputs = n.var_inputs
    distinct = list(dict.fromkeys(var_inputs))
    bounds = {v: random_bounds(v.unit_shape, gen, mode) for v in distinct}
    lams = []
    for out in n.outputs:
        lam = torch.randn((b_rows, M, *out.unit_shape), generator=gen, dtype=DTYPE)
        lam = lam * (torch.rand(lam.shape, generator=gen, dtype=DTYPE) < 0.8)   # some exact zeros
        lam[:, 0] = lam[:, 0].abs()                                             # an all >= 0 row
        lam[:, 1] = -lam[:, 1].abs()                                            # an all <= 0 row
        lams.append(lam)
    lam_arg = lams[0] if len(lams) == 1 else lams
    in_bounds = [bounds[v] for v in var_inputs] if rule.needs_bounds else []
    step = rule.backward(n, lam_arg, in_bounds, config)
    assert isinstance(step, DualStep), f"{n.op}: backward must return a DualStep"
    assert len(step.lam_in) == len(var_inputs), f"{n.op}: one lam per variable input expected"

    # points: one draw per distinct variable value, jointly sampled
    pts = {v: sample_points(bounds[v], gen) for v in distinct}
    npts = min(p.shape[0] for p in pts.values())
    pts = {v: p[:npts] for v, p in pts.items()}
    args = const_args(n, lams[0])
    zs = {v: p.reshape(npts * B, *v.unit_shape) for v, p in pts.items()}
    full = [zs[v] if v is not None and not v.is_const else a for v, a in zip(n.inputs, args)]
    with torch.no_grad():
        outs = eval_node(n, full)
    lhs = sum(dot(lam, y.reshape(npts, B, *y.shape[1:])) for lam, y in zip(lams, outs))
    rhs = torch.zeros_like(lhs)
    scale = sum(dot(lam.abs(), y.reshape(npts, B, *y.shape[1:]).abs()) for lam, y in zip(lams, outs)) + 1.0
    for v, li in zip(var_inputs, step.lam_in):
        if li is None:
            continue
        assert li.dim() == 2 + len(v.unit_shape) and tuple(li.shape[1:]) == (M, *v.unit_shape) \
            and li.shape[0] in (1, B), f"{n.op}: lam_in of shape {tuple(li.shape)} for input {v.unit_shape}"
        rhs = rhs + dot(li, pts[v])
        scale = scale + dot(li.abs(), pts[v].abs())
    lower = as_offset(step.lower)
    tol = 1e-9 * (scale + lower.abs())
    what = f"{n.op} ({mode} bounds, rows b={b_rows}, {config.relu_relaxation})"
    gap = rhs + lower - lhs - tol
    assert gap.max() <= 0, f"{what}: inequality (1) violated by {float(gap.max()):.3g}"
    if rule.linear(n, config):
        assert step.upper is not None, f"{what}: a linear rule must return an upper offset"
        upper = as_offset(step.upper)
        gap = lhs - rhs - upper - 1e-9 * (scale + upper.abs())
        assert gap.max() <= 0, f"{what}: inequality (2) violated by {float(gap.max()):.3g}"
    if exact:
        err = (lhs - rhs - lower).abs() - tol
        assert err.max() <= 0, f"{what}: affine rule is not exact (error {float(err.max()):.3g})"


# ---- every bound path through the rule ------------------------------------------------------------

PATH_CONFIGS = (
    BoundConfig(direction="backward"),                                        # patches, pruned
    BoundConfig(direction="backward", patches=False, prune_stable=False),     # dense rows, every unit
    BoundConfig(direction="backward", max_elements=7),                        # small chunks
    BoundConfig(direction="forward"),                                         # Appendix F (linear rules)
    BoundConfig(relu_relaxation="crown"),
)


def embed(make: Callable[[], Node], seed: int) -> Graph:
    """The example node inside a network, so that every bound path runs through its rule:

        x -> per variable slot: Gemm -> Reshape -> Relu -> [the node] -> per output: Relu
          -> Flatten -> Concat -> Gemm -> Relu -> Gemm

    Each output of the node is a bound target (its dual is the first dual step, on patches
    for a Conv); the last hidden layer's bounds and ``J`` are computed through it."""
    template = make()
    gen = torch.Generator().manual_seed(seed)
    g = Graph(f"paths_{template.op_type}")
    x = g.add_input("x", (5,), DTYPE)
    chains: list = []
    for k, v in enumerate(template.inputs):
        if v is None or v.is_const:
            chains.append(None if v is None else g.add_const(f"c{k}", v.const))
            continue
        same = next((chains[j] for j, w in enumerate(template.inputs[:k]) if w is v), None)
        if same is not None:
            chains.append(same)
            continue
        n = v.numel
        w = g.add_const(f"w{k}", torch.randn(n, 5, generator=gen, dtype=DTYPE))
        bias = g.add_const(f"b{k}", torch.randn(n, generator=gen, dtype=DTYPE) * 0.5)
        h = g.add_node("Gemm", [x, w, bias], {"transB": 1}, name=f"in{k}").output
        h = g.add_node("Reshape", [h, g.add_const(f"s{k}", torch.tensor([0, *v.unit_shape]))], name=f"shape{k}").output
        chains.append(g.add_node("Relu", [h], name=f"act{k}").output)
    under = g.add_node(template.op, chains, dict(template.attrs), name="under_test", n_outputs=len(template.outputs))
    flat = []
    for i, out in enumerate(under.outputs):
        r = g.add_node("Relu", [out], name=f"after{i}").output
        flat.append(g.add_node("Flatten", [r], {"axis": 1}, name=f"flat{i}").output)
    h = flat[0] if len(flat) == 1 else g.add_node("Concat", flat, {"axis": 1}, name="cat").output
    infer_shapes(g, DTYPE)
    n = h.numel
    w1 = g.add_const("head_w1", torch.randn(4, n, generator=gen, dtype=DTYPE) / n ** 0.5)
    w2 = g.add_const("head_w2", torch.randn(2, 4, generator=gen, dtype=DTYPE))
    h = g.add_node("Gemm", [h, w1], {"transB": 1}, name="head1").output
    h = g.add_node("Relu", [h], name="head_act").output
    g.outputs = [g.add_node("Gemm", [h, w2], {"transB": 1}, name="head2").output]
    infer_shapes(g, DTYPE)
    return g


def check_paths(make: Callable[[], Node], seed: int = 0) -> None:
    """Intermediate bounds and ``J`` through the node, on every path, below/above sampled values."""
    from dualgraph.forward import forward_supported
    from dualgraph.input_sets import linf_ball
    from dualgraph.interpreter import Interpreter

    graph = embed(make, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    centre = torch.randn(B, 5, generator=gen, dtype=DTYPE)
    box = linf_ball(centre, 0.4)
    pts = torch.cat([box.sample(300, gen), torch.where(torch.rand(100, B, 5, generator=gen) < 0.5, box.hi, box.lo)])
    interp = Interpreter(graph)
    env = {graph.inputs[0]: pts.reshape(-1, 5)}
    for node_ in graph.nodes:
        for v, t in zip(node_.outputs, interp.run_node(node_, env, env[graph.inputs[0]])):
            env[v] = t
    spec = torch.randn(1, 3, 2, generator=gen, dtype=DTYPE)
    reached = (env[graph.outputs[0]].reshape(len(pts), B, 1, 2) * spec).sum(-1).amin(0)
    for config in PATH_CONFIGS:
        if config.direction == "forward" and not forward_supported(graph, graph.nodes, config):
            continue
        sched = BoundScheduler(graph, config)
        what = f"example {make.desc}, {config}"
        bounds = sched.intermediate_bounds(box)
        for v, b in bounds.items():
            val = env[v].reshape(len(pts), B, *v.unit_shape)
            slack = 1e-9 * (1 + val.abs())
            assert (b.lower <= val + slack).all() and (b.upper >= val - slack).all(), \
                f"{what}: sampled value of '{v.name}' outside its bounds"
        J = sched.bound_output(box, spec, bounds)
        assert (J <= reached + 1e-9 * (1 + reached.abs())).all(), f"{what}: J above a sampled value"


def check_op(op, factories=None) -> None:
    """Every example of ``op`` under every bound mode, both configs, shared and per-example rows,
    and inside a network through every bound path."""
    rule = DUAL_RULES[op]
    factories = factories if factories is not None else EXAMPLES.get(op)
    if not factories:
        pytest.fail(f"the dual rule registered for op {'.'.join(filter(None, op))!s} ({type(rule).__name__}) has no "
                    "example node in tests/test_dual_rules.py EXAMPLES; add at least one so the generic "
                    "checker covers it")
    gen = torch.Generator().manual_seed(sum(map(ord, "".join(op))))  # deterministic per op
    modes = BOUND_MODES if rule.needs_bounds else BOUND_MODES[:3]     # affine: bounds only place the points
    for make in factories:
        n = make()
        for config in CONFIGS:
            for k, mode in enumerate(modes):
                b_rows = (1, B)[k % 2]
                try:
                    check_rule(rule, n, config, gen, mode, b_rows, exact=isinstance(rule, AffineRule))
                except AssertionError as exc:
                    raise AssertionError(f"example {make.desc}: {exc}") from None
        if all(v.is_const or v.shape is not None for v in n.inputs if v is not None):
            check_paths(make)


@pytest.mark.parametrize("op", sorted(DUAL_RULES), ids=lambda op: ".".join(filter(None, op)))
def test_registered_rule_satisfies_contract(op):
    check_op(op)


def test_every_example_has_a_rule():
    """The table has no stale entries (an op whose rule was renamed would silently go unchecked)."""
    missing = [op for op in EXAMPLES if op not in DUAL_RULES]
    assert not missing, f"examples for ops without a registered dual rule: {missing}"


# ---- the checker itself catches wrong rules, and plugins are held to it ------------------------

PLUGIN = "tests.dualgraph_plugin"


@pytest.fixture
def plugin_square():
    """A plugin op ``Square`` (eval rule + relaxation) registered for the duration of a test."""
    @register_eval("Square", domain=PLUGIN)
    def _square(n, inputs):
        return inputs[0] * inputs[0]

    def relax(n, b: Bounds, config) -> Relaxation:
        # convex: tangent at the midpoint below, chord above (different slopes: not linear)
        l, u = b
        m = (l + u) / 2
        return Relaxation(2 * m, -m * m, u + l, -u * l)

    register_relaxation("Square", domain=PLUGIN, linear_if=lambda cfg: False)(relax)
    try:
        yield (PLUGIN, "Square"), relax
    finally:
        DUAL_RULES.pop((PLUGIN, "Square"), None)
        EVAL_RULES.pop((PLUGIN, "Square"), None)


def test_plugin_rule_without_example_fails_the_checker(plugin_square):
    op, _ = plugin_square
    assert op in DUAL_RULES
    with pytest.raises(pytest.fail.Exception, match="no example node"):
        check_op(op)


def test_plugin_rule_is_checked(plugin_square):
    op, _ = plugin_square
    check_op(op, [node("Square", [V((4,))], domain=PLUGIN)])


def test_checker_catches_a_wrong_plugin_rule(plugin_square):
    op, relax = plugin_square

    def swapped(n, b, config):  # upper and lower lines exchanged: (1) fails
        r = relax(n, b, config)
        return Relaxation(r.a_up, r.b_up, r.a_lo, r.b_lo)

    register_relaxation("Square", domain=PLUGIN, linear_if=lambda cfg: False)(swapped)
    with pytest.raises(AssertionError, match="inequality \\(1\\) violated"):
        check_op(op, [node("Square", [V((4,))], domain=PLUGIN)])


def test_checker_catches_a_wrong_core_style_rule():
    """A ReLU rule that treats relu(z) as z (lam_in = lam, no offsets) breaks (1) on negative inputs."""
    class IdentityRelu(DualRule):
        needs_bounds = True

        def backward(self, n, lam, bounds, config):
            return DualStep([lam], 0.0, 0.0)

    n = EXAMPLES[("", "Relu")][0]()
    with pytest.raises(AssertionError, match="inequality \\(1\\) violated"):
        for b_rows in (1, B):
            check_rule(IdentityRelu(), n, CONFIGS[0], torch.Generator().manual_seed(0), "negative", b_rows)


def test_unsupported_maxpool_forms_raise():
    rule = DUAL_RULES[("", "MaxPool")]
    for make in (node("MaxPool", [V((1, 5, 5))], {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
                 node("MaxPool", [V((2, 6))], {"kernel_shape": [2], "strides": [2]})):
        n = make()
        b = random_bounds(n.inputs[0].unit_shape, torch.Generator().manual_seed(0), "mixed")
        lam = torch.ones(1, M, *n.output.unit_shape, dtype=DTYPE)
        with pytest.raises(UnsupportedOpError, match="MaxPool"):
            rule.backward(n, lam, [b], CONFIGS[0])


# ---- specific regressions ------------------------------------------------------------------------

def test_leaky_relu_slopes_are_float64():
    """On stable units the LeakyRelu dual layer must be exact: lam_in = alpha * lam (negative side)
    and lam (positive side), to float64 precision, or wide float64 bounds become unsound."""
    n = node("LeakyRelu", [V((4,))], {"alpha": 0.01})()
    l = torch.tensor([[-40.0, -3.0, 1.0, 2.0]], dtype=DTYPE)
    u = torch.tensor([[-30.0, -1.0, 5.0, 3.0]], dtype=DTYPE)
    lam = torch.ones(1, 1, 4, dtype=DTYPE)
    step = DUAL_RULES[("", "LeakyRelu")].backward(n, lam, [Bounds(l, u)], CONFIGS[0])
    want = torch.tensor([[[0.01, 0.01, 1.0, 1.0]]], dtype=DTYPE)
    assert torch.equal(step.lam_in[0], want), step.lam_in[0].tolist()


def test_clip_attribute_form_is_clipped():
    """``Clip`` with ``min``/``max`` attributes (the opset < 11 form that EVAL_RULES evaluates) must be
    dualised as a clip, not as the identity."""
    check_op(("", "Clip"), [node("Clip", [V((5,))], {"min": -0.5, "max": 1.0})])


# ---- ops without a rule ---------------------------------------------------------------------------

@pytest.mark.parametrize("op", [("", "NoSuchOp"), ("my.plugin", "Swish")])
def test_op_without_rule_raises_naming_op_node_and_plugins(op):
    g = Graph("missing")
    x = g.add_input("x", (3,), DTYPE)
    h = g.add_node("Relu", [x], name="first")
    n = g.add_node(op, [h.output], name="the_unknown_node")
    g.outputs = [n.output]
    for call in (lambda: dual_rule(n), lambda: build_dual(g), lambda: BoundScheduler(g)):
        with pytest.raises(UnsupportedOpError) as info:
            call()
        msg = str(info.value)
        assert op[1] in msg and "the_unknown_node" in msg and "plugin" in msg.lower(), msg


@pytest.mark.parametrize("stride,pad,dil,k,in_hw", [((2, 2), (1, 1), (1, 1), 4, (10, 12)), ((1, 1), (0, 0), (1, 1), 3, (7, 7)),
                                                     ((2, 1), (1, 2), (2, 1), 3, (9, 8)), ((3, 3), (0, 0), (1, 1), 2, (9, 9))])
def test_conv_transpose_by_taps_equals_the_library_and_differentiates(stride, pad, dil, k, in_hw):
    """The first-layer transpose (one strided add per filter tap, its own backward) equals
    ``conv_transpose2d`` and passes a finite-difference gradient check in both inputs."""
    from dualgraph.dual_layers import _conv_transpose_by_taps
    g = torch.Generator().manual_seed(sum(in_hw))
    w = torch.randn(3, 2, k, k, dtype=torch.float64, generator=g, requires_grad=True)
    out_hw = [(in_hw[i] + 2 * pad[i] - dil[i] * (k - 1) - 1) // stride[i] + 1 for i in range(2)]
    lam = torch.randn(4, 3, *out_hw, dtype=torch.float64, generator=g, requires_grad=True)
    extra = [in_hw[i] - ((out_hw[i] - 1) * stride[i] - 2 * pad[i] + dil[i] * (k - 1) + 1) for i in range(2)]
    want = torch.nn.functional.conv_transpose2d(lam, w, stride=stride, padding=pad, output_padding=extra, dilation=dil)
    got = _conv_transpose_by_taps(lam, w, stride, pad, dil, in_hw)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: _conv_transpose_by_taps(a, b, stride, pad, dil, in_hw), (lam, w))
