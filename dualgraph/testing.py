"""The op checker, shipped: test an op's rules the way dualgraph tests its own.

``check_op("Relu")`` (or ``dualgraph check-op Relu``; a plugin calls it from its own pytest
with its op's name, ``"com.example.Softplus"``) runs, on every example node of the op's
definition (``definition.example(...)``), in float64:

1. **The relaxation bounds the function** (elementwise relaxations): on random intervals of
   every kind (crossing zero, one-sided, degenerate ``l == u``, very wide, far from zero,
   1e-9 thin), ``a_lo z + b_lo <= f(z) <= a_up z + b_up`` on a dense grid of each interval,
   its ends, random points and the op's special points; slopes equal when declared linear.
2. **The dual-layer contract** (:mod:`dualgraph.dual_registry`): for random rows ``lam``
   (shared by the batch or per example, with all-positive and all-negative rows)
   ``lam . f(z) >= sum_i lam_i . z_i + lower`` at random points, box vertices and special
   points, and ``<= ... + upper`` when the rule declares itself linear; for affine rules with
   *equality* (the dual layer is the adjoint of the evaluation), under both ReLU relaxation
   settings.
3. **Every bound path**: the node inside a small network (affine + ReLU before, ReLU +
   affine after), whose intermediate bounds and final ``J`` under the backward (patches,
   pruned, dense, chunked), forward and CROWN configurations must contain every value
   sampled from the input box.

A failure raises :class:`OpCheckFailure` (an ``AssertionError``, so pytest reports it) naming
the op, the example and the violated inequality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch

from .bound_config import BoundConfig
from .dual_registry import AffineRule, Bounds, DualRule, DualStep, ElementwiseRule, const_args, eval_node
from .errors import DualgraphError
from .forward import forward_supported
from .input_sets import linf_ball
from .interpreter import Interpreter, infer_shapes
from .ir import Graph, Node
from .linalg import between
from .op_registry import OpDefinition, OpExample, RandomConst, VarSpec, find_op
from .scheduler import BoundScheduler

DTYPE = torch.float64
B = 2            # examples (bounds are per example)
M = 3            # specification rows
CONFIGS = (BoundConfig(relu_relaxation="paper"), BoundConfig(relu_relaxation="crown"),
           BoundConfig(relu_relaxation="alpha"))
SPECIAL = (0.0, -0.5, 0.3, 1.0, -1.0, 2.0)  # always sampled when inside [l, u]
BOUND_MODES = ("mixed", "crossing", "mixed", "degenerate", "wide", "far", "positive", "negative", "mixed", "thin")
PATH_CONFIGS = (
    BoundConfig(direction="backward"),                                        # patches, pruned
    BoundConfig(direction="backward", patches=False, prune_stable=False),     # dense rows, every unit
    BoundConfig(direction="backward", max_elements=7),                        # small chunks
    BoundConfig(direction="forward"),                                         # Appendix F (linear rules)
    BoundConfig(relu_relaxation="crown"),
)


class OpCheckFailure(AssertionError):
    """An op's rules violate what they promise (the message says which, where)."""


@dataclass
class OpCheckReport:
    """What :func:`check_op` ran: examples, contract checks, points, bound paths."""

    op: str
    examples: int = 0
    contract_checks: int = 0
    relaxation_points: int = 0
    paths: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.examples} example node(s)", f"{self.contract_checks} contract checks"]
        if self.relaxation_points:
            parts.append(f"{self.relaxation_points} relaxation points")
        parts.append(f"{self.paths} bound-path runs")
        return f"{self.op}: ok ({', '.join(parts)})" + "".join(f"; {n}" for n in self.notes)


# ---- example nodes --------------------------------------------------------------------------------

