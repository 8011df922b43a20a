"""The robust loss of a torch module: differentiable dual bounds for training (Section 4).

:func:`robust_loss` is the paper's training objective (and the same function as
``convex_adversarial.robust_loss``): with ``J_j`` the dual lower bound of the margin
``logit_y - logit_j`` over the input set (row ``e_y - e_j`` of the specification),
``f_j = -J_j`` for ``j != y`` and ``f_y = 0`` (the bound of the zero row), the loss is
``CE(f, y) = log(1 + sum_{j != y} exp(-J_j))`` averaged over the batch, and the robust
error is the fraction of examples with some ``J_j <= 0`` (a misclassified example always
has one, since ``J_j`` is at most the actual margin).

The module is lowered with :func:`dualgraph.frontends.fx.load_module` **once** (cached per module,
weakly) and the IR's constants are then re-bound to the module's *live* parameters and
buffers (:func:`bind_parameters`): the fx frontend names every constant after its
parameter's qualified name (``"0.weight"``) and stores a detached clone, which binding
replaces by the ``nn.Parameter`` itself, so the bounds are differentiable functions of
the weights and ``loss.backward()`` fills ``param.grad``. No simplification passes run
(folding would create constants that are not parameters). Semantics are inference ones
(BatchNorm with running statistics, Dropout off), as everywhere in dualgraph.

With ``BoundConfig(proj=r)`` the intermediate bounds are random-projection estimates
(:mod:`dualgraph.projections`, fresh draws on every call), as in the paper's training;
the final ``J(C)`` is exact given those bounds. The resulting robust error is then an
estimate, not a certificate: certify with exact bounds at test time.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import DualgraphError
from .input_sets import make_input_set
from .ir import Graph
from .scheduler import BoundConfig, BoundScheduler


def bind_parameters(graph: Graph, module: nn.Module, strict: bool = True) -> dict[str, str]:
    """Make ``graph``'s constants *be* ``module``'s parameters and buffers (no copies).

    A constant is matched to the parameter whose qualified name it carries (``"0.weight"``,
    or ``"0.weight_<k>"`` where the frontend had to make the name unique) and whose value
    it equals, or whose transpose it holds where the frontend marked it so (``nn.Linear`` on
    a sequence: bound to the live parameter's transposed view). Returns ``{parameter name:
    value name}``. With ``strict``, a parameter that
    requires grad but has no constant (folded into another constant by the frontend, so
    gradients could not reach it) is an error.
    """
    from dualgraph.frontends.fx_lowering import TRANSPOSE_OF
    consts = {v.name: v for v in graph.values.values() if v.is_const}
    bound: dict[str, str] = {}
    bound_ids: set[int] = set()
    unbound: dict[int, str] = {}
    for name, p in _named_tensors(module):  # every alias of a shared parameter: the frontend names it by one
        if id(p) in bound_ids:
            continue
        # a transposed use (Linear on a sequence): the live parameter's transpose, a view of it
        for v in consts.values():
            if v.meta.get(TRANSPOSE_OF) == name and torch.equal(v.const, p.detach().t().to(v.const.device)):
                v.const = p.t()
                bound[name] = v.name
                bound_ids.add(id(p))
        pat = re.compile(re.escape(name) + r"(_\d+)?$")
        hit = next((v for vname, v in consts.items() if pat.match(vname) and v.const.shape == p.shape
                    and v.const.dtype == p.dtype and torch.equal(v.const, p.detach().to(v.const.device))), None)
        if hit is None:
            if isinstance(p, nn.Parameter) and p.requires_grad and id(p) not in bound_ids:
                unbound.setdefault(id(p), name)
            continue
        hit.const = p
        bound[name] = hit.name
        bound_ids.add(id(p))
    missing = [name for i, name in unbound.items() if i not in bound_ids]
    if missing and strict:
        raise DualgraphError(f"parameters {', '.join(missing)} have no matching constant in the lowered graph "
                             "(the frontend folded them), so gradients would not reach them")
    return bound


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer under every name it has (a shared one under each)."""
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


