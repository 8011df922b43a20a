"""The linear-algebra helpers against the library functions they stand in for."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dualgraph.linalg import PHASES_MIN_MAP, conv_transpose2d


@st.composite
def strided_transposes(draw):
    """A float32 transposed convolution that takes the phase path: stride, filter (smaller
    than the stride too: phases without a tap), padding, output padding and groups."""
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    pad = tuple(draw(st.integers(0, k - 1)) for k in kernel)
    extra = tuple(draw(st.integers(0, s - 1)) for s in stride)
    groups = draw(st.sampled_from([1, 2]))
    hw = (draw(st.integers(PHASES_MIN_MAP, 9)), draw(st.integers(PHASES_MIN_MAP, 9)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    x = torch.randn(3, 2 * groups, *hw, generator=gen)
    w = torch.randn(2 * groups, draw(st.integers(1, 3)), *kernel, generator=gen)
    return x, w, stride, pad, extra, groups


@settings(max_examples=150, deadline=None)
@given(strided_transposes())
def test_phases_compute_the_strided_transpose_and_its_gradients(case):
    x, w, stride, pad, extra, groups = case
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = F.conv_transpose2d(x64, w64, stride=stride, padding=pad, output_padding=extra, groups=groups)
    got = conv_transpose2d(x, w, stride, pad, extra, groups)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    weights = torch.randn_like(want)
    (want * weights).sum().backward()
    (got * weights.float()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-4)


def test_small_maps_and_float64_keep_the_library_kernel(monkeypatch):
    calls = []
    real = F.conv_transpose2d
    monkeypatch.setattr(F, "conv_transpose2d", lambda *a, **k: calls.append(k.get("stride")) or real(*a, **k))
    w = torch.randn(4, 2, 3, 3)
    conv_transpose2d(torch.randn(1, 4, PHASES_MIN_MAP - 1, 8), w, (2, 2))
    conv_transpose2d(torch.randn(1, 4, 8, 8, dtype=torch.float64), w.double(), (2, 2))
    assert calls == [(2, 2), (2, 2)]  # one strided call each
    calls.clear()
    conv_transpose2d(torch.randn(1, 4, 8, 8), w, (2, 2))
    assert len(calls) == 4  # one call per phase
