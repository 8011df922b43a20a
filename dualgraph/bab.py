"""Branch and bound over ReLU splits: the complete search behind ``verify``.

A property the bounds of the whole box leave open is split into **domains**: a domain fixes
some crossing ReLU units to one side, ``z_j >= 0`` (active) or ``z_j <= 0`` (inactive). The
two children of a domain cover it, so the leaves always cover the box, and the property
holds once every leaf is proved. A domain is bounded with

* the root's intermediate bounds (optimised slopes, :mod:`dualgraph.alpha`), each split
  unit's bound clamped at 0 on its side, so its relaxation is exact (the unit is stable);
* the split constraints in the dual: ``s_j z_j <= 0`` with a multiplier ``beta_j >= 0``
  (beta-CROWN, :class:`~dualgraph.dual_registry.SplitMultipliers`), optimised together with
  the free slopes for each open row by projected gradient ascent.

Every bound is sound on its domain whatever the slopes and multipliers (and in floating
point: the clamped bounds get the rounding allowance's outward relaxations, the multipliers
their own rounding term), so a leaf is proved when some row of each conjunction has a lower
bound above its threshold.

**Empty children.** The root's bounds do not see a domain's splits, so deep in a tree many
domains are empty (their splits contradict each other): an ascent proves those only as its
multipliers grow. Before a batch of children is bounded, those that the splits of one layer
(the one just split, or the next, whose input box that split narrowed) make empty over the box
of the layer's inputs are dropped, each on a float64 LP certificate (:mod:`dualgraph.split_lp`;
on Gemm layers). On the competition's 256x4 network the trees shrank 1.3-4.4x
(``bench/vnncomp_report.md``).

**Branching** (BaBSR-like): a crossing unit's upper line costs the bound
``|lam_j^-| u_j (-l_j) / (u_j - l_j)`` (its intercept times the negative part of the row's
dual variable at the unit's output); the unit with the largest cost summed over the domain's
open rows is split. **Counterexamples**: each open row's dual variable at the input
points to the corner of the box that minimises its bound; after every batch the corners of the
rows furthest from a proof go to the caller's ``check`` (``verify`` descends from them by a
short PGD and confirms a hit in onnxruntime).

**One tree per conjunction.** The conjunctions are proved one after another, each by its own
tree over the root's intermediate bounds (computed once): a domain's splits then serve the one
conjunction whose rows it bounds, and bounding a domain costs its own rows' passes, not every
conjunction's (on a robustness property the nine wrong classes need different splits; with one
tree for all of them every leaf paid for nine rows, most of them already proved).
Conjunctions nearest to a proof go first. Within a tree, domains are processed worst bound
first, ``batch`` parents (``2 batch`` children) per bound computation, until every domain is
proved, a counterexample is confirmed, the time runs out, or only domains without a crossing
unit to split are left (unknown).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .chain import AffineChain, ChainAllowance, FusedChain
from .dual_graph import INPUT_SET
from .dual_registry import Bounds
from .input_sets import Box, outward
from .ir import Node
from .rounding import SAFETY, gamma, unit_roundoff
from .scheduler import BoundMap, BoundScheduler
from .split_lp import EmptinessTest, SplitLayer, gemm_map, split_sources

ACTIVE, INACTIVE = -1.0, 1.0
"""The sign ``s`` of a split constraint ``s z <= 0``: ``-1`` keeps ``z >= 0``, ``+1`` keeps ``z <= 0``."""


THOROUGH = 20
"""A domain with every crossing unit split gets this many times the usual optimiser steps."""

CANDIDATES = 16
"""Corners checked as counterexamples per bound computation."""


@dataclass
class Domains:
    """Open domains of one tree: per split ReLU node, the constraint signs ``[N, n]`` (int8; 0:
    not split), the conjunction's margin ``[N]`` (its best row's ``lower - threshold``), the
    branching scores ``[N, n]`` (float32) and the last slopes and multipliers of the domain's ascent
    (:data:`dualgraph.alpha.Warm`, float32), where its children's ascents start."""

    signs: dict[str, torch.Tensor]
    margin: torch.Tensor
    scores: dict[str, torch.Tensor]
    warm: dict[tuple[str, str], torch.Tensor]

    def __len__(self) -> int:
        return int(self.margin.shape[0])

    def pick(self, index: torch.Tensor) -> Domains:
        return Domains({k: t[index] for k, t in self.signs.items()}, self.margin[index],
                       {k: t[index] for k, t in self.scores.items()}, {k: t[index] for k, t in self.warm.items()})


