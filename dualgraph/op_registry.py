"""One definition per op: its evaluation, dual layer, ONNX import and torch.fx lowering, together.

Everything dualgraph knows about an op is declared on one :class:`OpDefinition`, on
consecutive lines of one module per op family (the built-ins live in :mod:`dualgraph.ops`;
a plugin's in its own package, through exactly the same API)::

    softplus = define_op("Softplus", domain="com.example")

    @softplus.evaluate                              # ONNX semantics, runs on meta tensors too
    def _(node, inputs):
        return torch.nn.functional.softplus(inputs[0])

    @softplus.relaxation(linear_if=lambda config: True)
    def _(node, bounds, config) -> Relaxation:     # a_lo z + b_lo <= f(z) <= a_up z + b_up on [l, u]
        ...

    @softplus.fx_lowering(MySoftplus)               # module types, functions, Tensor method names
    def _(lo, call):
        return lo.emit(softplus.key, [lo.var(call.arg(0, "input"))])

    softplus.example(var(6))                        # example nodes for dualgraph.testing.check_op

What the registry answers is derived from the definitions, never from a hand-kept list:
whether an op is nonlinear (its dual layer needs bounds), which ops the ONNX frontend
imports, which torch callables the fx frontend lowers, where an op came from.

Definitions are unique: defining an op twice, or lowering one torch callable for two ops,
is an error naming both definitions unless the second passes ``override=True``. Ops from
anywhere but dualgraph itself are *trusted but verified*: the first time a process uses
their dual layer it is checked on points inside the bounds it was actually given
(:mod:`dualgraph.trust`).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .dual_registry import DUAL_RULES, DualRule, ElementwiseRule, RelaxFn
from .errors import DualgraphError
from .interpreter import EVAL_RULES, EvalRule
from .ir import OpKey
from .lowering import FxRule, OnnxHandler

BUILT_IN = "built-in"
RESERVED_DOMAIN = "dualgraph.dual"  # the dual graph's own nodes (dualgraph.dual_graph) live there


# ---- example nodes for the checker -----------------------------------------------------------

@dataclass(frozen=True)
class VarSpec:
    """A variable input of an example node: per-example shape (the batch is added)."""

    shape: tuple[int, ...]


@dataclass(frozen=True)
class RandomConst:
    """A constant input drawn from a seeded normal distribution (``positive``: |N| + 0.5)."""

    shape: tuple[int, ...]
    seed: int = 0
    positive: bool = False

    def tensor(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        t = torch.randn(*self.shape, generator=torch.Generator().manual_seed(self.seed), dtype=dtype)
        return t.abs() + 0.5 if self.positive else t


SAME = "same-as-first-variable"
"""An input slot reading the example's first variable input again (``x + x``)."""


def var(*shape: int) -> VarSpec:
    """A variable input of the given per-example shape."""
    return VarSpec(tuple(shape))


def random_const(*shape: int, seed: int = 0, positive: bool = False) -> RandomConst:
    """A seeded random constant input (``positive``: entries >= 0.5)."""
    return RandomConst(tuple(shape), seed, positive)


@dataclass(frozen=True)
class OpExample:
    """One example node: its inputs (:func:`var`, :func:`random_const`, tensors, :data:`SAME`
    or None for an omitted optional input), attributes and number of outputs.
    ``special_points`` are points where the op changes behaviour (kinks, clip values): the
    checker always samples them when they lie inside the bounds. ``domain`` ``(a, b)`` (either
    end may be infinite): the interval the op's variable inputs must stay in (Log: (1e-3, inf));
    the checker's random bounds are drawn inside it."""

    inputs: tuple
    attrs: dict
    outputs: int = 1
    special_points: tuple[float, ...] = ()
    domain: tuple[float, float] | None = None

    def describe(self, op_name: str) -> str:
        def one(spec) -> str:
            if spec is None:
                return "None"
            if isinstance(spec, str):
                return "same"
            if isinstance(spec, VarSpec):
                return f"x{list(spec.shape)}"
            shape = spec.shape if isinstance(spec, RandomConst) else tuple(spec.shape)
            return f"const{list(shape)}"
        return f"{op_name}({', '.join(one(s) for s in self.inputs)}; {self.attrs})"


# ---- the definitions -----------------------------------------------------------------------------