def example_node(definition: OpDefinition, example: OpExample) -> Node:
    """The example as one node in its own float64 graph, shapes inferred."""
    g = Graph(f"example_{definition.key[1]}")
    values: list = []
    for k, spec in enumerate(example.inputs):
        if spec is None:
            values.append(None)
        elif isinstance(spec, str):  # SAME: the first variable input again
            values.append(next(v for v in values if v is not None and not v.is_const))
        elif isinstance(spec, VarSpec):
            values.append(g.add_input(f"x{k}", spec.shape, DTYPE))
        else:
            tensor = spec.tensor(DTYPE) if isinstance(spec, RandomConst) else torch.as_tensor(spec)
            values.append(g.add_const(f"c{k}", tensor.to(DTYPE) if tensor.is_floating_point() else tensor))
    n = g.add_node(definition.key, values, dict(example.attrs), name=f"{definition.key[1].lower()}_under_test",
                   n_outputs=example.outputs)
    g.outputs = list(n.outputs)
    infer_shapes(g, DTYPE)
    return n


# ---- random bounds, rows and points ----------------------------------------------------------------

def into_domain(t: torch.Tensor, domain: tuple[float, float] | None) -> torch.Tensor:
    """``t`` mapped into the op's ``domain`` by an increasing function (the identity without one):
    interval kinds (degenerate, thin, wide) survive, inside the interval the op is defined on."""
    if domain is None:
        return t
    a, b = domain
    if a > -float("inf") and b < float("inf"):
        return a + (b - a) * torch.sigmoid(t / 4)
    if a > -float("inf"):
        return a + torch.nn.functional.softplus(t)
    if b < float("inf"):
        return b - torch.nn.functional.softplus(-t)
    return t


def random_bounds(shape: tuple[int, ...], gen: torch.Generator, mode: str, batch: int = B,
                  domain: tuple[float, float] | None = None) -> Bounds:
    """Elementwise bounds ``[batch, *shape]`` mixing interval kinds (or one kind, per ``mode``),
    inside ``domain`` when given."""
    if domain is not None:
        l, u = random_bounds(shape, gen, mode, batch)
        return Bounds(into_domain(l, domain), into_domain(u, domain))
    full = (batch, *shape)

    def r(lo, hi):
        return lo + (hi - lo) * torch.rand(full, generator=gen, dtype=DTYPE)

    kinds = {
        "crossing": lambda: (-r(0.05, 3.0), r(0.05, 3.0)),
        "positive": lambda: (lambda l: (l, l + r(0.0, 2.0)))(r(0.0, 2.0)),
        "negative": lambda: (lambda u: (u - r(0.0, 2.0), u))(-r(0.0, 2.0)),
        "degenerate": lambda: (lambda z: (z, z.clone()))(torch.where(r(0, 1) < 0.2, 0.0, r(-2.0, 2.0))),
        "wide": lambda: (-r(10.0, 1e3), r(10.0, 1e3)),
        "far": lambda: (lambda l: (l, l + r(0.0, 5.0)))(r(-40.0, 40.0)),
        # across +-20, where library kernels switch formulas (torch's softplus returns z above 20)
        "switch": lambda: (lambda c: (c - r(0.0, 2.0), c + r(0.0, 2.0)))(20.0 * torch.sign(r(-1.0, 1.0))),
        "thin": lambda: (lambda l: (l, l + 1e-9))(r(-2.0, 2.0)),
        "touching": lambda: (torch.where(r(0, 1) < 0.5, 0.0, -r(0.0, 2.0)), r(0.0, 2.0)),
    }
    if mode != "mixed":
        return Bounds(*kinds[mode]())
    names = list(kinds)
    choice = torch.randint(len(names), full, generator=gen)
    lo, hi = torch.empty(full, dtype=DTYPE), torch.empty(full, dtype=DTYPE)
    for k, name in enumerate(names):
        l, u = kinds[name]()
        lo, hi = torch.where(choice == k, l, lo), torch.where(choice == k, u, hi)
    return Bounds(lo, hi)


def sample_points(b: Bounds, gen: torch.Generator, special: tuple[float, ...], n: int = 24) -> torch.Tensor:
    """Random points, vertices, and special points of the box: ``[n', B, *shape]``."""
    l, u = b
    t = torch.rand((n, *l.shape), generator=gen, dtype=DTYPE)
    pts = [between(l, u, t)]
    pick = torch.rand((n, *l.shape), generator=gen, dtype=DTYPE) < 0.5
    pts.append(torch.where(pick, u, l))
    pts += [torch.full_like(l, s).clamp(min=l, max=u).unsqueeze(0) for s in special]
    pts += [l.unsqueeze(0), u.unsqueeze(0)]
    return torch.cat(pts)