class DomainQueue:
    """The open domains of one tree, in storage that grows by doubling: taking the ``k`` worst
    and adding children move only those domains, not the whole queue (joining and slicing
    :class:`Domains` copied every queued domain twice per batch, and held two copies at once).
    A slot is free where ``live`` is False; warm-start keys that appear later are NaN (the
    usual start) for the domains stored before."""

    def __init__(self, first: Domains) -> None:
        self.fields: dict[tuple[str, object], torch.Tensor] = {}
        self.margin = first.margin.new_empty(0)
        self.live = torch.zeros(0, dtype=torch.bool)
        self.count = 0
        self.push(first)

    def __len__(self) -> int:
        return self.count

    @staticmethod
    def _parts(d: Domains) -> dict[tuple[str, object], torch.Tensor]:
        return {**{("signs", k): t for k, t in d.signs.items()}, **{("scores", k): t for k, t in d.scores.items()},
                **{("warm", k): t for k, t in d.warm.items()}}

    def push(self, d: Domains) -> None:
        """Store the domains ``d`` in free slots (growing the storage when there are too few)."""
        n = len(d)
        if not n:
            return
        free = (~self.live).nonzero().flatten()[:n]
        if len(free) < n:
            old = len(self.live)
            self._grow(max(2 * old, old + n - len(free)))
            free = torch.cat([free, torch.arange(old, old + n - len(free))])
        for key, t in self._parts(d).items():
            if key not in self.fields:  # a key new to this tree: the usual start for the others
                fill = torch.nan if key[0] == "warm" else 0
                self.fields[key] = t.new_full((len(self.live), *t.shape[1:]), fill)
            self.fields[key][free] = t
        for key, store in self.fields.items():
            if key[0] == "warm" and key[1] not in d.warm:
                store[free] = torch.nan
        self.margin[free] = d.margin.to(self.margin)
        self.live[free] = True
        self.count += n

    def pop_worst(self, k: int) -> Domains:
        """Take out the ``k`` domains with the lowest margins."""
        live = self.live.nonzero().flatten()  # a free slot is never a candidate, whatever the margins
        worst = torch.topk(self.margin[live].nan_to_num(nan=-torch.inf), min(k, self.count), largest=False).indices
        index = live[worst]
        self.live[index] = False
        self.count -= len(index)
        picked = {key: t[index] for key, t in self.fields.items()}
        return Domains({k: t for (g, k), t in picked.items() if g == "signs"}, self.margin[index],
                       {k: t for (g, k), t in picked.items() if g == "scores"},
                       {k: t for (g, k), t in picked.items() if g == "warm"})

    def _grow(self, capacity: int) -> None:
        extra = capacity - len(self.live)
        self.fields = {key: torch.cat([t, t.new_empty((extra, *t.shape[1:]))]) for key, t in self.fields.items()}
        self.margin = torch.cat([self.margin, self.margin.new_empty(extra)])
        self.live = torch.cat([self.live, torch.zeros(extra, dtype=torch.bool)])


