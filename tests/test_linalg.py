"""The linear-algebra helpers against the library functions they stand in for."""

from unittest import mock

import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dualgraph import linalg


@st.composite
def strided_transposes(draw):
    """A float32 transposed convolution: stride, filter (narrower than the stride too:
    phases without a tap), padding, output padding, groups and map size."""
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    kernel = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    pad = tuple(draw(st.integers(0, k - 1)) for k in kernel)
    extra = tuple(draw(st.integers(0, s - 1)) for s in stride)
    groups = draw(st.sampled_from([1, 2]))
    hw = (draw(st.integers(1, 8)), draw(st.integers(1, 8)))
    assume(all((n - 1) * s - 2 * p + k + e >= 1 for n, s, p, k, e in zip(hw, stride, pad, kernel, extra)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    x = torch.randn(3, 2 * groups, *hw, generator=gen)
    w = torch.randn(2 * groups, draw(st.integers(1, 3)), *kernel, generator=gen)
    return x, w, stride, pad, extra, groups


def _same_as_the_library(run, x: torch.Tensor, w: torch.Tensor, **geometry) -> torch.Tensor:
    """``run(x, w)`` in float32 against ``F.conv_transpose2d(**geometry)`` in float64: the values
    and both gradients (of a random weighting of the output). Returns ``run``'s output."""
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = F.conv_transpose2d(x64, w64, **geometry)
    got = run(x, w)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    weights = torch.randn_like(want)
    (want * weights).sum().backward()
    (got * weights.float()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-4)
    return got


@settings(max_examples=150, deadline=None)
@given(strided_transposes())
def test_phases_compute_the_strided_transpose_and_its_gradients(case):
    """Phase by phase (whatever :func:`linalg.by_phases` would choose), against the library's
    kernel in float64: values and both gradients."""
    x, w, stride, pad, extra, groups = case
    with mock.patch.object(linalg, "by_phases", lambda *_: True), mock.patch.object(linalg, "TAPS_MAX_INPUTS", 0):
        got = _same_as_the_library(lambda a, b: linalg.conv_transpose2d(a, b, stride, pad, extra, groups), x, w,
                                   stride=stride, padding=pad, output_padding=extra, groups=groups)
    assert got.is_contiguous()


def test_phases_only_for_float32_filters_no_wider_than_their_stride(monkeypatch):
    monkeypatch.setattr(linalg, "TAPS_MAX_INPUTS", 0)
    calls = []
    real = F.conv_transpose2d
    monkeypatch.setattr(F, "conv_transpose2d", lambda *a, **k: calls.append(k.get("stride", 1)) or real(*a, **k))
    x = torch.randn(1, 4, 5, 5)
    for w, stride in ((torch.randn(4, 2, 3, 3), (2, 2)),     # wider than its stride
                      (torch.randn(4, 2, 1, 1), (1, 1)),     # stride 1
                      (torch.randn(4, 2, 2, 1), (1, 2))):    # wider than the stride one way
        linalg.conv_transpose2d(x, w, stride)
    linalg.conv_transpose2d(x.double(), torch.randn(4, 2, 1, 1, dtype=torch.float64), (2, 2))  # float64
    assert calls == [(2, 2), (1, 1), (1, 2), (2, 2)]  # the library's kernel, once each
    calls.clear()
    linalg.conv_transpose2d(x, torch.randn(4, 2, 1, 1), (2, 2))   # a 1x1 shortcut: one phase has the tap
    linalg.conv_transpose2d(x, torch.randn(4, 2, 2, 2), (2, 2))   # 2x2 stride 2: one tap per phase
    assert calls == [1] * 5


@settings(max_examples=100, deadline=None)
@given(strided_transposes(), st.integers(1, 2), st.integers(1, 2))
def test_taps_compute_the_transpose_and_its_gradients(case, dil_h, dil_w):
    """By filter taps (whatever ``TAPS_MAX_INPUTS`` would choose), with padding, output padding
    and dilation, against the library's kernel in float64: values and both gradients."""
    x, w, stride, pad, extra, groups = case
    assume(groups == 1)
    dil = (dil_h, dil_w)
    extra = tuple(min(e, max(s, d) - 1) for e, s, d in zip(extra, stride, dil))
    assume(all((n - 1) * s - 2 * p + d * (k - 1) + 1 + e >= 1
               for n, s, p, d, k, e in zip(x.shape[2:], stride, pad, dil, w.shape[2:], extra)))
    with mock.patch.object(linalg, "TAPS_MAX_INPUTS", 10 ** 6):
        _same_as_the_library(lambda a, b: linalg.conv_transpose2d(a, b, stride, pad, extra, 1, dil), x, w,
                             stride=stride, padding=pad, output_padding=extra, dilation=dil)


def test_first_layers_transpose_by_taps(monkeypatch):
    """A stem's transpose (few outputs per input pixel) takes the taps, wider ones the kernel."""
    calls = []
    real = linalg.conv_transpose_by_taps
    monkeypatch.setattr(linalg, "conv_transpose_by_taps", lambda *a: calls.append("taps") or real(*a))
    x = torch.randn(2, 16, 7, 7)
    linalg.conv_transpose2d(x, torch.randn(16, 3, 3, 3), (2, 2))     # 27 outputs per input pixel
    linalg.conv_transpose2d(x, torch.randn(16, 16, 3, 3), (2, 2))    # 144
    linalg.conv_transpose2d(x, torch.randn(16, 3, 3, 3), (1, 1), groups=1)
    assert calls == ["taps", "taps"]


def test_taps_fold_where_the_blocks_fit_and_add_per_tap_elsewhere(monkeypatch):
    """The taps' sums go through ``F.fold`` where its blocks are exactly the rows' positions (a
    stem, 3x3 stride 2 padding 1, 16 -> 32 pixels) and through one strided add per tap where
    the map asked for reaches past the last block (15 pixels onto 32: rows 30 and 31 are
    zeros): both equal the library's transpose in float64."""
    calls = []
    real = F.fold
    monkeypatch.setattr(F, "fold", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    w = torch.randn(16, 3, 3, 3, dtype=torch.float64)
    for n, zeros in ((16, 0), (15, 2)):
        lam = torch.randn(5, 16, n, n, dtype=torch.float64)
        got = linalg.conv_transpose_by_taps(lam, w, (2, 2), (1, 1), (1, 1), (32, 32))
        want = F.pad(F.conv_transpose2d(lam, w, stride=2, padding=1, output_padding=1), (0, zeros, 0, zeros))
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert calls == [(32, 32)]