def _dot(lam: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``lam [b, m, *s]`` . ``z [n, B, *s]`` -> ``[n, max(b, B), m]``."""
    return (lam.unsqueeze(0) * z.unsqueeze(2)).flatten(3).sum(-1)


def _as_offset(x, what: str) -> torch.Tensor:
    """An offset (float or ``[b, m]``) broadcastable against ``[n, B, m]``."""
    if isinstance(x, torch.Tensor):
        _require(x.dim() == 2 and x.shape[1] == M and x.shape[0] in (1, B), f"{what}: offset of shape {tuple(x.shape)}")
        return x.unsqueeze(0)
    return torch.tensor(float(x), dtype=DTYPE)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise OpCheckFailure(message)


def _special_points(rule: DualRule, n: Node, example: OpExample) -> tuple[float, ...]:
    kinks = rule.breakpoints(n) or ()
    return tuple(dict.fromkeys((*SPECIAL, *kinks, *example.special_points)))


# ---- 1. the relaxation bounds the function -------------------------------------------------------

def check_relaxation(rule: ElementwiseRule, n: Node, config, gen: torch.Generator, mode: str,
                     special: tuple[float, ...], grid: int = 257, domain: tuple[float, float] | None = None) -> int:
    """``a_lo z + b_lo <= f(z) <= a_up z + b_up`` on a dense grid of each interval; returns points."""
    b = random_bounds(n.var_inputs[0].unit_shape, gen, mode, domain=domain)
    r = rule.relaxation(n, b, config)
    l, u = b
    t = torch.linspace(0.0, 1.0, grid, dtype=DTYPE).view(-1, *([1] * l.dim()))
    z = torch.cat([between(l, u, t), sample_points(b, gen, special)])
    args = const_args(n, l)
    slot = next(i for i, v in enumerate(n.inputs) if v is not None and not v.is_const)
    args[slot] = z.reshape(-1, *l.shape[1:])
    with torch.no_grad():
        fz = eval_node(n, args)[0].view_as(z)

    def value(a, c):
        c = c if torch.is_tensor(c) else torch.tensor(float(c), dtype=DTYPE)
        return a * z + c, (a * z).abs() + c.abs()

    low, low_scale = value(r.a_lo, r.b_lo)
    up, up_scale = value(r.a_up, r.b_up)
    what = f"{mode} bounds, {config.relu_relaxation}"
    checks = [(low - fz - 1e-9 * (1 + fz.abs() + low_scale), "lower"),
              (fz - up - 1e-9 * (1 + fz.abs() + up_scale), "upper")]
    if r.free is not None:  # optimisable lines: the ends and the middle of each free slope's range
        for side, a, b in r.free.lines(r):
            line, scale = value(a, b)
            excess = line - fz if side < 0 else fz - line
            checks.append((excess - 1e-9 * (1 + fz.abs() + scale),
                           f"free {'lower' if side < 0 else 'upper'} (at a slope of its range)"))
    for excess, name in checks:
        excess = torch.nan_to_num(excess, nan=float("inf"))
        if bool((excess > 0).any()):
            k = int(excess.flatten().argmax())
            zl, zu = l.expand_as(z).flatten()[k], u.expand_as(z).flatten()[k]
            raise OpCheckFailure(f"{what}: the {name} line is on the wrong side of f at z = {float(z.flatten()[k]):.6g} "
                                 f"in [{float(zl):.6g}, {float(zu):.6g}] (f = {float(fz.flatten()[k]):.6g}, by "
                                 f"{float(excess.flatten()[k]):.3g})")
    if rule.linear(n, config):
        _require(r.has_equal_slopes(), f"{what}: declared linear but the slopes differ")
    if rule.monotone:  # the claim behind image_bounds: f non-decreasing along every grid
        along = fz[:grid]
        _require(bool((along[1:] >= along[:-1]).all()), f"{what}: declared monotone but f decreases on the grid")
    return z.numel()


# ---- 2. the dual-layer contract ------------------------------------------------------------------

def check_contract(rule: DualRule, n: Node, config, gen: torch.Generator, mode: str, b_rows: int,
                   special: tuple[float, ...], exact: bool = False, domain: tuple[float, float] | None = None) -> None:
    """Inequalities (1) and (2) for one node, one draw of bounds and rows."""
    var_inputs = n.var_inputs
    distinct = list(dict.fromkeys(var_inputs))
    bounds = {v: random_bounds(v.unit_shape, gen, mode, domain=domain) for v in distinct}
    lams = []
    for out in n.outputs:
        lam = torch.randn((b_rows, M, *out.unit_shape), generator=gen, dtype=DTYPE)
        lam = lam * (torch.rand(lam.shape, generator=gen, dtype=DTYPE) < 0.8)   # some exact zeros
        lam[:, 0] = lam[:, 0].abs()                                             # an all >= 0 row
        lam[:, 1] = -lam[:, 1].abs()                                            # an all <= 0 row
        lams.append(lam)
    lam_arg = lams[0] if len(lams) == 1 else lams
    in_bounds = [bounds[v] for v in var_inputs] if rule.bounds_needed(n) else []
    step = rule.backward(n, lam_arg, in_bounds, config)
    what = f"{mode} bounds, rows b={b_rows}, {config.relu_relaxation}"
    _require(isinstance(step, DualStep), f"{what}: backward must return a DualStep")
    _require(len(step.lam_in) == len(var_inputs), f"{what}: one lam per variable input expected")

    pts = {v: sample_points(bounds[v], gen, special) for v in distinct}   # jointly sampled per distinct value
    npts = min(p.shape[0] for p in pts.values())
    pts = {v: p[:npts] for v, p in pts.items()}
    args = const_args(n, lams[0])
    zs = {v: p.reshape(npts * B, *v.unit_shape) for v, p in pts.items()}
    full = [zs[v] if v is not None and not v.is_const else a for v, a in zip(n.inputs, args)]
    with torch.no_grad():
        outs = eval_node(n, full)
    image = rule.image_bounds(n, in_bounds) if in_bounds and rule.has_image_bounds(n) else ()
    for y, b in zip(outs, image):  # the outputs' bounds straight from the inputs'
        y = y.reshape(npts, B, *y.shape[1:])
        _require(bool(((b.lower <= y) & (y <= b.upper)).all()), f"{what}: an output outside its image_bounds")
    lhs = sum(_dot(lam, y.reshape(npts, B, *y.shape[1:])) for lam, y in zip(lams, outs))
    rhs = torch.zeros_like(lhs)
    scale = sum(_dot(lam.abs(), y.reshape(npts, B, *y.shape[1:]).abs()) for lam, y in zip(lams, outs)) + 1.0
    for v, li in zip(var_inputs, step.lam_in):
        if li is None:
            continue
        _require(li.dim() == 2 + len(v.unit_shape) and tuple(li.shape[1:]) == (M, *v.unit_shape)
                 and li.shape[0] in (1, B), f"{what}: lam_in of shape {tuple(li.shape)} for input {v.unit_shape}")
        rhs = rhs + _dot(li, pts[v])
        scale = scale + _dot(li.abs(), pts[v].abs())
    lower = _as_offset(step.lower, what)
    tol = 1e-9 * (scale + lower.abs())
    gap = rhs + lower - lhs - tol
    _require(gap.max() <= 0, f"{what}: inequality (1) violated by {float(gap.max()):.3g}")
    if rule.linear(n, config):
        _require(step.upper is not None, f"{what}: a linear rule must return an upper offset")
        upper = _as_offset(step.upper, what)
        gap = lhs - rhs - upper - 1e-9 * (scale + upper.abs())
        _require(gap.max() <= 0, f"{what}: inequality (2) violated by {float(gap.max()):.3g}")
    if exact:
        err = (lhs - rhs - lower).abs() - tol
        _require(err.max() <= 0, f"{what}: affine rule is not the adjoint of the evaluation "
                                 f"(error {float(err.max()):.3g})")


# ---- 3. every bound path through the rule --------------------------------------------------------

def embed(template: Node, seed: int, domain: tuple[float, float] | None = None, box=None) -> Graph:
    """The example node inside a network, so that every bound path runs through its rule:

        x -> per variable slot: Gemm -> Reshape -> Relu -> [the node] -> per output: Relu
          -> Flatten -> Concat -> Gemm -> Relu -> Gemm

    Each output of the node is a bound target (its dual is the first dual step, on patches
    for a Conv); the last hidden layer's bounds and ``J`` are computed through it. With a
    ``domain`` (and the input ``box``) the node's inputs are affine in ``x`` instead, scaled
    and shifted so that their exact range over the box lies inside the domain."""
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
        weight = torch.randn(v.numel, 5, generator=gen, dtype=DTYPE)
        bias = torch.randn(v.numel, generator=gen, dtype=DTYPE) * 0.5
        if domain is not None:
            weight, bias = _affine_into(weight, bias, box, domain)
        h = g.add_node("Gemm", [x, g.add_const(f"w{k}", weight), g.add_const(f"b{k}", bias)], {"transB": 1},
                       name=f"in{k}").output
        h = g.add_node("Reshape", [h, g.add_const(f"s{k}", torch.tensor([0, *v.unit_shape]))], name=f"shape{k}").output
        chains.append(h if domain is not None else g.add_node("Relu", [h], name=f"act{k}").output)
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


def _affine_into(weight: torch.Tensor, bias: torch.Tensor, box, domain: tuple[float, float]):
    """``W x + b`` rescaled per unit so that its exact range over ``box`` lies inside ``domain``."""
    centre, radius = (box.hi + box.lo) / 2, (box.hi - box.lo) / 2           # [B, 5]
    mid = centre @ weight.T + bias                                          # [B, units]
    spread = radius @ weight.abs().T
    lo, hi = (mid - spread).amin(0), (mid + spread).amax(0)                 # range over every example
    a, b = domain
    if a > -float("inf") and b < float("inf"):                              # into [a + 5%, b - 5%]
        scale = 0.9 * (b - a) / (hi - lo).clamp(min=1e-12)
        return weight * scale[:, None], (bias - lo) * scale + a + 0.05 * (b - a)
    if a > -float("inf"):
        return weight, bias - lo + a + 0.05
    if b < float("inf"):
        return weight, bias - hi + b - 0.05
    return weight, bias


def check_paths(template: Node, seed: int = 0, domain: tuple[float, float] | None = None) -> int:
    """Intermediate bounds and ``J`` through the node, on every path, below/above sampled values;
    returns how many configurations ran."""
    gen = torch.Generator().manual_seed(seed + 1)
    centre = torch.randn(B, 5, generator=gen, dtype=DTYPE)
    box = linf_ball(centre, 0.4)
    graph = embed(template, seed, domain, box)
    pts = torch.cat([box.sample(300, gen), torch.where(torch.rand(100, B, 5, generator=gen) < 0.5, box.hi, box.lo)])
    interp = Interpreter(graph)
    env = {graph.inputs[0]: pts.reshape(-1, 5)}
    for node in graph.nodes:
        for v, t in zip(node.outputs, interp.run_node(node, env, env[graph.inputs[0]])):
            env[v] = t
    spec = torch.randn(1, 3, 2, generator=gen, dtype=DTYPE)
    reached = (env[graph.outputs[0]].reshape(len(pts), B, 1, 2) * spec).sum(-1).amin(0)
    ran = 0
    for config in PATH_CONFIGS:
        if config.direction == "forward" and not forward_supported(graph, graph.nodes, config):
            continue
        sched = BoundScheduler(graph, config)
        bounds = sched.intermediate_bounds(box)
        for v, b in bounds.items():
            val = env[v].reshape(len(pts), B, *v.unit_shape)
            slack = 1e-9 * (1 + val.abs())
            _require(bool((b.lower <= val + slack).all() and (b.upper >= val - slack).all()),
                     f"{config}: a sampled value of '{v.name}' is outside its bounds")
        J = sched.bound_output(box, spec, bounds)
        _require(bool((J <= reached + 1e-9 * (1 + reached.abs())).all()), f"{config}: J above a sampled value")
        ran += 1
    return ran


# ---- the checker ------------------------------------------------------------------------------------

def check_free_slopes(rule: DualRule, n: Node, config, gen: torch.Generator, mode: str,
                      domain: tuple[float, float] | None = None) -> None:
    """A dual layer's steps with its free variables (``free_variables``, optimised with
    ``--relaxation alpha``) at the ends and the middle of their declared ranges, on one draw of
    bounds (:func:`dualgraph.trust.verify_free_slopes`; relaxations' free lines are checked
    with the relaxation)."""
    from .trust import verify_free_slopes
    bounds = [random_bounds(v.unit_shape, gen, mode, domain=domain) for v in n.var_inputs]
    free = rule.free_variables(n, bounds, config)
    if free:
        verify_free_slopes(rule, n, bounds, config, free)


def check_op(op: str | tuple[str, str] | OpDefinition, *, examples: list[OpExample] | None = None,
             seed: int | None = None, paths: bool = True) -> OpCheckReport:
    """Check every rule of one op (see the module docstring); raises :class:`OpCheckFailure`.

    ``op``: ``"Relu"``, ``"com.example.Softplus"``, a ``(domain, op_type)`` key or the
    definition. ``examples`` replaces the definition's own example nodes.
    """
    definition = op if isinstance(op, OpDefinition) else find_op(op if isinstance(op, str) else ".".join(
        filter(None, op)))
    name = definition.name
    report = OpCheckReport(name)
    rule = definition.dual_rule
    examples = list(definition.examples) if examples is None else list(examples)
    if definition.eval_rule is None:
        _require(rule is None, f"op {name} has a dual layer but no evaluation rule; declare one with .evaluate")
        report.notes.append("no evaluation rule (import only): nothing to check")
        return report
    if rule is None:
        report.notes.append("no dual layer: evaluation only")
    if not examples:
        _require(rule is None, f"op {name} ({definition.source}) has a dual layer but no example node; add at least "
                 f"one with .example(var(...), ...) so that the checker covers it")
        return report
    gen = torch.Generator().manual_seed(seed if seed is not None else sum(map(ord, name)))
    for example in examples:
        desc = example.describe(name)
        try:
            n = example_node(definition, example)
            report.examples += 1
            if rule is None:
                continue
            special = _special_points(rule, n, example)
            relaxed = rule.bounds_needed(n)
            modes = BOUND_MODES if relaxed else BOUND_MODES[:3]   # affine: bounds only place points
            for config in CONFIGS:
                for k, mode in enumerate(modes):
                    if isinstance(rule, ElementwiseRule):
                        report.relaxation_points += check_relaxation(rule, n, config, gen, mode, special,
                                                                     domain=example.domain)
                    check_contract(rule, n, config, gen, mode, (1, B)[k % 2], special,
                                   exact=isinstance(rule, AffineRule) and not relaxed, domain=example.domain)
                    report.contract_checks += 1
                    if relaxed and not isinstance(rule, ElementwiseRule):
                        check_free_slopes(rule, n, config, gen, mode, example.domain)
            if paths:
                report.paths += check_paths(n, domain=example.domain)
        except (OpCheckFailure, DualgraphError) as exc:
            raise OpCheckFailure(f"op {name}, example {desc}: {exc}") from None
        except Exception as exc:  # the op's own code failed: that is what the checker is for
            raise OpCheckFailure(f"op {name}, example {desc}: its rules raised {type(exc).__name__}: {exc}") from exc
    return report


def check_all(include_plugins: bool = True) -> list[OpCheckReport]:
    """:func:`check_op` on every defined op (built-ins, and plugins unless told otherwise)."""
    from .op_registry import definitions
    return [check_op(d) for d in definitions() if include_plugins or d.built_in]


__all__ = ["OpCheckFailure", "OpCheckReport", "check_all", "check_contract", "check_op", "check_paths",
           "check_relaxation", "embed", "example_node", "random_bounds", "sample_points"]