@dataclass(eq=False)
class OpDefinition:
    """Everything about one op ``(domain, op_type)``; made by :func:`define_op`."""

    key: OpKey
    source: str
    doc: str = ""
    eval_rule: EvalRule | None = None
    dual_rule: DualRule | None = None
    onnx_handler: OnnxHandler | None = None
    fx_targets: list = field(default_factory=list)
    examples: list[OpExample] = field(default_factory=list)
    replaced: str | None = None  # the source of the definition this one overrides
    #: reads a class or mask off the logits (ArgMax, Equal, OneHot): never bounded; errors
    #: about it say to export the logits instead
    output_side: bool = False

    @property
    def name(self) -> str:
        """``op_type``, or ``domain.op_type`` outside the default domain."""
        return ".".join(filter(None, self.key))

    @property
    def built_in(self) -> bool:
        return self.source == BUILT_IN

    @property
    def nonlinear(self) -> bool:
        """Whether the dual layer needs bounds of its inputs (a relaxation, not an exact adjoint)."""
        return self.dual_rule is not None and self.dual_rule.needs_bounds

    def provides(self) -> dict[str, bool]:
        return {"eval": self.eval_rule is not None, "dual": self.dual_rule is not None,
                "onnx": self.onnx_handler is not None, "fx": bool(self.fx_targets)}

    # -- declarations (each usable as a decorator) --
    def evaluate(self, rule: EvalRule) -> EvalRule:
        """``rule(node, inputs) -> tensor | tuple``: the op's semantics (ONNX's for ONNX ops).
        ``inputs`` has one entry per input slot (constants included, None for an omitted
        optional input); variable tensors carry the batch first. Must run on ``meta``
        tensors (shape inference): read integer parameters with ``node.const_input(i)``."""
        self._check_owner()
        self.eval_rule = EVAL_RULES[self.key] = rule
        return rule

    def dual(self, rule: type[DualRule] | DualRule) -> Any:
        """The dual layer (contract: :mod:`dualgraph.dual_registry`): a :class:`DualRule`
        subclass (instantiated here) or instance. Returns its argument (decorator use).

        Besides ``backward``, a :class:`DualRule` subclass states the facts the rounding
        allowance needs (``abs_linear``, ``constant_magnitude``, ``eval_length``,
        ``dual_length``; :class:`AffineRule` and relaxations have them already)."""
        self._check_owner()
        self._set_dual(rule)
        return rule

    def _set_dual(self, rule: type[DualRule] | DualRule) -> None:
        instance = rule() if isinstance(rule, type) else rule
        if not isinstance(instance, DualRule):
            raise DualgraphError(f"the dual layer of op {self.name} must be a dualgraph.DualRule, "
                                 f"got {type(instance).__name__}")
        if not self.built_in:
            instance.trust_source = f"{self.source}, op {self.name}"  # checked on first use
        self.dual_rule = DUAL_RULES[self.key] = instance

    def relaxation(self, *, linear_if: Callable[[Any], bool] = lambda config: False,
                   breakpoints: Callable[[Any], tuple[float, ...] | None] = lambda node: None,
                   eval_roundings: int = 8, monotone: bool = False,
                   eval_absolute: float = 0.0) -> Callable[[RelaxFn], RelaxFn]:
        """The dual layer of an elementwise op from ``relax(node, bounds, config) -> Relaxation``,
        linear bounding functions ``a_lo z + b_lo <= f(z) <= a_up z + b_up`` on ``[l, u]``.

        ``linear_if(config)``: True when the relaxation has equal slopes under ``config``
        (one pass then gives both bounds; forward direction and random projections can run
        through it); default False, always safe. ``breakpoints(node)``: see
        :meth:`DualRule.breakpoints`. ``eval_roundings``: how many ulps the op's own
        floating-point evaluation may be off (0 for ReLU; 8 suits ``exp``/``tanh`` formulas);
        ``eval_absolute``: an absolute error on top, in units of the evaluation's unit roundoff
        (onnxruntime's float32 ``Sigmoid`` is an approximation accurate to about 3 of them).
        ``monotone``: ``f`` is non-decreasing; with ``eval_roundings=0`` the output's bounds are
        then ``[f(l), f(u)]`` without a pass (:meth:`DualRule.image_bounds`; the checker tests
        the claim on every grid it draws).
        """
        self._check_owner()

        def deco(relax: RelaxFn) -> RelaxFn:
            self._set_dual(ElementwiseRule(relax, linear_if, breakpoints, eval_roundings, monotone, eval_absolute))
            return relax
        return deco

    def onnx_import(self, handler: OnnxHandler) -> OnnxHandler:
        """``handler(ctx, n) -> refs``: how the ONNX frontend converts a node of this op
        (without one, a node of a domain op is emitted as it is, its inputs as given)."""
        self._check_owner()
        self.onnx_handler = handler
        return handler

    def fx_lowering(self, *targets: Any, override: bool = False) -> Callable[[FxRule], FxRule]:
        """Register ``rule(lo, call)`` for module types (matched exactly), functions and
        Tensor method names (strings) that the torch.fx frontend lowers to this op."""
        self._check_owner()

        def deco(rule: FxRule) -> FxRule:
            for target in targets:
                register_fx_rule(target, rule, self, override=override)
            return rule
        return deco

    def example(self, *inputs: Any, attrs: dict | None = None, outputs: int = 1,
                special_points: tuple[float, ...] = (), domain: tuple[float, float] | None = None) -> OpDefinition:
        """Add an example node for the checker (:func:`dualgraph.testing.check_op`)."""
        self._check_owner()
        self.examples.append(OpExample(tuple(inputs), dict(attrs or {}), outputs, tuple(special_points),
                                       None if domain is None else (float(domain[0]), float(domain[1]))))
        return self

    def _check_owner(self) -> None:
        """Only the code that defined an op declares its rules: anyone else (a plugin reaching
        for a built-in's definition) must replace it with ``define_op(..., override=True)``."""
        caller = _caller_source(depth=3)
        if caller != self.source:
            raise DualgraphError(f"op {self.name} is defined by {self.source}; {caller} cannot change its rules "
                                 f"but can replace the op with define_op({self.key[1]!r}"
                                 f"{', domain=' + repr(self.key[0]) if self.key[0] else ''}, override=True)")