def _refuse_derived_constants(graph: Graph) -> None:
    """A constant the frontend computed from parameters (``F.linear(h, self.fc.weight.t())``: tied
    weights) keeps their values at lowering time; bound to live parameters it would not follow
    them (the bounds would be about the network before the optimiser's steps, and no gradient
    would reach it), so it is refused (a review found bounds above the true margins)."""
    from dualgraph.frontends.fx_lowering import DERIVED_FROM
    derived = sorted({name for v in graph.values.values() if v.is_const for name in v.meta.get(DERIVED_FROM, ())})
    if derived:
        raise DualgraphError(f"the module computes constants from parameters ({', '.join(derived)}) outside the "
                             "network's ops (e.g. weight.t()); the robust loss could not follow them as they train: "
                             "apply the op to the activations instead (h @ W rather than F.linear(h, W.t()))")


@dataclass
class _Lowered:
    """A module's lowered graph, bound to its parameters, and one scheduler per config."""

    graph: Graph
    params: dict[str, torch.Tensor]
    unit_shape: tuple[int, ...]
    schedulers: dict[BoundConfig, BoundScheduler] = field(default_factory=dict)

    def scheduler(self, config: BoundConfig) -> BoundScheduler:
        s = self.schedulers.get(config)
        if s is None:
            s = self.schedulers[config] = BoundScheduler(self.graph, config)
        return s

    def is_current(self, module: nn.Module, x: torch.Tensor) -> bool:
        """Still bound to the module's current tensors (a replaced Parameter needs a new lowering)."""
        if tuple(x.shape[1:]) != self.unit_shape:
            return False
        live = dict(_named_tensors(module))
        return all(live.get(k) is t for k, t in self.params.items())


_LOWERED: "weakref.WeakKeyDictionary[nn.Module, _Lowered]" = weakref.WeakKeyDictionary()


def lower_module(model: nn.Module, x: torch.Tensor) -> _Lowered:
    """The cached lowering of ``model`` for inputs shaped like ``x`` (re-done only if stale)."""
    low = _LOWERED.get(model)
    if low is not None and low.is_current(model, x):
        return low
    from dualgraph.frontends.fx import load_module
    from .api import strip_readout
    with torch.no_grad():
        graph = strip_readout(load_module(model, x[:2].detach(), warn_training=False))  # inference semantics meant
    _refuse_derived_constants(graph)
    names = bind_parameters(graph, model)
    live = dict(_named_tensors(model))
    low = _LOWERED[model] = _Lowered(graph, {k: live[k] for k in names}, tuple(x.shape[1:]))
    return low


def robust_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                  config: BoundConfig = BoundConfig(), clip: tuple[float, float] | None = None,
                  norm: str = "linf") -> torch.Tensor:
    """Lower bounds ``J`` of ``logit_y - logit_j`` (``j != y``) over the ball: ``[B, K-1]``,
    differentiable in the module's parameters."""
    from .api import margin_spec
    if x.dim() < 2:
        raise DualgraphError("x must be a batch (batch dimension first)")
    low = lower_module(model, x)
    sched = low.scheduler(config)
    input_set = make_input_set(x, eps, norm, clip if norm == "linf" else None)
    spec = margin_spec(y.to(x.device), sched.output.numel).to(x)
    return sched.bound_output(input_set, spec)


def robust_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                config: BoundConfig = BoundConfig(), clip: tuple[float, float] | None = None,
                norm: str = "linf") -> tuple[torch.Tensor, float]:
    """``(loss, robust_err)``: mean cross-entropy on ``f = [-J; 0 at y]`` and the fraction of
    examples with some margin bound ``<= 0``. See the module docstring."""
    margins = robust_bounds(model, x, y, eps, config, clip, norm)
    f = torch.cat([margins.new_zeros(margins.shape[0], 1), -margins], 1)
    loss = torch.logsumexp(f, 1).mean()
    robust_err = float((~(margins.detach() > 0)).any(1).double().mean())  # a NaN margin is no certificate
    return loss, robust_err
