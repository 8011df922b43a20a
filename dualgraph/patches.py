"""Backward passes from a feature map's units, kept as local windows ("patches").

The bounds of a feature map (a Conv output, a residual block's sum) need one dual row per
unit ``(c, p)`` (channel, position). After the transpose of a Conv, row ``(c, p)`` is the
filter ``W[c]`` placed at the window of position ``p``; after further convolutions,
elementwise layers and residual blocks (and max pools) it is still zero outside a window of the input.
Storing only the window, ``[b, P, C_t, C, K, K]`` (position, target channel, channel,
window), instead of a dense ``[b, C_t*P, C, H, W]`` row does the same arithmetic as the
dense path on ``K*K`` instead of ``H*W`` entries.

Window geometry: row ``p = (ph, pw)`` covers rows ``ph*S - Pd .. ph*S - Pd + K - 1`` of
the current value (likewise columns). A pass starts from the identity rows of the target,
windows of one pixel (``K = 1, S = 1, Pd = 0``). Through a Conv with stride ``s``, padding
``q`` and kernel ``k``: ``K -> (K-1)s + k``, ``S -> S s``, ``Pd -> Pd s + q`` (a MaxPool's
window likewise, :func:`through_max_pool`). Entries that
fall outside the value (its zero padding) count as zero, as the dense rows have no such
entries: they are masked before the next transpose (:meth:`Patches.masked`), and every other
use multiplies them by windows of a map, which are zero there. Elementwise layers multiply
by their slopes' windows; the sum of two variables (a residual block's ``Add``) passes the
rows to both operands unchanged; where the two branches meet again (the dual graph's fan-out
sum at the block's input) their windows are placed on a common window of the same stride
(:func:`aligned_sum`). The input term takes the windows of the input set's centre and radius. Anything else, or windows as large as the
value itself, converts the patches to dense rows and the ordinary dual layers continue.

When only some units need exact bounds (``BoundConfig.prune_stable``), :func:`select`
keeps those rows as patches ``[U, 1, 1, C, K, K]`` with the example and position of
each row in ``rows``; windows of per-example tensors are then taken row by row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .dual_registry import ElementwiseRule, const_args, dual_rule
from .ir import Node
from .ops.common import window
from .linalg import conv_transpose2d, norm_upper, tensor_key


@dataclass
class Patches:
    data: torch.Tensor        # [b, P, C_t, C, K, K]
    kernel: int
    stride: int
    padding: int
    out_hw: tuple[int, int]   # positions of the target: P = Ho * Wo
    rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (example, position) per row, after select
    clean: bool = True        # entries outside the value are zero (see masked)

    @property
    def positions(self) -> int:
        return self.out_hw[0] * self.out_hw[1]

    def windows(self, t: torch.Tensor) -> torch.Tensor:
        """Windows of ``t`` ``[B, C, H, W]`` for every position: ``[B, P, 1, C, K, K]``
        (after :func:`select`: each row's own window, ``[U, 1, 1, C, K, K]``)."""
        B, C, H, W = t.shape
        Ho, Wo = self.out_hw
        K, S, Pd = self.kernel, self.stride, self.padding
        if self.rows is not None and B * Ho * Wo > 4 * len(self.rows[1]):
            # few rows for many windows: gather each row's own window (entries off the map are 0)
            examples, pos = self.rows
            examples = examples if B > 1 else torch.zeros_like(pos)
            steps = torch.arange(K, device=t.device)
            ys = ((pos // Wo) * S - Pd).unsqueeze(1) + steps                  # [U, K]
            xs = ((pos % Wo) * S - Pd).unsqueeze(1) + steps
            inside = ((ys >= 0) & (ys < H)).unsqueeze(2) & ((xs >= 0) & (xs < W)).unsqueeze(1)
            win = t[examples.view(-1, 1, 1), :, ys.clamp(0, H - 1).unsqueeze(2), xs.clamp(0, W - 1).unsqueeze(1)]
            win = win.permute(0, 3, 1, 2) * inside.unsqueeze(1).to(t.dtype)  # [U, C, K, K]
            return win.reshape(-1, 1, 1, C, K, K)
        need_h, need_w = (Ho - 1) * S + K, (Wo - 1) * S + K
        t = F.pad(t, (Pd, need_w - W - Pd, Pd, need_h - H - Pd))  # negative amounts crop
        # a strided view instead of F.unfold, which is two orders of magnitude slower on CPU here
        u = t.unfold(2, K, S).unfold(3, K, S)                     # [B, C, Ho, Wo, K, K]
        u = u.permute(0, 2, 3, 1, 4, 5).reshape(B, Ho * Wo, 1, C, K, K)
        if self.rows is not None:  # each row's window among all of them
            examples, pos = self.rows
            return u[examples if B > 1 else 0, pos].view(-1, 1, 1, C, K, K)
        return u

    def take_rows(self, which: slice | torch.Tensor) -> Patches:
        """Some of the selected units (after :func:`select`)."""
        return replace(self, data=self.data[which], rows=(self.rows[0][which], self.rows[1][which]))

    def masked(self, shape_chw: tuple[int, int, int]) -> Patches:
        """The patches with the entries outside a value of shape ``(C, H, W)`` (its padding) zeroed.

        A Conv's transpose leaves values in those entries (``clean`` is then False). Nothing
        reads them but a sum over whole windows: every other use multiplies the entries by
        windows of a map, which are zero there (an elementwise step's slopes and offsets, the
        input set, the rounding weights, the pruning cut's box), and dense rows are cropped to
        the map (:meth:`to_dense`). So the masking waits for the next transpose (whose bias
        term and spread would take them in) or an L2 input term, and an elementwise step makes
        the rows clean again for free (``tests/test_bounds_exact.py`` fills them with noise)."""
        if self.clean:
            return self
        ones = self.data.new_ones(1, 1, *shape_chw[1:])
        return replace(self, data=self.data * self.windows(ones), clean=True)

    def to_dense(self, shape_chw: tuple[int, int, int]) -> torch.Tensor:
        """Dense rows ``[b, C_t * P, C, H, W]`` (after :func:`select`: ``[U, C_t, C, H, W]``)."""
        C, H, W = shape_chw
        b, _, Ct, _, K, _ = self.data.shape
        Ho, Wo = self.out_hw
        S, Pd = self.stride, self.padding
        full_h, full_w = max(H + Pd, (Ho - 1) * S + K), max(W + Pd, (Wo - 1) * S + K)
        if self.rows is not None:  # C_t rows per selected unit (2 once forked into both signs)
            dense = self.data.new_zeros(b, Ct, C, full_h, full_w)
            for p in self.rows[1].unique().tolist():
                y, x = (p // Wo) * S, (p % Wo) * S
                at = self.rows[1] == p
                dense[at, :, :, y:y + K, x:x + K] = self.data[at, 0]
            return dense[..., Pd:Pd + H, Pd:Pd + W]
        dense = self.data.new_zeros(b, Ct, self.positions, C, full_h, full_w)
        for p in range(self.positions):
            y, x = (p // Wo) * S, (p % Wo) * S
            dense[:, :, p, :, y:y + K, x:x + K] = self.data[:, p]
        dense = dense[..., Pd:Pd + H, Pd:Pd + W]
        return dense.reshape(b, Ct * self.positions, C, H, W)


def conv_geometry(node: Node) -> tuple[int, int] | None:
    """``(stride, padding)`` if ``node`` is a 2-D, ungrouped, undilated conv with square,
    symmetric geometry (what the patch path handles), else None."""
    if node.op != ("", "Conv") or len(node.inputs) < 2 or not node.inputs[1].is_const:
        return None
    w = node.inputs[1].const
    if w.dim() != 4 or w.shape[2] != w.shape[3] or int(node.attrs.get("group", 1)) != 1:
        return None
    g = window(node, node.inputs[0].unit_shape[1:], w.shape[2:])
    if set(g.dilations) != {1} or len(set(g.begins + g.ends)) != 1 or len(set(g.strides)) != 1:
        return None
    return g.strides[0], g.begins[0]


def identity(shape_chw: tuple[int, int, int], like: torch.Tensor) -> Patches:
    """The identity rows of a value of shape ``(C, H, W)``: one row per unit ``(c, p)``, a
    one-pixel window holding ``e_c`` at position ``p``."""
    C, H, W = shape_chw
    eye = torch.eye(C, dtype=like.dtype, device=like.device)
    return Patches(eye.view(1, 1, C, C, 1, 1).expand(1, H * W, C, C, 1, 1), 1, 1, 0, (H, W))


def aligned_sum(parts: list[Patches]) -> Patches | None:
    """The sum of patches of the same rows in one value (the contributions a fan-out sum
    adds up), each padded with zeros onto the smallest window holding all of theirs; None
    when their strides differ (the windows of one row then do not move together).

    A window with padding ``Pd`` and size ``K`` covers ``-Pd .. K - Pd - 1`` around
    ``p * S``; the common one runs from ``-max Pd`` to ``max (K - Pd) - 1``."""
    stride = parts[0].stride
    if any(p.stride != stride for p in parts):
        return None
    pad = max(p.padding for p in parts)
    kernel = pad + max(p.kernel - p.padding for p in parts)
    total = None
    for p in parts:
        before = pad - p.padding
        after = kernel - p.kernel - before
        data = F.pad(p.data, (before, after, before, after)) if before or after else p.data
        total = data if total is None else total + data
    return replace(parts[0], data=total, kernel=kernel, padding=pad, clean=all(p.clean for p in parts))


def covers_value(p: Patches, shape_chw) -> bool:
    """Whether ``p``'s windows are at least as large as the value they live in: dense rows
    then do the same work with less bookkeeping."""
    return p.kernel * p.kernel >= shape_chw[1] * shape_chw[2]


def sum_signs(node: Node) -> tuple[float, float] | None:
    """``(1, 1)`` for an ``Add``, ``(1, -1)`` for a ``Sub`` of two variables of the output's
    shape (a residual block's sum; its dual passes ``lam`` to both operands, the second one
    negated for ``Sub``), else None."""
    signs = {("", "Add"): (1.0, 1.0), ("", "Sub"): (1.0, -1.0)}.get(node.op)
    if signs is None or len(node.inputs) != 2 or any(v is None or v.is_const for v in node.inputs):
        return None
    shape = node.output.unit_shape
    return signs if all(v.unit_shape == shape for v in node.inputs) else None


def starts_on_patches(target) -> bool:
    """Whether backward passes from ``target``'s units start on patches: a feature map
    ``(C, H, W)`` produced by a convolution or by a residual block's sum."""
    producer = target.producer
    return (len(target.unit_shape) == 3 and producer is not None
            and (conv_geometry(producer) is not None or sum_signs(producer) is not None))


def window_geometry(target, ancestors: list[Node], enabled: bool = True) -> dict:
    """Per value a backward pass from ``target`` reaches (``target`` and the variable inputs
    of ``ancestors``, its producers in topological order): the geometry ``(kernel, stride,
    padding)`` of the windows its rows occupy on the patch path, or None where they are dense.
    The static mirror of :class:`~dualgraph.dual_run._PatchPass`'s rules.

    A row starts as one pixel (:func:`starts_on_patches`); through a convolution the window
    grows as :func:`through_conv` says; elementwise ops and residual sums keep it; a value read
    in several places gets the common window of its consumers' (:func:`aligned_sum`; windows
    of two strides do not add up: dense). Once a window covers its map, or anything else is
    reached, the rows are dense, and so are they for every value before it."""
    window: dict = {}
    if enabled and starts_on_patches(target) and target.unit_shape[1] * target.unit_shape[2] > 1:
        window[target] = (1, 1, 0)
    for node in reversed(ancestors):
        out = node.outputs[0]
        geom = window.get(out)
        if geom is not None and (len(node.outputs) != 1 or len(out.unit_shape) != 3
                                 or geom[0] * geom[0] >= out.unit_shape[1] * out.unit_shape[2]):
            geom = window[out] = None
        if geom is not None:
            kernel, stride, pad = geom
            conv, pool = conv_geometry(node), pool_geometry(node)
            if conv is not None:
                geom = ((kernel - 1) * conv[0] + node.inputs[1].const.shape[-1], stride * conv[0],
                        pad * conv[0] + conv[1])
            elif pool is not None:
                geom = ((kernel - 1) * pool[1] + pool[0], stride * pool[1], pad * pool[1] + pool[2])
            elif sum_signs(node) is None and not isinstance(dual_rule(node), ElementwiseRule):
                geom = None
        for v in node.var_inputs:
            if v not in window:
                window[v] = geom
                continue
            old = window[v]
            if old is None or geom is None or old[1] != geom[1]:
                window[v] = None
            else:
                pad = max(old[2], geom[2])
                window[v] = (pad + max(old[0] - old[2], geom[0] - geom[2]), geom[1], pad)
    return window


def window_shares(target, ancestors: list[Node], enabled: bool = True) -> dict:
    """Per value a backward pass from ``target`` reaches: the share ``K^2 / (H W)`` of its
    units that one row's window covers (:func:`window_geometry`), 1 for dense rows."""
    shares = {}
    for v, geom in window_geometry(target, ancestors, enabled).items():
        shares[v] = 1.0 if geom is None else min(1.0, geom[0] * geom[0] / (v.unit_shape[1] * v.unit_shape[2]))
    for node in ancestors:  # values no pass reaches on patches
        for v in node.outputs:
            shares.setdefault(v, 1.0)
    return shares


def widest_row(target, ancestors: list[Node]) -> int:
    """Elements of the largest part of one backward row from ``target``'s units, over the
    values it reaches (windows where :func:`window_shares` puts them, dense elsewhere)."""
    return max(1, int(max(v.numel * share for v, share in window_shares(target, ancestors).items())))


def through_sum(p: Patches, node: Node) -> list[Patches]:
    """The dual of a sum of two variables (:func:`sum_signs`): the rows of each operand."""
    first, second = sum_signs(node)
    return [p if first == 1 else replace(p, data=-p.data), p if second == 1 else replace(p, data=-p.data)]


MAX_DENSE_TRANSPOSE = 1 << 22
"""Largest window-to-window matrix (entries) used for a Conv transpose on patches."""


def by_matrix(kernel: int, new_kernel: int, conv_kernel: int, channels_out: int, entries: int,
              dtype: torch.dtype) -> bool:
    """Whether :func:`through_conv` takes ``kernel``-pixel windows to ``new_kernel``-pixel ones
    by a product with the window-to-window matrix (``entries`` entries) rather than by
    ``conv_transpose2d`` (``conv_kernel``: the convolution's kernel; ``channels_out``: the
    transpose's output channels).

    The matrix does ``(new_kernel / conv_kernel)^2`` times the convolution's arithmetic, at a
    far higher rate per multiplication, and the convolution's rate drops with few output
    channels. Measured here (float32, one thread, this project's 2-core VM; time of the matrix
    over the convolution's): a stride-2 4x4 stem to 3 channels: 0.08 / 0.3 / 0.6 / 1.1 / 1.9 for
    1 / 5 / 7 / 9 / 11-pixel windows; 3x3 to 16 channels: 0.5 / 0.9 / 1.9 / 2.9 for 1 / 3 / 5 / 7;
    1x1 to 16 channels: 0.4 / 1.2 / 2.8 for 1 / 3 / 5; 3x3 to 32 or 64 channels, 3-pixel
    windows: 1.6-2.0. Rule: the matrix where it adds no arithmetic, or at most ``48 /
    channels_out`` times the convolution's; always in float64 (no fast convolution kernels
    on CPU), up to ``MAX_DENSE_TRANSPOSE`` entries."""
    if entries > MAX_DENSE_TRANSPOSE:
        return False
    extra = (new_kernel / conv_kernel) ** 2
    return dtype == torch.float64 or extra == 1 or extra <= 48 / channels_out


def through_conv(p: Patches, node: Node, cache: dict | None = None) -> tuple[Patches, torch.Tensor | float]:
    """Transpose of a Conv on patches (``p`` lives in the conv's output space).

    The map from a ``[C, K, K]`` window to a ``[C', K', K']`` window is a small fixed
    matrix; a product with it beats ``conv_transpose2d`` on many tiny images where it adds
    little arithmetic (:func:`by_matrix`). It is built once (per node, window size, dtype and
    device; kept in ``cache``) unless the weights need gradients.
    """
    stride, pad = conv_geometry(node)
    p = p.masked(node.output.unit_shape)
    args = const_args(node, p.data)
    w, bias = args[1], (args[2] if len(args) > 2 else None)
    b, P, Ct, C, K, _ = p.data.shape
    offset: torch.Tensor | float = 0.0
    if bias is not None:  # sum over the window of lam * bias[channel]; padding entries are already zero
        offset = _rows(torch.einsum("bptckl,c->bpt", p.data, bias))
    Kn, Cn = (K - 1) * stride + w.shape[2], w.shape[1]
    rows = p.data.reshape(b * P * Ct, C * K * K)
    if by_matrix(K, Kn, w.shape[2], Cn, C * K * K * Cn * Kn * Kn, w.dtype):
        raw = node.inputs[1].const  # identity and version: an edited weight invalidates the entry
        key = (node.name, K, w.dtype, w.device, tensor_key(raw))
        T = None if cache is None or w.requires_grad else cache.get(key)
        if T is None:
            basis = torch.eye(C * K * K, dtype=w.dtype, device=w.device).view(-1, C, K, K)
            T = F.conv_transpose2d(basis, w, stride=stride).reshape(C * K * K, Cn * Kn * Kn)
            if cache is not None and not w.requires_grad:
                cache[key] = T
        x = rows @ T
    else:
        x = conv_transpose2d(rows.view(-1, C, K, K), w, stride=(stride, stride))
    return replace(p, data=x.view(b, P, Ct, Cn, Kn, Kn), kernel=Kn, stride=p.stride * stride,
                   padding=p.padding * stride + pad, clean=False), offset


def pool_geometry(node: Node) -> tuple[int, int, int] | None:
    """``(kernel, stride, padding)`` if ``node`` is a 2-D MaxPool with square, symmetric
    geometry, no dilation and no ``ceil_mode`` (what the patch path handles), else None."""
    if node.op != ("", "MaxPool") or len(node.inputs[0].unit_shape) != 3 or node.attrs.get("ceil_mode", 0):
        return None
    g = window(node, node.inputs[0].unit_shape[1:])
    if (len(set(g.kernel)) != 1 or set(g.dilations) != {1} or len(set(g.begins + g.ends)) != 1
            or len(set(g.strides)) != 1):
        return None
    return g.kernel[0], g.strides[0], g.begins[0]


def through_max_pool(p: Patches, node: Node, bounds) -> tuple[Patches, torch.Tensor]:
    """The MaxPool dual layer on patches (``p`` in the pool's output space): each window entry's
    ``lam+`` goes to the pool window's entry of the lower line and ``lam- * a`` to the entry of
    the upper line (:func:`dualgraph.ops.pooling.max_pool_lines`), one kernel offset at a time
    into the strided entries of the input's window, which grows as a convolution's does
    (``K -> (K-1)s + k``). Returns the patches and the lower offsets ``lam- . b``, ``[B, rows]``.
    Entries outside the pooled map meet windows of maps, zero there, so the result is clean."""
    from .ops.pooling import max_pool_lines
    k, stride, pad = pool_geometry(node)
    k_lo, k_up, slope, offset = max_pool_lines(node, bounds)
    positive = p.data.clamp(min=0)
    negative = p.data - positive
    b, P, Ct, C, K, _ = p.data.shape
    Kn, span = (K - 1) * stride + k, (K - 1) * stride + 1
    examples = b if p.rows is not None else max(b, k_lo.shape[0])  # rows shared by the batch fan out
    data = p.data.new_zeros(examples, P, Ct, C, Kn, Kn)
    for entry in range(k * k):
        y, x = divmod(entry, k)
        to_lower = p.windows((k_lo == entry).to(p.data.dtype))
        to_upper = p.windows(torch.where(k_up == entry, slope, 0.0))
        # one of the two terms is an exact zero (a row's entry has one sign), as on dense rows
        data[..., y:y + span:stride, x:x + span:stride] += torch.addcmul(negative * to_upper, positive, to_lower)
    lower = _window_dot(negative, p.windows(offset))
    return replace(p, data=data, kernel=Kn, stride=p.stride * stride, padding=p.padding * stride + pad,
                   clean=True), lower


def through_elementwise(p: Patches, node: Node, rule: ElementwiseRule, bounds, config):
    """An elementwise dual layer on patches: slopes and offsets are taken window-wise."""
    r = rule.relaxation(node, bounds, config)
    linear = rule.linear(node, config)
    like = bounds.lower

    def win(t):
        return p.windows(t if torch.is_tensor(t) else torch.full_like(like, float(t)))

    data = p.data
    if linear:
        centre, absolute = relaxation_terms(p, r)
        return replace(p, data=data * win(r.a_lo), clean=True), centre - absolute, centre + absolute
    return _relaxation_step(p, win(r.a_lo), win(r.a_up), r.b_lo, r.b_up, win)


def _relaxation_step(p: Patches, a_lo: torch.Tensor, a_up: torch.Tensor, b_lo, b_up,
                     win) -> tuple[Patches, torch.Tensor, None]:
    """A relaxation's dual step on patches: ``lam_in = lam+ * a_lo + lam- * a_up`` (the slopes
    as windows) and the lower offsets ``lam+ . b_lo + lam- . b_up`` for every row, ``[B, rows]``,
    as window dot products (``win``: windows of an offset; ReLU's lower offset is the number 0,
    no term). The signed parts of ``lam`` are taken once for both. In ``lam_in`` one of the two
    terms is an exact zero, so the fused multiply-add gives exactly the one product
    ``lam * slope`` (one rounding, as the rounding allowance assumes); ``torch.where`` on the
    sign would cost 2-3x these passes on this project's CPU build. The positive part is
    ``lam - lam-`` (exactly ``max(lam, 0)``, one pass fewer than a second clamp), so that at
    ``lam = 0`` the slopes' gradient takes the negative side alone, and the offsets' is their
    mean: the subgradients dense rows take (:func:`dualgraph.dual_registry._by_sign`,
    ``lam . mid - |lam| . gap``), so the slope optimiser climbs the same way on both paths."""
    negative = p.data.clamp(max=0)
    positive = p.data - negative
    lam_in = replace(p, data=torch.addcmul(negative * a_up, positive, a_lo), clean=True)
    if p.data.requires_grad and torch.is_grad_enabled():
        # the same values, (lam -/+ |lam|) / 2 exactly, whose gradient at lam = 0 is the offsets'
        # mean, as dense rows' lam . mid - |lam| . gap gives it (the optimiser climbs alike)
        magnitude = p.data.abs()
        negative, positive = (p.data - magnitude) / 2, (p.data + magnitude) / 2
    lower = _window_dot(negative, win(b_up))
    if torch.is_tensor(b_lo) or b_lo != 0:
        lower = lower + _window_dot(positive, win(b_lo))
    return lam_in, lower, None


def through_elementwise_with_slopes(p: Patches, node: Node, rule: ElementwiseRule, bounds, config, slopes,
                                    upper=None):
    """:meth:`ElementwiseRule.backward_with_slopes` on patches: ``slopes`` and ``upper`` (each a
    :class:`~dualgraph.dual_registry.FreeSlopes` without ``index``, or None) hold each row's
    free lower and upper slopes on its own window, ``[U, 1, 1, C, K, K]``; lines with offsets of
    their own (:class:`~dualgraph.dual_registry.FreeLines`) take them on the window too.
    Returns the patches and the lower offsets."""
    r = rule.relaxation(node, bounds, config)

    def win(t):  # a relaxation's slopes and offsets may be plain numbers (ReLU's lower offset)
        return p.windows(t if torch.is_tensor(t) else torch.full_like(bounds.lower, float(t)))

    a_lo, a_up = win(r.a_lo), win(r.a_up)
    b_lo, b_up = r.b_lo, r.b_up
    if slopes is not None:
        a_lo = torch.where(slopes.free, slopes.slopes(), a_lo)
    if upper is not None:
        a_up = torch.where(upper.free, upper.slopes(), a_up)
    if r.free is not None and r.free.offsets is not None:  # each chosen line's own offset, on the windows
        b_lo = win(b_lo) if slopes is None else torch.where(slopes.free, r.free.offset(a_lo, p.windows, -1), win(b_lo))
        b_up = win(b_up) if upper is None else torch.where(upper.free, r.free.offset(a_up, p.windows, 1), win(b_up))
        return _relaxation_step(p, a_lo, a_up, b_lo, b_up, lambda t: t)[:2]
    return _relaxation_step(p, a_lo, a_up, b_lo, b_up, win)[:2]


def geometry(dual) -> dict | None:
    """:func:`window_geometry` of ``dual``'s target (keyed by primal value) if the whole pass
    runs on patches to the input set; else None."""
    target, graph = dual.meta["target"], dual.meta["primal"]
    geom = window_geometry(target, graph.ancestors(target))
    return geom if geom.get(graph.inputs[0]) is not None else None


def windows_of(shape: tuple[int, int, int], rows: tuple[torch.Tensor, torch.Tensor], out_hw: tuple[int, int],
               t: torch.Tensor) -> torch.Tensor:
    """:meth:`Patches.windows` of ``t`` for selected rows with window ``shape`` ``(kernel,
    stride, padding)``, without the rows' data."""
    kernel, stride, padding = shape
    return Patches(t.new_empty(0), kernel, stride, padding, out_hw, rows).windows(t)


def relaxation_terms(p: Patches, r) -> tuple[torch.Tensor, torch.Tensor]:
    """``lam . mid`` and ``|lam| . gap`` of a linear rule's relaxation (its offsets are
    ``linear -/+ absolute``) for every row, ``[B, rows]``."""
    mid, gap = r.mid_gap()
    return _window_dot(p.data, p.windows(mid)), _window_dot(p.data.abs(), p.windows(gap))


def box_terms(p: Patches, centre: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``lam . centre`` and ``|lam| . radius`` for every row, ``[B, rows]`` (the minimum of
    ``lam . y`` over the box ``|y - centre| <= radius`` is their difference)."""
    return _window_dot(p.data, p.windows(centre)), _window_dot(p.data.abs(), p.windows(radius))


def abs_dot(p: Patches, t: torch.Tensor) -> torch.Tensor:
    """``|lam| . t`` for every row, ``[B, rows]`` (``t`` ``[B, C, H, W]``, e.g. a rounding weight)."""
    return _window_dot(p.data.abs(), p.windows(t))


def select(p: Patches, slope: torch.Tensor | None, examples: torch.Tensor, rows: torch.Tensor) -> Patches:
    """Rows ``rows`` (indices into ``C_t * P``, channel-major) of ``examples`` of ``slope * lam``
    (``lam`` itself when ``slope`` is None), as patches of one row each."""
    assert p.rows is None, "rows are selected once"
    P = p.positions
    pos = rows % P
    data = p.data[examples if p.data.shape[0] > 1 else 0, pos, rows // P]   # [U, C, K, K]
    q = replace(p, data=data.unsqueeze(1).unsqueeze(1), rows=(examples, pos))
    return q if slope is None else replace(q, data=q.data * q.windows(slope))


def input_terms(p: Patches, input_set) -> tuple[torch.Tensor, torch.Tensor]:
    """``lam . c`` and ``rho(lam)`` of the input set for every row, ``[B, rows]``."""
    data = p.data
    center = _window_dot(data, p.windows(input_set.center))
    if hasattr(input_set, "radius"):
        radius = _window_dot(data.abs(), p.windows(input_set.radius))
    else:  # L2 ball: eps * ||lam||_2 over the entries inside the input; the norm's subgradient
        # at a row that vanished is 0, as the dense rows' (a sqrt of the squares would give NaN)
        data = p.masked(tuple(input_set.center.shape[1:])).data
        radius = _rows(norm_upper(data, (3, 4, 5))) * input_set.eps
        radius = radius.expand(center.shape[0], -1) if radius.shape[0] == 1 else radius
    return center, radius


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[b, P, C_t] -> [b, C_t * P]``: rows in the target's (channel, position) order."""
    return t.transpose(1, 2).reshape(t.shape[0], -1)


def _window_dot(data: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    """``sum over (C, K, K) of data * win`` without materialising the product: ``[b', C_t * P]``.

    ``data`` is ``[b, P, C_t, C, K, K]``, ``win`` is ``[B, P, 1, C, K, K]``.
    """
    b, P, Ct = data.shape[:3]
    d = data.reshape(b, P, Ct, -1)
    w = win.reshape(win.shape[0], P, -1)
    if b == 1:  # rows shared by the batch: one product per position, no broadcast copy
        return _rows(torch.einsum("ptn,bpn->bpt", d[0], w))
    return _rows(torch.einsum("bptn,bpn->bpt", d, w.expand(b, -1, -1)))