def _clamp_to_splits(lo: torch.Tensor, up: torch.Tensor, sign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A split unit's bounds clamped at 0 on its side (``sign``: ``ACTIVE``, ``INACTIVE`` or 0)."""
    return torch.where(sign == ACTIVE, lo.clamp(min=0), lo), torch.where(sign == INACTIVE, up.clamp(max=0), up)


@dataclass
class BabResult:
    """``proved``: every domain proved; else why not (``"timeout"``, ``"no split left"``)."""

    proved: bool
    domains: int  # domains bounded
    reason: str = ""


@dataclass
class SearchProgress:
    """Where the tree being searched stands as its last batch is taken: its open domains (that
    batch's included) and the lowest margin among them, the conjunction's margin on the worst
    open domain as the search estimates it (in float32: not a proof). What a search that runs
    out of time reports: how far it got."""

    open_domains: int = 0
    worst_margin: float = float("nan")


@dataclass(frozen=True)
class _Conjunction:
    """The rows of the conjunction one tree proves empty: ``spec`` ``[1, m, n_out]`` and
    thresholds ``goal`` ``[m]`` (the safety margin included); it is empty on a domain where
    one of its rows has a lower bound above its threshold."""

    spec: torch.Tensor
    goal: torch.Tensor


class BranchAndBound:
    """Branch and bound for one box ``[lo, hi]`` (``[1, *input_shape]``) and the open
    conjunctions of an unsafe region: rows ``C`` ``[m, n_out]`` with thresholds ``d``
    ``[m]`` (a conjunction is empty where one of its rows has ``C y > d``) and ``owner``
    ``[m]`` (the conjunction of each row).

    ``scheduler`` is a float64 scheduler with ``relu_relaxation="alpha"``; ``check(xs)``
    receives candidate counterexamples ``[k, n_inputs]`` (numpy; starting points for a search
    near them too) and raises when one is confirmed.

    ``fast``: a scheduler of the same graph and config whose passes run in ``fast_dtype``
    (float32: about 1.7x the domains per second on CPU). The domains' ascents then run there,
    on the float64 bounds rounded outward, and a domain counts as proved only once the float64
    scheduler's bound, computed again at the slopes and multipliers at which the fast bound
    passed the threshold, does too (:meth:`_confirmed`): every proof is a float64 one.
    ``fused``: on a chain network (:class:`~dualgraph.chain.AffineChain`) those ascents run as
    fused dense passes (:class:`~dualgraph.chain.FusedChain`, about 1.7x the domains per second), confirmed
    the same way.
    """

    def __init__(self, scheduler: BoundScheduler, lo: torch.Tensor, hi: torch.Tensor, C: torch.Tensor,
                 d: torch.Tensor, owner: np.ndarray, check: Callable[[np.ndarray], None],
                 batch: int = 256, margin: float = 1e-9, fast: BoundScheduler | None = None,
                 fast_dtype: torch.dtype = torch.float32, fused: bool = True, empty_test: bool = True) -> None:
        self.sched, self.check = scheduler, check
        self.fast, self.fast_dtype = fast, fast_dtype
        # each child holds every bounded value's two bounds, and each domain its signs, scores and
        # start values: at most a few times the memory budget of one chunk of dual variables
        units = sum(v.numel for v in scheduler.bound_targets)
        self.batch = max(1, min(batch, scheduler.config.max_elements // (8 * max(units, 1))))
        self.steps = scheduler.config.alpha_steps
        self.box = Box(lo, hi)
        if fast is not None:
            self.fast_box = Box(*outward(lo, hi, fast_dtype))  # contains the box
        goal = (d + margin * (1 + d.abs())).to(lo)
        owner = torch.as_tensor(owner, dtype=torch.long)
        self.conjunctions = [_Conjunction(C.to(lo)[None, owner == k], goal[owner == k]) for k in owner.unique()]
        targets = set(scheduler.bound_targets)
        self.relus: list[Node] = [n for n in scheduler.graph.nodes if n.op == ("", "Relu") and n.inputs[0] in targets]
        self.bounded = 0
        self.empty = 0  # children dropped as empty by the split-LP test
        self.empty_test = empty_test
        self.emptiness: EmptinessTest | None = None
        self.progress = SearchProgress()
        self.fused: FusedChain | None = None
        if fast is not None and fused:
            chain = AffineChain.of(scheduler.graph, scheduler.config)
            if chain is not None and chain.relus == self.relus:
                self.fused = FusedChain(chain, fast_dtype, lo.device)

    def run(self) -> BabResult:
        if not self.relus:
            return BabResult(False, 0, "no ReLU to split")
        self.prepare()
        unsplit = {n.name: torch.zeros(1, n.inputs[0].numel, dtype=torch.int8) for n in self.relus}
        roots = [self._bound(c, unsplit) for c in self.conjunctions]
        nearest_first = sorted(range(len(roots)), key=lambda k: -float(roots[k].margin.max()) if len(roots[k]) else -np.inf)
        for k in nearest_first:
            result = self._search(self.conjunctions[k], roots[k])
            if not result.proved:
                return result
        return BabResult(True, self.bounded)

    def prepare(self, root: dict | None = None) -> None:
        """The root's intermediate bounds (``root``, or computed on the box) and what the fast
        passes derive from them: the bounds rounded outward to their precision and, on a chain,
        the rounding allowance of the fused passes."""
        self.root = dict(self.sched.intermediate_bounds(self.box)) if root is None else root
        if self.fast is not None:
            self.fast_root = {v: Bounds(*outward(b.lower, b.upper, self.fast_dtype)) for v, b in self.root.items()}
        if self.fused is not None and self.fast.config.rounding_allowance:
            self.fused.allowance = self._chain_allowance()
        if self.empty_test:
            self.emptiness = self._emptiness_test()

    def _emptiness_test(self) -> EmptinessTest | None:
        """The split-LP test (:mod:`dualgraph.split_lp`) on the ReLUs whose input is an exact
        Gemm of the previous one's output (or of the input), with the float64 scheduler's
        evaluation error at each; None where no ReLU qualifies."""
        signs = {n.name: torch.zeros(1, n.inputs[0].numel, dtype=torch.int8) for n in self.relus}
        rounding = self._domain_bounds(signs, 1).batch.rounding
        rounding.magnitude(self.sched.output)  # the whole network analysed: a possible overflow is known
        overflow = rounding.may_overflow()
        if overflow is not None and bool(overflow.any()):
            return None  # an emptiness proof assumes finite values as evaluated
        layers: list[SplitLayer | None] = []
        for relu, source in zip(self.relus, split_sources(self.sched.graph, self.relus)):
            producer = relu.inputs[0].producer
            found = None if source is None else gemm_map(producer, source)
            if found is None:
                layers.append(None)
                continue
            noise = torch.as_tensor(rounding.evaluation_error(producer), dtype=torch.float64).flatten()
            noise = noise.expand(found[1].numel()) if noise.numel() == 1 else noise
            layers.append(SplitLayer(*found, noise))
        if all(form is None for form in layers):
            return None
        root = [(self.root[n.inputs[0]].lower.flatten(), self.root[n.inputs[0]].upper.flatten()) for n in self.relus]
        return EmptinessTest([n.name for n in self.relus], layers, (self.box.lo.flatten(), self.box.hi.flatten()), root)

    def _search(self, conjunction: _Conjunction, root: Domains) -> BabResult:
        """Split the open domains of one tree (from ``root``) until none is left."""
        queue = DomainQueue(root)
        while len(queue):
            parents = queue.pop_worst(self.batch)  # the worst first
            self.progress = SearchProgress(len(queue) + len(parents), float(parents.margin[0]))
            self.sched.deadline.check()
            splittable = self._splittable(parents)
            if not bool(splittable.all()):
                # every crossing unit split: the bound is exact once the multipliers are optimal
                full = parents.pick((~splittable).nonzero().flatten())
                # in float64: the fast passes' rounding allowance alone can keep a close call open
                stuck = self._bound(conjunction, full.signs, full.warm, THOROUGH * self.steps, precise=True)
                if len(stuck):
                    return BabResult(False, self.bounded, "no split left")
                parents = parents.pick(splittable.nonzero().flatten())
                if not len(parents):
                    continue
            children, layer = self._branch(parents)
            warm = {k: t.repeat(2, 1) for k, t in parents.warm.items()}
            if self.emptiness is not None:  # an empty child holds vacuously: no bound to compute
                empty = self.emptiness.empty(children, layer)
                if bool(empty.any()):
                    self.empty += int(empty.sum())
                    keep = (~empty).nonzero().flatten()
                    children = {k: t[keep] for k, t in children.items()}
                    warm = {k: t[keep] for k, t in warm.items()}
                    if not len(keep):
                        continue
            queue.push(self._bound(conjunction, children, warm))
        self.progress = SearchProgress()
        return BabResult(True, self.bounded)

    # ---- one batch ---------------------------------------------------------------------
    def _bound(self, conjunction: _Conjunction, signs: dict[str, torch.Tensor], warm: dict | None = None,
               steps: int | None = None, precise: bool = False) -> Domains:
        """Bound the conjunction's rows on the domains ``signs`` (the ascent starting at ``warm``);
        the open domains, with their margins, scores and last variables. ``precise``: the
        ascent runs on the float64 scheduler, not on the fast passes."""
        D = next(iter(signs.values())).shape[0]
        fast = self.fast is not None and not precise
        record: dict = {}
        if self.fused is not None and not precise:
            bounds, lower = self._fused_bound(conjunction, signs, D, record, steps, warm)
        else:
            bounds = self._domain_bounds(signs, D, fast)
            sched = self.fast if fast else self.sched
            dtype = bounds.batch.input_set.center.dtype
            lower = sched.bound_output(bounds.batch.input_set, conjunction.spec.to(dtype), bounds,
                                       goal=outward(conjunction.goal, conjunction.goal, dtype)[1],  # rounded up
                                       record=record, steps=steps, warm=warm)
        self.bounded += D
        gaps = lower.to(conjunction.goal) - conjunction.goal                             # [D, m]
        if fast:
            gaps = self._confirmed(conjunction, signs, gaps, record)
        margin = gaps.max(1).values  # the conjunction's best row
        proved = (gaps > 0).any(1)
        self._counterexamples(record, gaps)
        keep = ~proved
        scores = self._scores(bounds, record, D)
        last = {}
        if "variables" in record:  # a domain's rows share one start: its first open row's last values
            examples = record["examples"]
            first = torch.full((D,), len(examples), dtype=torch.long).scatter_reduce(
                0, examples, torch.arange(len(examples)), "amin")
            has = first < len(examples)
            for k, t in record["variables"].items():
                last[k] = t.new_full((D, t.shape[1]), torch.nan, dtype=torch.float32)
                last[k][has] = t[first[has]].float()
        return Domains({k: t[keep] for k, t in signs.items()}, margin[keep], {k: t[keep] for k, t in scores.items()},
                       {k: t[keep] for k, t in last.items()})

    def _fused_bound(self, conjunction: _Conjunction, signs: dict[str, torch.Tensor], D: int, record: dict,
                     steps: int | None, warm: dict | None) -> tuple[dict, torch.Tensor]:
        """The fast bounds of the ReLUs' inputs on ``D`` domains (the root's, each split unit
        clamped to its side; ``[D, n]``) and the conjunction's rows' lower bounds ``[D, m]`` on
        them by the fused chain (:meth:`_bound`'s ``record``)."""
        bounds = {}
        for n in self.relus:
            b, s = self.fast_root[n.inputs[0]], signs[n.name]
            bounds[n.inputs[0]] = Bounds(*_clamp_to_splits(b.lower.flatten(1).expand(D, -1),
                                                           b.upper.flatten(1).expand(D, -1), s))
        dtype = self.fast_dtype
        lower = self.fused.bound(self.fast_box.lo.flatten(), self.fast_box.hi.flatten(),
                                 [bounds[n.inputs[0]] for n in self.relus], [signs[n.name] for n in self.relus],
                                 conjunction.spec[0].to(dtype), outward(conjunction.goal, conjunction.goal, dtype)[1],
                                 steps=self.steps if steps is None else steps, lr=self.sched.config.alpha_lr,
                                 warm=warm, record=record)
        return bounds, lower

    def _chain_allowance(self) -> ChainAllowance:
        """The fast scheduler's rounding allowance on the root's bounds, for the fused passes:
        each map's step weight, the input term's and the ReLUs' outward rounding of offsets
        (split domains' bounds are tighter, so the root's weights cover them)."""
        chain, sched = self.fused.chain, self.fast
        signs = {n.name: torch.zeros(1, n.inputs[0].numel, dtype=torch.int8) for n in self.relus}
        rounding = self._domain_bounds(signs, 1, fast=True).batch.rounding
        dual = sched.dual(sched.output)
        by_primal = {n.meta["primal"]: n for n in dual.nodes if "primal" in n.meta}
        entry = next(n for n in dual.nodes if n.op == INPUT_SET)

        def weight(node, width: int) -> torch.Tensor:
            w = rounding.step_weights(node, 1)[0] if node is not None else None
            return torch.zeros(width, dtype=self.fast_dtype) if w is None else w.flatten().to(self.fast_dtype)

        steps = [weight(by_primal.get(v.producer), v.numel) for v in chain.targets]
        u = unit_roundoff(self.fast_dtype)
        terms = len(sched.graph.nodes) + 4
        offsets = [SAFETY * gamma(n.inputs[0].numel + 8 + terms, u) for n in chain.relus]
        underflow = [SAFETY * (rounding.sigma_e + 8 * rounding.sigma_c)] * len(chain.relus)  # as _outward's
        constant = sum(rounding.step_constant(n) for n in dual.nodes)
        return ChainAllowance(steps, weight(entry, int(self.box.lo[0].numel())), offsets, underflow, constant)

    def _confirmed(self, conjunction: _Conjunction, signs: dict[str, torch.Tensor], gaps: torch.Tensor,
                   record: dict) -> torch.Tensor:
        """``gaps`` (``lower - goal``, ``[D, m]``, from the fast scheduler) with every positive
        one replaced by a float64 one: that row's bound on its domain computed again by the
        float64 scheduler at the variables of the iterate at which it passed its goal
        (``record["proving"]``; the relaxations' own slopes if it passed without an ascent).
        The float64 bound holds whatever those variables are; where rounding leaves it below
        the threshold, the row is open again (and its domain too, unless another row holds)."""
        domains, rows = (gaps > 0).nonzero(as_tuple=True)
        if not domains.numel():
            return gaps
        warm = {}
        if "proving" in record:
            position = torch.full(gaps.shape, -1, dtype=torch.long, device=gaps.device)
            position[record["proving_examples"], record["proving_rows"]] = torch.arange(
                len(record["proving_examples"]), device=gaps.device)
            at = position[domains, rows]
            has = at >= 0
            for key, t in record["proving"].items():
                w = t.new_full((len(domains), t.shape[1]), torch.nan)
                w[has] = t[at[has]]
                warm[key] = w.to(conjunction.goal)
        exact = self._domain_bounds({k: t[domains] for k, t in signs.items()}, len(domains))
        spec = conjunction.spec[0, rows].unsqueeze(1)                                   # [P, 1, n_out]
        goal = conjunction.goal[rows].unsqueeze(1)
        lower = self.sched.bound_output(exact.batch.input_set, spec, exact, goal=goal, steps=0, warm=warm)
        return gaps.index_put((domains, rows), (lower - goal)[:, 0])

    def _domain_bounds(self, signs: dict[str, torch.Tensor], D: int, fast: bool = False) -> BoundMap:
        """The root's bounds for ``D`` domains, each split unit clamped to its side; relaxations
        rounded outward by the batch's rounding allowance (the bounds themselves are sound).
        ``fast``: for the fast scheduler (the root's bounds rounded outward to its precision)."""
        box, root, sched = (self.fast_box, self.fast_root, self.fast) if fast else (self.box, self.root, self.sched)
        input_set = box.take(torch.zeros(D, dtype=torch.long))
        bounds = BoundMap()
        batch = bounds.batch = sched.batch(input_set, bounds)
        dtype = box.lo.dtype
        batch.splits = {n.name: signs[n.name].view(D, *n.inputs[0].unit_shape).to(dtype) for n in self.relus}
        for v in self.sched.bound_targets:
            b = root[v]
            lo, up = b.lower.expand(D, *b.lower.shape[1:]), b.upper.expand(D, *b.upper.shape[1:])
            for n in self.relus:  # every ReLU reading v (two may read one value)
                if n.inputs[0] is v:
                    lo, up = _clamp_to_splits(lo, up, batch.splits[n.name])
            bounds[v] = batch.rounding.adopt(v, type(b)(lo, up))
        return bounds

    def _scores(self, bounds: BoundMap, record: dict, D: int) -> dict[str, torch.Tensor]:
        """Branching scores ``[D, n]`` per split node: the open rows' cost of each unsplit
        crossing unit's upper line (module docstring), plus a tiny share of the unit's gap so
        that a domain whose rows do not see its crossing units still splits the widest."""
        out = {}
        examples = record.get("examples")
        for n in self.relus:
            b = bounds[n.inputs[0]]
            lo, up = b.lower.flatten(1), b.upper.flatten(1)
            crossing = (lo < 0) & (up > 0)
            gap = torch.where(crossing, up * (-lo) / torch.where(crossing, up - lo, 1.0), 0.0)
            score = 1e-9 * gap
            if examples is not None and n.name in record and examples.numel():
                lam = record[n.name].flatten(1)                                    # [R, n]
                cost = (-lam).clamp(min=0) * gap[examples]
                score = score.index_add(0, examples, cost)
            out[n.name] = score.float()  # kept with every open domain: half the memory
        return out

    def _counterexamples(self, record: dict, gaps: torch.Tensor) -> None:
        """The corners of the box that minimise the open rows' bounds, checked on the network
        (those of the ``CANDIDATES`` rows furthest from a proof; ``gaps``: ``lower - goal`` ``[D, m]``)."""
        lam = record.get("input")
        if lam is None or not lam.numel():
            return
        gap = gaps[record["examples"], record["rows"]]
        worst = torch.argsort(gap)[:CANDIDATES]
        lo, hi = self.box.lo[0], self.box.hi[0]
        corners = torch.where(lam[worst, 0] > 0, lo, hi).reshape(len(worst), -1)
        self.check(corners.unique(dim=0).cpu().numpy())

    @staticmethod
    def _splittable(parents: Domains) -> torch.Tensor:
        """Whether each domain has an unsplit crossing unit (a positive score) ``[P]``."""
        return torch.stack([t.max(1).values for t in parents.scores.values()], 1).max(1).values > 0

    def _branch(self, parents: Domains) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Two children per parent (each splittable), split on its best-scoring unit; and the
        index of the ReLU each child split last ``[2P]``."""
        names = list(parents.scores)
        sizes = [parents.scores[k].shape[1] for k in names]
        scores = torch.cat([parents.scores[k] for k in names], 1)               # [P, total]
        unit = scores.argmax(1)
        P = len(parents)
        children = {}
        layer = torch.zeros(P, dtype=torch.long)
        offset = 0
        for k, size in zip(names, sizes):
            s = parents.signs[k].repeat(2, 1)
            mine = (unit >= offset) & (unit < offset + size)
            rows = mine.nonzero().flatten()
            cols = unit[rows] - offset
            s[rows, cols] = ACTIVE
            s[rows + P, cols] = INACTIVE
            children[k] = s
            layer[rows] = [n.name for n in self.relus].index(k)
            offset += size
        return children, layer.repeat(2)
