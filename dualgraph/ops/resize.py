"""Resize (and the older Upsample) with the nearest and linear modes: fixed linear maps.

Each resized axis is a matrix ``M [out, in]`` built from the ONNX coordinate transformation
(``half_pixel``, ``pytorch_half_pixel``, ``align_corners``, ``asymmetric``,
``half_pixel_symmetric``), the nearest-rounding mode, or linear interpolation weights (source
indices clamped to the edges), computed in float32 as onnxruntime computes them (sizes from
scales, scales from sizes, coordinates, weights); the op applies one matrix per axis. Its dual
layer is the exact
adjoint (the generic vector-Jacobian product). The weights are nonnegative, so ``|A| x`` is
the op itself. Cubic mode and ``tf_crop_and_resize`` are refused.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dual_registry import AffineRule
from ..errors import DualgraphError
from ..lowering import Call, Unsupported
from ..op_registry import define_op, var

TRANSFORMS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric")
NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


F32 = np.float32


def _source(i: int, scale: float, size_in: int, size_out: int, transform: str) -> np.float32:
    """Coordinate in the input of output index ``i`` (the ONNX formulas), in float32 as
    onnxruntime computes it: in float64, 7 -> 9 by half_pixel puts output 4 at 2.9999999999999996,
    where onnxruntime reads 3 (found by a review)."""
    i, scale, n_in, n_out, half = F32(i), F32(scale), F32(size_in), F32(size_out), F32(0.5)
    if transform == "half_pixel":
        return (i + half) / scale - half
    if transform == "pytorch_half_pixel":
        return (i + half) / scale - half if size_out > 1 else F32(0)
    if transform == "align_corners":
        return i * (n_in - F32(1)) / (n_out - F32(1)) if size_out > 1 else F32(0)
    if transform == "asymmetric":
        return i / scale
    # half_pixel_symmetric: onnxruntime's float32 offset, then the rest with double literals
    # (float64), rounded to float32 once
    adjustment = n_out / (scale * n_in)
    offset = n_in / F32(2) * (F32(1) - adjustment)
    return F32(float(offset) + (float(i) + 0.5) / float(scale) - 0.5)


def resize_matrix(size_in: int, size_out: int, scale: float, mode: str, transform: str, nearest: str) -> np.ndarray:
    """``M [out, in]`` with ``y = M x`` along one axis (indices and weights in float32, as
    onnxruntime computes them)."""
    m = np.zeros((size_out, size_in))
    last = size_in - 1
    for i in range(size_out):
        x = _source(i, scale, size_in, size_out, transform)
        if mode == "nearest":
            if nearest == "floor":
                j = math.floor(x)
            elif nearest == "ceil":
                j = math.ceil(x)
            elif x - F32(math.floor(x)) == F32(0.5):
                j = math.floor(x) if nearest == "round_prefer_floor" else math.ceil(x)
            else:  # std::round (no tie here); in float64, where x + 0.5 is exact
                j = math.floor(float(x) + 0.5)
            m[i, min(max(j, 0), last)] = 1.0
        else:  # onnxruntime: the coordinate clamped into the axis, its two neighbours' distances
            x = min(max(x, F32(0)), F32(last))
            x1 = min(int(x), last)
            x2 = min(x1 + 1, last)
            if x1 == x2:
                m[i, x1] = 1.0
            else:
                m[i, x1] += float(F32(x2) - x)
                m[i, x2] += float(x - F32(x1))
    return m


resize = define_op("Resize")


@resize.evaluate
def _(node, inputs):
    x = inputs[0]
    sizes, scales = node.attrs["out_sizes"], node.attrs["scales"]
    if list(sizes) == [int(d) for d in x.shape[1:]]:
        return x  # onnxruntime copies the input when no size changes, whatever the scales
    for axis, (size_out, scale) in enumerate(zip(sizes, scales), start=1):
        size_in = int(x.shape[axis])
        if size_out == size_in and scale == 1.0:
            continue
        m = torch.as_tensor(resize_matrix(size_in, size_out, scale, node.attrs["mode"],
                                          node.attrs["coordinate_transformation_mode"],
                                          node.attrs.get("nearest_mode", "round_prefer_floor")),
                            dtype=x.dtype, device=x.device)
        x = (x.movedim(axis, -1) @ m.T).movedim(-1, axis)
    return x


@resize.dual
class ResizeDual(AffineRule):
    abs_by_eval = True  # nonnegative weights

    def eval_length(self, node, bounds, config):
        return 2 ** len(node.attrs["out_sizes"]) + 1   # linear: two sources per axis

    def dual_length(self, node, bounds, config):
        return node.inputs[0].numel + 2


def _onnx_resize(ctx, n):
    x = ctx.to_native(n, ctx.var(n, 0))
    rank = x.rank
    mode = n.attrs.get("mode", "nearest")
    if n.op == "Upsample":
        c = ctx.const(n, 1, "the Upsample scales") if len(n.ins) > 1 else None
        scales = [float(s) for s in (ctx.batch_free(n, c).reshape(-1) if c is not None else n.attrs["scales"])]
        sizes, transform, nearest = None, "asymmetric", "floor"
        mode = "linear" if mode in ("linear", "bilinear") else mode
    elif ctx.opset < 11:  # Resize-10 is Upsample's arithmetic: x_in = x_out / scale
        c = ctx.const(n, 1, "the Resize scales")
        scales, sizes = [float(s) for s in ctx.batch_free(n, c).reshape(-1)], None
        transform, nearest = "asymmetric", "floor"
        if mode == "nearest" and min(scales) < 1:
            raise DualgraphError(f"node '{n.name}' (Resize, opset 10): nearest downsampling is not supported "
                                 "(onnxruntime rounds it its own way); export with opset 11 or later")
    else:
        transform = n.attrs.get("coordinate_transformation_mode", "half_pixel")
        nearest = n.attrs.get("nearest_mode", "round_prefer_floor")
        c = ctx.const(n, 2, "the Resize scales") if len(n.ins) > 2 else None
        scales = [float(s) for s in ctx.batch_free(n, c).reshape(-1)] if c is not None and c.t1.size else None
        s = ctx.const(n, 3, "the Resize sizes") if len(n.ins) > 3 else None
        sizes = _sizes(ctx, n, s) if s is not None and s.t1.size else None
        axes = n.attrs.get("axes")
        if axes is not None:  # opset 18: scales / sizes for some axes only
            full_scales, full_sizes = [1.0] * rank, x.onnx_shape()
            for k, a in enumerate(ctx.axis(n, int(a), rank) for a in axes):
                if scales is not None:
                    full_scales[a] = scales[k]
                if sizes is not None:
                    full_sizes[a] = sizes[k]
            scales, sizes = (full_scales if scales is not None else None), (full_sizes if sizes is not None else None)
    if mode not in ("nearest", "linear"):
        raise DualgraphError(f"node '{n.name}' ({n.op}): mode {mode!r} is not supported (nearest and linear are)")
    if transform not in TRANSFORMS:
        raise DualgraphError(f"node '{n.name}' ({n.op}): coordinate_transformation_mode {transform!r} is not "
                             f"supported ({', '.join(TRANSFORMS)} are)")
    if int(n.attrs.get("antialias", 0)) or n.attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise DualgraphError(f"node '{n.name}' ({n.op}): antialias and keep_aspect_ratio_policy are not supported")
    shape = x.onnx_shape()
    if sizes is None:
        if scales is None or len(scales) != rank:
            raise DualgraphError(f"node '{n.name}' ({n.op}): neither scales nor sizes for every axis")
        sizes = [int(F32(s) * F32(d)) for d, s in zip(shape, scales)]  # float32, as onnxruntime
    else:
        scales = [float(F32(o) / F32(d)) for o, d in zip(sizes, shape)]
    if sizes[0] != shape[0] or (len(sizes) > 1 and sizes[1] != shape[1] and rank > 2):
        raise DualgraphError(f"node '{n.name}' ({n.op}) resizes the batch or channel axis; only spatial axes "
                             "are supported")
    attrs = {"mode": mode, "coordinate_transformation_mode": transform, "nearest_mode": nearest,
             "out_sizes": [int(v) for v in sizes[1:]], "scales": [float(v) for v in scales[1:]]}
    return ctx.emit(n, "Resize", [x.value], attrs, False, n.outs)


def _sizes(ctx, n, s) -> list[int]:
    """Resize's ``sizes`` in the batch-1 world. A dynamic-batch export computes entry 0 from the
    batch size (``Shape``): it must be the batch in both worlds; a constant there would resize
    the batch axis."""
    t1 = [int(v) for v in np.asarray(s.t1).reshape(-1)]
    t2 = [int(v) for v in np.asarray(s.t2).reshape(-1)]
    if ctx.dynamic and (t1[0] != 1 or t2[0] != 2 or t1[1:] != t2[1:]):
        raise DualgraphError(f"node '{n.name}' (Resize): its sizes {t1} would resize the batch axis; only "
                             "spatial axes can be resized")
    return t1


resize.onnx_import(_onnx_resize)
upsample = define_op("Upsample")
upsample.onnx_import(_onnx_resize)


def _lower_interpolate(lo, x, size, scale_factor, mode: str, align_corners):
    x = lo.var(x)
    spatial = lo.shape(x)[2:]
    n = len(spatial)
    if mode == "nearest":
        transform, kind = "asymmetric", "nearest"
    elif mode in ("linear", "bilinear", "trilinear"):
        transform, kind = ("align_corners" if align_corners else "pytorch_half_pixel"), "linear"
    else:
        raise Unsupported(f"mode='{mode}'")
    if size is not None:
        sizes = [int(s) for s in (size if isinstance(size, (tuple, list)) else [size] * n)]
        scales = [o / i for o, i in zip(sizes, spatial)]
    else:
        factors = scale_factor if isinstance(scale_factor, (tuple, list)) else [scale_factor] * n
        scales = [float(f) for f in factors]
        sizes = [int(math.floor(i * f)) for i, f in zip(spatial, scales)]
    attrs = {"mode": kind, "coordinate_transformation_mode": transform, "nearest_mode": "floor",
             "out_sizes": [int(lo.shape(x)[1]), *sizes], "scales": [1.0, *scales]}
    return lo.emit("Resize", [x], attrs)


@resize.fx_lowering(nn.Upsample)
def _(lo, call: Call):
    m = call.module
    return _lower_interpolate(lo, call.arg(0, "input"), m.size, m.scale_factor, m.mode, m.align_corners)


@resize.fx_lowering(F.interpolate)
def _(lo, call: Call):
    if call.kwargs.get("recompute_scale_factor") or call.kwargs.get("antialias"):
        raise Unsupported("recompute_scale_factor / antialias")
    return _lower_interpolate(lo, call.arg(0, "input"), call.arg(1, "size", None), call.arg(2, "scale_factor", None),
                              call.arg(3, "mode", "nearest"), call.arg(4, "align_corners", None))


for _attrs in ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor",
                "out_sizes": [2, 6, 6], "scales": [1.0, 2.0, 2.0]},
               {"mode": "linear", "coordinate_transformation_mode": "half_pixel",
                "out_sizes": [2, 5, 7], "scales": [1.0, 5 / 3, 7 / 3]},
               {"mode": "linear", "coordinate_transformation_mode": "align_corners",
                "out_sizes": [2, 2, 5], "scales": [1.0, 2 / 3, 5 / 3]}):
    resize.example(var(2, 3, 3), attrs=_attrs)
