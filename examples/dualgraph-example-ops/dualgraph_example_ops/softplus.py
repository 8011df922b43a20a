"""Softplus as a dualgraph op: ``f(z) = log(1 + exp(z))`` in the domain ``com.example.dualgraph``.

Everything dualgraph needs is declared on one definition: the evaluation, the dual layer (a
relaxation), how torch.fx lowers this package's :class:`Softplus` module, and the example
nodes ``dualgraph check-op com.example.dualgraph.Softplus`` tests. ONNX files use the op as
``Softplus`` of domain ``com.example.dualgraph``; without an import handler the ONNX frontend
emits such a node as it is.

The relaxation. f is convex, so on ``[l, u]`` the chord lies above f; the tangent of the chord's
slope ``a`` lies below it, touching f where ``f'(z*) = sigmoid(z*) = a``, i.e. ``z* = logit(a)``.
(torch's ``softplus`` returns ``z`` above 20, a step of ``2e-9`` down: both ends of the step are
candidate extremes too.)
Two parallel lines, so the dual layer is linear (``linear_if``): one backward pass bounds both
sides, and the forward direction and random projections run through it. The arithmetic is
done in float64 and both offsets are moved outward by a few units of the bounds' precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dualgraph import Relaxation, define_op, var

DOMAIN = "com.example.dualgraph"
SWITCH = 20.0  # torch's softplus threshold


class Softplus(torch.nn.Module):
    """``log(1 + exp(x))``; torch.fx lowers it to the ``com.example.dualgraph.Softplus`` op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x)


softplus = define_op("Softplus", domain=DOMAIN, doc=__doc__)


@softplus.evaluate
def _(node, inputs):
    return F.softplus(inputs[0])


@softplus.relaxation(linear_if=lambda config: True)
def softplus_relaxation(node, bounds, config) -> Relaxation:
    l, u = (t.to(torch.float64) for t in bounds)
    width = u - l
    flat = width < 1e-9
    a = torch.where(flat, torch.sigmoid((l + u) / 2), (F.softplus(u) - F.softplus(l)) / width.clamp(min=1e-9))
    # z* of the lower tangent, exact down to z = -690 (a clamp of a at 1e-12 put it at an end of
    # intervals below -28, and the lower line above f there)
    touch = torch.logit(a.clamp(1e-300, 1 - 2.0 ** -53)).clamp(min=l, max=u)
    # F.softplus returns z itself above 20 (2e-9 below log(1 + e^z)): a step down, so the step's
    # top (20) and foot (the next float) are candidate extremes too
    switch = torch.tensor(SWITCH, dtype=torch.float64)
    step = [switch.clamp(min=l, max=u), torch.nextafter(switch, 2 * switch).clamp(min=l, max=u)]
    g = torch.stack([F.softplus(z) - a * z for z in (l, u, touch, *step)])    # f(z) - a z at the candidates
    eps = torch.finfo(bounds.lower.dtype).eps
    margin = 8 * eps * (1 + F.softplus(u) + a * torch.maximum(l.abs(), u.abs()))
    lower = g.amin(0) - margin             # the min of g: the line is below f everywhere
    upper = g.amax(0) + margin             # g is convex apart from the step: the max at an end or its top
    dtype = bounds.lower.dtype
    return Relaxation(a.to(dtype), lower.to(dtype), a.to(dtype), upper.to(dtype))


@softplus.fx_lowering(Softplus)
def _(lo, call):
    return lo.emit(softplus.key, [lo.var(call.arg(0, "input"))])


softplus.example(var(6))
softplus.example(var(2, 3, 3))
