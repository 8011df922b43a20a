"""Hypothesis strategies: small random float64 torch networks (DAGs with skips) and input sets.

Every generated network is a :class:`DagNet`: a list of nodes computed in order, node ``i``
reading the *features* of earlier nodes (feature 0 is the input ``x``)::

    z_i = sum_{j in parents(i)} edge_ij(feat_j)          (combine "sum"; an edge may be the identity skip)
    z_i = edge_i(cat([feat_j for j in parents(i)], 1))   (combine "cat": dense / concat blocks)
    feat_i = post_i(act_i(z_i))                          (act: relu, leaky_relu, ...; post: MaxPool2d or none)

Edges are affine modules (Linear, Conv2d with random stride / padding / dilation / groups,
AvgPool2d followed by Conv2d, Flatten followed by Linear, Linear / Conv2d followed by
BatchNorm1d / BatchNorm2d with random running statistics, and :class:`MultiUse` edges: a
value read in several input slots of one node, Split outputs used unevenly, Slice / Pad /
Concat of one value), so
``z_i`` is an affine function of its parents' features and ``act_i`` is the only
nonlinearity. The tests rely on that: :meth:`DagNet.pre` evaluates the affine piece alone
(the exactness test takes its dense Jacobian), and :attr:`DagNet.bounded` lists the nodes
whose pre-activation ``z_i`` feeds a nonlinear op, in the order the fx trace meets them.

The last node is the output (no activation). Sizes are tiny (at most ~30 units per dense
layer, 3 x 7 x 7 per feature map) so that hundreds of examples run in seconds.
"""

from __future__ import annotations

import contextlib
import io
import random
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

from dualgraph import linalg
from dualgraph.input_sets import Box, InputSet, L2Ball, linf_ball

DTYPE = torch.float64
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "hardtanh", "abs", "softplus", "sin", "square", "max_pair", "self_product",
               "silu", "gelu", "softmax", "layer_norm", "hardsigmoid", "hardswish", "elu", "selu", "prelu")
SET_KINDS = ("linf", "linf01", "l2")


class Elementwise(nn.Module):
    """``fn(x)`` as a module (torch has no layer for abs, sin, x^2): fx traces through it,
    the ONNX exporter writes the function's op."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class LastAxisLayerNorm(nn.Module):
    """``F.layer_norm`` over the last axis, without weights. The axis's size is fixed at the
    first call (:meth:`DagNet.add` runs every node once): torch's ONNX exporter cannot write
    a traced ``x.shape[-1:]``, and fx cannot take ``int()`` of a traced size."""

    def __init__(self) -> None:
        super().__init__()
        self.width: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.width is None:
            self.width = int(x.shape[-1])
        return F.layer_norm(x, (self.width,))


def make_act(kind: str | None) -> nn.Module | None:
    if kind is None:
        return None
    return {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1), "tanh": nn.Tanh,
            "sigmoid": nn.Sigmoid, "hardtanh": lambda: nn.Hardtanh(-0.5, 1.0), "softplus": nn.Softplus,
            "abs": lambda: Elementwise(torch.abs), "sin": lambda: Elementwise(torch.sin),
            "square": lambda: Elementwise(lambda x: x ** 2),
            # a nonlinear op of two computed operands, neither an ancestor of the other
            "max_pair": lambda: Elementwise(lambda x: torch.maximum(x + 0.5, 0.5 - x)),
            # products of two variables (bilinear Mul): x * x, and SiLU as exported, x * sigmoid(x)
            "self_product": lambda: Elementwise(lambda x: x * x),
            "silu": lambda: Elementwise(lambda x: x * torch.sigmoid(x)),
            "gelu": nn.GELU,
            "softmax": lambda: nn.Softmax(dim=1),
            "layer_norm": LastAxisLayerNorm,
            # compositions (dualgraph.ops.composites); ONNX export writes each as one op
            "hardsigmoid": nn.Hardsigmoid, "hardswish": nn.Hardswish, "elu": lambda: nn.ELU(0.7), "selu": nn.SELU,
            "prelu": lambda: nn.PReLU(init=-0.3)}[kind]()


class DagNode(nn.Module):
    """Container of one node's modules; the logic lives in :class:`DagNet`."""

    def __init__(self, parents: list[int], combine: str, edges: list[nn.Module], skips: list[bool],
                 act: str | None, post: nn.Module | None) -> None:
        super().__init__()
        assert combine in ("sum", "cat")
        assert len(edges) == (1 if combine == "cat" else len(parents))
        self.parents, self.combine, self.skips, self.act_kind = list(parents), combine, list(skips), act
        self.edges = nn.ModuleList(edges)
        self.act = make_act(act)
        self.post = post