OPS: dict[OpKey, OpDefinition] = {}

# torch.fx lowering rules by target kind, and who registered each target (an op, or the
# fx frontend's own plumbing such as getattr and getitem)
MODULE_RULES: dict[type, FxRule] = {}
FUNCTION_RULES: dict[Callable, FxRule] = {}
METHOD_RULES: dict[str, FxRule] = {}
FX_OWNERS: dict[Any, OpDefinition | str] = {}

_plugin_source: list[str] = []  # the distribution whose entry point is being loaded


def define_op(op_type: str, domain: str = "", *, override: bool = False, doc: str = "") -> OpDefinition:
    """Declare op ``(domain, op_type)`` and return its :class:`OpDefinition`.

    Defining an op that is already defined is an error naming both sources, unless
    ``override=True`` (then this definition replaces the other entirely).
    """
    if not op_type or not isinstance(op_type, str):
        raise DualgraphError(f"an op needs a non-empty name, got {op_type!r}")
    if domain == RESERVED_DOMAIN or domain.startswith(RESERVED_DOMAIN + "."):
        raise DualgraphError(f"domain '{domain}' is reserved for the dual graph's own nodes; define op "
                             f"{op_type} in your own domain (e.g. 'com.example')")
    key = (domain, op_type)
    source = _caller_source()
    if source != BUILT_IN:
        from . import ops  # noqa: F401  (the built-ins first: what a plugin defines is checked against them)
    old = OPS.get(key)
    if old is not None and not override:
        raise DualgraphError(f"op {'.'.join(filter(None, key))} is already defined ({old.source}); the "
                             f"definition from {source} replaces it only with define_op(..., override=True)")
    if old is not None:
        remove_op(key)
    definition = OpDefinition(key, source, doc, replaced=old.source if old is not None else None)
    OPS[key] = definition
    return definition


def remove_op(key: OpKey) -> None:
    """Forget an op's definition and everything it registered (tests, plugin teardown)."""
    definition = OPS.pop(key, None)
    if definition is None:
        return
    if EVAL_RULES.get(key) is definition.eval_rule:
        EVAL_RULES.pop(key, None)
    if DUAL_RULES.get(key) is definition.dual_rule:
        DUAL_RULES.pop(key, None)
    for target in definition.fx_targets:
        if FX_OWNERS.get(target) is definition:
            del FX_OWNERS[target]
            _fx_table(target).pop(target, None)


def register_fx_rule(target: Any, rule: FxRule, owner: OpDefinition | str, *, override: bool = False) -> None:
    """Lower ``target`` with ``rule``; ``owner`` is the op definition (or a frontend's name)."""
    old = FX_OWNERS.get(target)
    if old is not None and old is not owner and not override:
        raise DualgraphError(f"torch.fx target {_target_name(target)} is already lowered by {_owner_name(old)}; "
                             f"{_owner_name(owner)} replaces that only with fx_lowering(..., override=True)")
    if isinstance(old, OpDefinition) and old is not owner:
        old.fx_targets.remove(target)
    FX_OWNERS[target] = owner
    _fx_table(target)[target] = rule
    if isinstance(owner, OpDefinition) and target not in owner.fx_targets:
        owner.fx_targets.append(target)


def _fx_table(target: Any) -> dict:
    if isinstance(target, str):
        return METHOD_RULES
    if isinstance(target, type) and issubclass(target, torch.nn.Module):
        return MODULE_RULES
    return FUNCTION_RULES


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}"
    return f"{getattr(target, '__module__', '') or ''}.{getattr(target, '__qualname__', repr(target))}".lstrip(".")


def _owner_name(owner: OpDefinition | str) -> str:
    return f"op {owner.name} ({owner.source})" if isinstance(owner, OpDefinition) else owner


def _caller_source(depth: int = 2) -> str:
    """Who is calling (``depth`` frames up from here): the plugin distribution being loaded,
    dualgraph itself, the installed distribution the calling module belongs to (a plugin
    imported before dualgraph loaded its entry points), or that module (user code, tests)."""
    if _plugin_source:
        return _plugin_source[-1]
    module = sys._getframe(depth).f_globals.get("__name__", "?")
    if module == "dualgraph" or module.startswith("dualgraph."):
        return BUILT_IN
    return distribution_of(module) or f"module {module}"


def distribution_of(module: str) -> str | None:
    """``"<name> <version>"`` of the installed distribution providing ``module``, if any."""
    import importlib.metadata as metadata
    if "packages" not in _distributions:
        _distributions["packages"] = metadata.packages_distributions()
    names = _distributions["packages"].get(module.split(".")[0])
    if not names:
        return None
    try:
        dist = metadata.distribution(names[0])
    except metadata.PackageNotFoundError:
        return names[0]
    return f"{dist.metadata['Name']} {dist.version}"


_distributions: dict = {}


@contextlib.contextmanager
def loading_plugin(source: str) -> Iterator[None]:
    """Attribute every definition made inside to ``source`` (a plugin distribution)."""
    _plugin_source.append(source)
    try:
        yield
    finally:
        _plugin_source.pop()


def snapshot() -> Callable[[], None]:
    """A function that puts every registry back as it is now (a plugin that fails to load
    leaves nothing behind: neither new ops nor replaced built-ins)."""
    tables = (OPS, EVAL_RULES, DUAL_RULES, MODULE_RULES, FUNCTION_RULES, METHOD_RULES, FX_OWNERS)
    saved = [dict(t) for t in tables]
    targets = {id(d): (d, list(d.fx_targets)) for d in OPS.values()}

    def restore() -> None:
        for table, copy in zip(tables, saved):
            table.clear()
            table.update(copy)
        for d, fx_targets in targets.values():
            d.fx_targets[:] = fx_targets
    return restore


def definitions() -> list[OpDefinition]:
    """Every defined op (built-ins loaded, plugins loaded), sorted by name."""
    ensure_ops_loaded()
    return sorted(OPS.values(), key=lambda d: (d.key[0] != "", d.name))


def find_op(name: str) -> OpDefinition:
    """The definition of ``op_type`` or ``domain.op_type``, or an error listing what exists."""
    ensure_ops_loaded()
    domain, _, op_type = name.rpartition(".")
    found = OPS.get((domain, op_type))
    if found is None:
        raise DualgraphError(f"no op named '{name}' is defined; `dualgraph plugins` lists the defined ops "
                             "(write 'domain.Op' for an op outside the default domain)")
    return found


def ensure_ops_loaded() -> None:
    """Import the built-in op families, then the installed plugins (each once)."""
    from . import ops  # noqa: F401  (importing defines the built-in ops)
    from .plugins import load_plugins
    load_plugins()