class DagNet(nn.Module):
    """A DAG network of :class:`DagNode` (see the module docstring)."""

    def __init__(self, input_shape: tuple[int, ...], kind: str) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.kind = kind
        self.dag = nn.ModuleList()
        self.feat_shapes: list[tuple[int, ...]] = [self.input_shape]
        self.pre_shapes: list[tuple[int, ...]] = [self.input_shape]

    # ---- building ---------------------------------------------------------------------------
    def add(self, parents, edges, *, combine="sum", skips=None, act=None, post=None) -> int:
        """Append a node; returns its feature index. Shapes are found by running it on zeros."""
        node = DagNode(parents, combine, edges, skips or [False] * len(edges), act, post).to(DTYPE)
        node.eval()
        self.dag.append(node)
        with torch.no_grad():
            feats = [torch.zeros(1, *s, dtype=DTYPE) for s in self.feat_shapes]
            z = self.pre(len(self.dag), feats)
            a = self._activate(node, z)
        self.pre_shapes.append(tuple(z.shape[1:]))
        self.feat_shapes.append(tuple(a.shape[1:]))
        return len(self.dag)

    # ---- evaluation -------------------------------------------------------------------------
    def pre(self, i: int, feats) -> torch.Tensor:
        """The affine piece of node ``i`` (1-based): ``z_i`` from ``feats[j]`` of its parents."""
        node = self.dag[i - 1]
        if node.combine == "cat":
            return node.edges[0](torch.cat([feats[j] for j in node.parents], 1))
        z = None
        for j, edge, skip in zip(node.parents, node.edges, node.skips):
            t = feats[j] if skip else edge(feats[j])
            z = t if z is None else z + t
        return z

    @staticmethod
    def _activate(node: DagNode, z: torch.Tensor) -> torch.Tensor:
        a = node.act(z) if node.act is not None else z
        return node.post(a) if node.post is not None else a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for i, node in enumerate(self.dag, start=1):
            feats.append(self._activate(node, self.pre(i, feats)))
        return feats[-1]

    def pre_activations(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """``z_i`` for every node ``i`` at inputs ``x``."""
        feats, out = [x], {}
        for i, node in enumerate(self.dag, start=1):
            out[i] = self.pre(i, feats)
            feats.append(self._activate(node, out[i]))
        return out

    # ---- facts the tests use ----------------------------------------------------------------
    @property
    def n_out(self) -> int:
        n = 1
        for d in self.feat_shapes[-1]:
            n *= d
        return n

    @property
    def bounded(self) -> list[int]:
        """Nodes whose pre-activation feeds a nonlinear op (an activation), in trace order."""
        return [i for i, node in enumerate(self.dag, start=1) if node.act is not None]

    @property
    def relu_only(self) -> bool:
        return all(n.act_kind in (None, "relu") and n.post is None for n in self.dag)

    def describe(self) -> str:
        parts = []
        for i, n in enumerate(self.dag, start=1):
            edges = ",".join("skip" if s else f"MultiUse.{e.kind}" if isinstance(e, MultiUse) else type(e).__name__
                             for e, s in zip(n.edges, n.skips))
            parts.append(f"{i}<-{n.parents}:{n.combine}[{edges}]{n.act_kind or ''}"
                         f"{'+' + type(n.post).__name__ if n.post is not None else ''}->{self.pre_shapes[i]}")
        return f"{self.kind}{self.input_shape}: " + "; ".join(parts)

    def __repr__(self) -> str:  # hypothesis prints falsifying examples with repr
        return f"DagNet({self.describe()})"


# ---- test-suite helpers ---------------------------------------------------------------------------

# ---- module helpers ---------------------------------------------------------------------------

def _scale(module: nn.Module, gain: float) -> nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight"):
                p.mul_(gain)
    return module


def _linear(n_in: int, n_out: int, gain: float, batchnorm: bool = False) -> nn.Module:
    lin = _scale(nn.Linear(n_in, n_out), gain)
    return nn.Sequential(lin, _batchnorm(nn.BatchNorm1d(n_out))) if batchnorm else lin


def _batchnorm(bn: nn.Module) -> nn.Module:
    """Random running statistics and affine parameters (inference mode uses them)."""
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


class MultiUse(nn.Module):
    """An affine edge ``inner(g(h))`` where ``g`` reads ``h`` in several input slots of one node
    or through a multi-output op, the graph shapes a single-use generator never makes:

    * ``add``: ``h + h``; ``sub``: ``h + (h - h)``; ``mulc``: ``h * c + h`` (Mul by a constant);
    * ``cat``: ``cat([h, h])`` (Concat of one value twice);
    * ``split``: ``a, b, *rest = split(h)`` used unevenly: ``cat([b, a + a, b])`` (a value used
      twice by one node, another output used by two nodes, the rest unused);
    * ``slicepad``: ``cat([h[:, :k], pad(h), h])`` (Slice, Pad and Concat of one value).

    ``kind`` and the split sizes are fixed at construction; :func:`multi_use` builds ``inner``
    for the resulting width (dense features) or channel count (feature maps)."""

    KINDS = ("add", "sub", "mulc", "cat", "split", "slicepad")

    def __init__(self, kind: str, sizes: list[int], pad: int, inner: nn.Module) -> None:
        super().__init__()
        self.kind, self.sizes, self.pad, self.inner = kind, list(sizes), pad, inner

    @staticmethod
    def width(kind: str, n: int, sizes: list[int], pad: int) -> int:
        """Width along dim 1 of ``g(h)`` for an ``h`` of width ``n``."""
        if kind == "cat":
            return 2 * n
        if kind == "split":
            return 2 * sizes[1] + sizes[0]
        if kind == "slicepad":
            return sizes[0] + 2 * n + 2 * pad
        return n

    def combine(self, h: torch.Tensor) -> torch.Tensor:
        k = self.kind
        if k == "add":
            return h + h
        if k == "sub":
            return h + (h - h)
        if k == "mulc":
            return h * 0.75 + h
        if k == "cat":
            return torch.cat([h, h], 1)
        if k == "split":
            parts = torch.split(h, self.sizes, dim=1)  # indexed: torch.fx cannot unpack a proxy
            a, b = parts[0], parts[1]
            return torch.cat([b, a + a, b], 1)
        # slicepad: pad dim 1 only (a zero-padded copy), so spatial shapes stay as they are
        pads = [0, 0] * (h.dim() - 2) + [self.pad, self.pad]
        return torch.cat([h[:, :self.sizes[0]], F.pad(h, pads), h], 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.inner(self.combine(h))


MULTI_USE_SHARE = 0.3
"""Share of edges built as :class:`MultiUse` (a value read twice by one node, Split outputs
used unevenly, Slice/Pad/Concat of one value)."""


def multi_use(rng: random.Random, n: int, make_inner) -> MultiUse:
    """A :class:`MultiUse` edge on features of width (or channels) ``n``; ``make_inner(width)``
    builds the affine module that follows."""
    kind = rng.choice(MultiUse.KINDS if n >= 2 else ("add", "sub", "mulc", "cat", "slicepad"))
    if kind == "split":
        a = rng.randint(1, n - 1)
        b = rng.randint(1, n - a)
        sizes = [a, b] + ([n - a - b] if n - a - b else [])
    else:
        sizes = [rng.randint(1, n)]
    pad = rng.randint(0, 1)
    return MultiUse(kind, sizes, pad, make_inner(MultiUse.width(kind, n, sizes, pad)))


# ---- network builders (structure and weights from one seed) ----------------------------------------
#
# Each builder takes a ``random.Random`` and derives everything from it; the strategies draw
# only the seed. With the few examples a fast suite can afford, this gives independent,
# diverse networks (hypothesis' mutations of structural draws mostly repeat one net), and a
# failure still names the architecture (``DagNet.describe``) and the seed.

def build_mlp(rng: random.Random, acts=("relu",), max_width: int = 12, max_depth: int = 3) -> DagNet:
    """Fully connected chains (a Linear sometimes followed by BatchNorm1d)."""
    n_in, depth = rng.randint(1, 6), rng.randint(1, max_depth)
    gain = rng.choice([1.0, 1.5, 2.0])
    with torch.random.fork_rng():
        torch.manual_seed(rng.randrange(2 ** 31))
        net = DagNet((n_in,), "mlp")
        prev, size = 0, n_in
        for _ in range(depth):
            w = rng.randint(1, max_width)
            if rng.random() < MULTI_USE_SHARE:
                edge = multi_use(rng, size, lambda width: _linear(width, w, gain))
            else:
                edge = _linear(size, w, gain, rng.random() < 0.25)
            prev = net.add([prev], [edge], act=rng.choice(acts))
            size = w
        net.add([prev], [_linear(size, rng.randint(1, 4), gain)])
    return net.eval()


def build_residual(rng: random.Random, acts=("relu",), max_width: int = 12) -> DagNet:
    """``x -> [stem] -> blocks a + W2 act(W1 a + b1) + b2 -> Linear``; the skip may start at x."""
    n_in = rng.randint(1, 6)
    stem = rng.random() < 0.6
    h = rng.randint(1, max_width) if stem else n_in
    gain = rng.choice([1.0, 1.5])
    with torch.random.fork_rng():
        torch.manual_seed(rng.randrange(2 ** 31))
        net = DagNet((n_in,), "residual")
        p = net.add([0], [_linear(n_in, h, gain)], act=rng.choice(acts)) if stem else 0
        for _ in range(rng.randint(1, 2)):
            inner = rng.randint(1, max_width)
            if rng.random() < MULTI_USE_SHARE:
                first = multi_use(rng, h, lambda width: _linear(width, inner, gain))
            else:
                first = _linear(h, inner, gain)
            q = net.add([p], [first], act=rng.choice(acts))
            p = net.add([p, q], [nn.Identity(), _linear(inner, h, gain)], skips=[True, False],
                        act=rng.choice(tuple(acts) + (None,)))
        net.add([p], [_linear(h, rng.randint(1, 4), gain)])
    return net.eval()


def build_dense(rng: random.Random, acts=("relu",), max_width: int = 10, max_nodes: int = 4) -> DagNet:
    """General DAGs: each node reads a random set of earlier features (always the previous one),
    concatenated (dense blocks) or summed through one Linear per parent."""
    n_in, k = rng.randint(1, 5), rng.randint(2, max_nodes)
    gain = rng.choice([1.0, 1.5])
    with torch.random.fork_rng():
        torch.manual_seed(rng.randrange(2 ** 31))
        net = DagNet((n_in,), "dense")
        for i in range(1, k + 2):
            parents = sorted(set(rng.sample(range(i), min(i, rng.randint(0, 2)))) | {i - 1})
            last = i == k + 1
            width = rng.randint(1, 4) if last else rng.randint(1, max_width)
            act = None if last else rng.choice(acts)
            sizes = [net.feat_shapes[j][0] for j in parents]
            if len(parents) > 1 and rng.random() < 0.5:
                net.add(parents, [_linear(sum(sizes), width, gain)], combine="cat", act=act)
            else:
                edges = [multi_use(rng, s, lambda w_in: _linear(w_in, width, gain))
                         if rng.random() < MULTI_USE_SHARE else _linear(s, width, gain) for s in sizes]
                net.add(parents, edges, act=act)
    return net.eval()


CNN_LAYERS = ("conv", "conv", "avgconv", "residual", "downsample", "concat", "multiuse")
"""The layer kinds of :func:`build_cnn`, "conv" twice as likely as the others."""


def build_cnn(rng: random.Random, acts=("relu",), maxpool: bool = False, max_channels: int = 3,
              kinds: tuple[str, ...] = CNN_LAYERS, layers: tuple[int, int] = (1, 3),
              sizes: tuple[int, int] = (4, 7), pool_chance: float = 0.5) -> DagNet:
    """Small CNNs: convolutions (random kernel / stride / padding / dilation / groups), average
    pooling, residual conv blocks (identity or strided convolutional shortcut), channel
    concatenation, optional MaxPool2d; Flatten + Linear head. ``kinds``: the layer kinds drawn
    from, ``layers``: how many, ``sizes``: the input's height and width (inclusive ranges),
    ``pool_chance``: how likely a MaxPool2d follows an activation (with ``maxpool``)."""
    c_in, hw = rng.randint(1, 2), rng.randint(*sizes)
    gain = rng.choice([1.0, 1.5])
    with torch.random.fork_rng():
        torch.manual_seed(rng.randrange(2 ** 31))
        net = DagNet((c_in, hw, hw), "cnn")
        prev = 0
        for _ in range(rng.randint(*layers)):
            cin, size = net.feat_shapes[prev][0], net.feat_shapes[prev][1]
            k, s, p, d = rng.randint(1, 3), rng.randint(1, 2), rng.randint(0, 1), rng.randint(1, 2)
            if _conv_out(size, k, s, p, d) < 1:
                k, s, p, d = 1, 1, 0, 1
            cout, groups = rng.randint(1, max_channels), 1
            g = next((g for g in (3, 2) if cin % g == 0), 1)
            if g > 1 and rng.random() < 0.5:
                cout, groups = g, g
            act = rng.choice(acts)
            kind = rng.choice(kinds)
            if kind == "avgconv" and size >= 2:
                pad = rng.randint(0, 1) if size >= 3 else 0
                pool = nn.AvgPool2d(2, stride=rng.randint(1, 2), padding=pad,
                                    count_include_pad=rng.random() < 0.5)
                cur = net.add([prev], [nn.Sequential(pool, _scale(nn.Conv2d(cin, cout, 1), gain))], act=act)
            elif kind == "residual":
                c = rng.randint(1, max_channels)
                inner = net.add([prev], [_scale(nn.Conv2d(cin, c, 3, padding=1), gain)], act=act)
                cur = net.add([prev, inner], [nn.Identity(), _scale(nn.Conv2d(c, cin, 3, padding=1), gain)],
                              skips=[True, False], act=rng.choice(tuple(acts) + (None,)))
            elif kind == "downsample" and size >= 2:
                # a strided block with a convolutional shortcut (ResNet's downsampling block): its
                # two branches' windows differ in size and padding where they meet again
                c, k_main, k_short = rng.randint(1, max_channels), rng.choice([1, 3]), rng.choice([1, 3])
                inner = net.add([prev], [_scale(nn.Conv2d(cin, c, k_main, stride=2, padding=k_main // 2), gain)],
                                act=act)
                shortcut = _scale(nn.Conv2d(cin, cout, k_short, stride=2, padding=k_short // 2), gain)
                cur = net.add([prev, inner], [shortcut, _scale(nn.Conv2d(c, cout, 3, padding=1), gain)],
                              act=rng.choice(tuple(acts) + (None,)))
            elif kind == "convchain":
                # two convolutions with nothing between: a transpose right after a transpose
                c = rng.randint(1, max_channels)
                edge = nn.Sequential(_scale(nn.Conv2d(cin, c, 3, padding=1), gain),
                                     _scale(nn.Conv2d(c, cout, k, stride=s, padding=p, dilation=d), gain))
                cur = net.add([prev], [edge], act=act)
            elif kind == "concat":
                c = rng.randint(1, max_channels)
                a = net.add([prev], [_scale(nn.Conv2d(cin, c, 3, padding=1), gain)], act=act)
                cur = net.add([prev, a], [_scale(nn.Conv2d(cin + c, cout, k, stride=s, padding=p, dilation=d),
                                                 gain)], combine="cat", act=act)
            elif kind == "multiuse":
                edge = multi_use(rng, cin, lambda c: _scale(nn.Conv2d(c, cout, k, stride=s, padding=p, dilation=d),
                                                            gain))
                cur = net.add([prev], [edge], act=act)
            else:
                conv = _scale(nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=groups), gain)
                edge = nn.Sequential(conv, _batchnorm(nn.BatchNorm2d(cout))) if rng.random() < 0.25 else conv
                cur = net.add([prev], [edge], act=act)
            if maxpool and net.dag[cur - 1].act is not None and net.feat_shapes[cur][1] >= 2 and rng.random() < pool_chance:
                node = net.dag[cur - 1]
                ks = min(rng.randint(2, 3), net.feat_shapes[cur][1])
                node.post = nn.MaxPool2d(ks, stride=rng.randint(1, 2), padding=min(rng.randint(0, 1), ks // 2))
                with torch.no_grad():
                    out = net._activate(node, torch.zeros(1, *net.pre_shapes[cur], dtype=DTYPE))
                net.feat_shapes[cur] = tuple(out.shape[1:])
            prev = cur
        n_flat = 1
        for dim in net.feat_shapes[prev]:
            n_flat *= dim
        net.add([prev], [nn.Sequential(nn.Flatten(), _scale(nn.Linear(n_flat, rng.randint(1, 4)), gain))])
    return net.eval()


SEEDS = st.integers(0, 2 ** 32 - 1)


def _nets(builders) -> st.SearchStrategy[DagNet]:
    """Networks from a seed: the seed also picks one of ``builders``."""
    def build(seed: int) -> DagNet:
        rng = random.Random(seed)
        return rng.choice(builders)(rng)
    return SEEDS.map(build)


def mlp_nets(acts=("relu",), **kw) -> st.SearchStrategy[DagNet]:
    return _nets([lambda rng: build_mlp(rng, acts, **kw)])


def residual_nets(acts=("relu",), **kw) -> st.SearchStrategy[DagNet]:
    return _nets([lambda rng: build_residual(rng, acts, **kw)])


def dense_nets(acts=("relu",), **kw) -> st.SearchStrategy[DagNet]:
    return _nets([lambda rng: build_dense(rng, acts, **kw)])


def cnn_nets(acts=("relu",), **kw) -> st.SearchStrategy[DagNet]:
    return _nets([lambda rng: build_cnn(rng, acts, **kw)])


def residual_cnn_nets(**kw) -> st.SearchStrategy[DagNet]:
    """ReLU CNNs of two to four residual blocks (identity or convolutional shortcuts), on
    maps large enough that convolution windows stay smaller than them for a while."""
    return _nets([lambda rng: build_cnn(rng, kinds=("residual", "downsample", "residual", "conv"), layers=(2, 4),
                                        sizes=(6, 10), **kw)])


def conv_chain_nets(**kw) -> st.SearchStrategy[DagNet]:
    """ReLU CNNs where convolutions also follow each other directly (``"convchain"``) and
    residual sums without an activation feed the next block: the patch path meets a
    transpose right after a transpose or a sum of them."""
    return _nets([lambda rng: build_cnn(rng, kinds=("convchain", "residual", "downsample", "conv"), layers=(2, 4),
                                        sizes=(6, 10), **kw)])


def relu_nets(cnn: bool = True) -> st.SearchStrategy[DagNet]:
    """ReLU-only networks of every family (the exact and LP tests need them)."""
    fams = [build_mlp, build_residual, build_dense] + ([build_cnn] if cnn else [])
    return _nets(fams)


def any_nets() -> st.SearchStrategy[DagNet]:
    """Every family with every activation, MaxPool2d included (and ReLU-only nets)."""
    return _nets([lambda rng: build_mlp(rng, ACTIVATIONS), lambda rng: build_residual(rng, ACTIVATIONS),
                  lambda rng: build_dense(rng, ACTIVATIONS),
                  lambda rng: build_cnn(rng, ACTIVATIONS, maxpool=True),
                  lambda rng: build_cnn(rng, ("relu",), maxpool=True),
                  build_mlp, build_residual, build_dense])


def affine_pieces(net: DagNet) -> dict[int, tuple[dict[int, torch.Tensor], torch.Tensor, str | None]]:
    """Dense form of every node ``i``: ``W_ij`` per parent ``j`` ([n_i, n_j], flattened features),
    bias ``b_i`` and activation, so that ``z_i = sum_j W_ij feat_j + b_i`` (from the module itself,
    by the Jacobian of its affine piece ``DagNet.pre``; independent of dualgraph)."""
    pieces = {}
    for i, node in enumerate(net.dag, start=1):
        parents = list(node.parents)
        zeros = tuple(torch.zeros(1, *net.feat_shapes[j], dtype=DTYPE) for j in parents)

        def piece(*ps, i=i, parents=parents):
            return net.pre(i, dict(zip(parents, ps))).reshape(-1)

        with torch.no_grad():
            b = piece(*zeros)
        jac = torch.autograd.functional.jacobian(piece, zeros, vectorize=True)
        W = {j: J.reshape(b.numel(), -1) for j, J in zip(parents, jac)}
        pieces[i] = (W, b, node.act_kind)
    return pieces


# ---- input sets ---------------------------------------------------------------------------------

@dataclass
class SetCase:
    kind: str          # "linf", "linf01" (L-inf ball intersected with [0, 1]) or "l2"
    center: torch.Tensor
    eps: float

    def make(self) -> InputSet:
        if self.kind == "linf":
            return linf_ball(self.center, self.eps)
        if self.kind == "linf01":
            return linf_ball(self.center, self.eps, clip=(0.0, 1.0))
        return L2Ball(self.center, self.eps)

    def __repr__(self) -> str:
        return f"SetCase({self.kind}, eps={self.eps}, center={self.center.flatten(1)[:, :4].tolist()}...)"


def input_sets(input_shape: tuple[int, ...], kinds=SET_KINDS, batch: int = 2) -> st.SearchStrategy[SetCase]:
    """A batch of input sets around random centres (in [0, 1] for the clipped kind), from a seed."""
    def build(seed: int) -> SetCase:
        rng = random.Random(seed)
        kind = rng.choice(kinds)
        eps = rng.choice([0.0, 0.01, 0.1, 0.3, 0.5, 1.0] if kind != "l2" else [0.0, 0.1, 0.5, 1.0, 2.0])
        g = torch.Generator().manual_seed(rng.randrange(2 ** 31))
        if kind == "linf01":
            center = torch.rand(batch, *input_shape, generator=g, dtype=DTYPE)
        else:
            center = torch.randn(batch, *input_shape, generator=g, dtype=DTYPE)
        return SetCase(kind, center, eps)
    return SEEDS.map(build)


def box_corners(box: Box, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random vertices of each example's box: ``[n, B, *shape]``."""
    pick = torch.rand((n, *box.lo.shape), generator=generator, dtype=box.lo.dtype) < 0.5
    return torch.where(pick, box.hi, box.lo)


def sample_points(input_set: InputSet, n: int, generator: torch.Generator) -> torch.Tensor:
    """Random points of the set plus extreme ones (box vertices, L2 sphere points): ``[m, B, *shape]``."""
    pts = [input_set.sample(n, generator), input_set.center.unsqueeze(0)]
    if isinstance(input_set, Box):
        pts.append(box_corners(input_set, n, generator))
    else:
        g = torch.randn((n, *input_set.center.shape), generator=generator, dtype=input_set.center.dtype)
        g = g / g.flatten(2).norm(dim=-1).clamp(min=1e-30).view(n, -1, *[1] * (g.dim() - 2))
        pts.append(input_set.center + input_set.eps * g * (1 - 1e-12))
    return torch.cat(pts)


# ---- conversion to the IR -----------------------------------------------------------------------

def example_input(net: DagNet, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *net.input_shape, dtype=DTYPE, generator=torch.Generator().manual_seed(0))


def to_ir(net: DagNet, via: str = "fx"):
    """The IR graph of ``net``: through torch.fx (default), torch.fx then the simplification
    passes (``"fx+simplify"``), or an ONNX export + frontends.onnx (``"onnx"``)."""
    if via == "fx":
        from dualgraph.frontends.fx import load_module
        return load_module(net, example_input(net))
    if via == "fx+simplify":
        from dualgraph.frontends.fx import load_module
        from dualgraph.passes.pipeline import simplify
        return simplify(load_module(net, example_input(net)))
    if via == "onnx":
        import onnx

        from dualgraph.frontends.onnx import load_onnx
        buf = io.BytesIO()
        torch.onnx.export(net, (example_input(net),), buf, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
        return load_onnx(onnx.load_from_string(buf.getvalue()))
    raise ValueError(via)


def drawn_conv_transposes(data):
    """Draw one of the ways convolution transposes run -- strided ones phase by phase
    (:func:`dualgraph.linalg.conv_transpose2d`, whatever the dtype and filter) or by the
    library's kernel, small filters by taps or not (``TAPS_MAX_INPUTS``) -- and return a
    context manager factory that runs a block that way (each call a fresh one)."""
    phases = data.draw(st.booleans(), label="strided conv transposes by phases")
    taps = data.draw(st.booleans(), label="small filters' transposes by taps")

    @contextlib.contextmanager
    def patched():
        with mock.patch.object(linalg, "by_phases", lambda x, w, stride: phases and tuple(stride) != (1, 1)), \
                mock.patch.object(linalg, "TAPS_MAX_INPUTS", linalg.TAPS_MAX_INPUTS if taps else 0):
            yield
    return patched
