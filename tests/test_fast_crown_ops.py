"""The speed-ups of CROWN on the gradient graph compute the same numbers as the plain operations.

* ``windowed_conv.conv2d_rows`` (conv2d of coefficient rows on their spatial windows) against
  F.conv2d, for kernels, strides, paddings, dilations, empty rows, rows touching the border, and the
  dense fallback;
* ``box_perturbation`` (concretisation over the nonzero-width columns only) against auto_LiRPA's
  ``PerturbationLpNorm``;
* ``BoundConvAdjoint``'s shortcuts (a batch-shared identity spec convolved once, a lower and upper
  matrix that are one tensor, linear layers as 1x1 adjoints) against the plain conv2d adjoint;
* and end to end: the CROWN box on a small CNN and MLP contains the attribution at sampled points.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bounds import certified_bound
from bounds import windowed_conv as wc
from bounds.box_perturbation import box_perturbation
from bounds.lirpa_compat import custom_ops, import_auto_lirpa


def _local_rows(S, B, C, H, W, gen, max_extent=3, empty=(1,)):
    a = torch.randn(S, B, C, H, W, dtype=torch.float64, generator=gen)
    mask = torch.zeros(S, 1, 1, H, W, dtype=torch.bool)
    for j in range(S):
        if j in empty:
            continue
        h0 = int(torch.randint(0, H, (1,), generator=gen))
        w0 = int(torch.randint(0, W, (1,), generator=gen))
        hh = int(torch.randint(1, max_extent + 1, (1,), generator=gen))
        ww = int(torch.randint(1, max_extent + 1, (1,), generator=gen))
        mask[j, 0, 0, h0 : h0 + hh, w0 : w0 + ww] = True
    return a * mask


def _dense(a, w, s, p, d):
    S, B = a.shape[:2]
    out = F.conv2d(a.reshape(S * B, *a.shape[2:]), w, None, s, p, d)
    return out.view(S, B, *out.shape[1:])


@pytest.mark.parametrize("fraction", [1.0, wc.MAX_WINDOW_FRACTION])
def test_conv2d_rows_matches_conv2d(monkeypatch, fraction):
    monkeypatch.setattr(wc, "MAX_WINDOW_FRACTION", fraction)
    checked = 0
    for trial in range(120):
        gen = torch.Generator().manual_seed(trial)
        k = int(torch.randint(1, 5, (1,), generator=gen))
        s = int(torch.randint(1, 4, (1,), generator=gen))
        p = int(torch.randint(0, 3, (1,), generator=gen))
        d = int(torch.randint(1, 3, (1,), generator=gen))
        lo = max(1, d * (k - 1) + 1 - 2 * p)
        H, W = (
            int(torch.randint(lo, 15, (1,), generator=gen)),
            int(torch.randint(lo, 15, (1,), generator=gen)),
        )
        a = _local_rows(6, 2, 3, H, W, gen)
        w = torch.randn(4, 3, k, k, dtype=torch.float64, generator=gen)
        ref = _dense(a, w, s, p, d)
        out = wc.conv2d_rows(a, w, (s, s), (p, p), (d, d))
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13 * float(ref.abs().max() + 1))
        checked += 1
    assert checked == 120


def test_conv2d_rows_dense_rows_and_zero_input():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 2, 3, 9, 9, dtype=torch.float64, generator=gen)  # dense rows: the fallback
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(wc.conv2d_rows(a, w, (2, 2), (1, 1), (1, 1)), _dense(a, w, 2, 1, 1))
    z = torch.zeros(4, 2, 3, 9, 9, dtype=torch.float64)
    assert bool((wc.conv2d_rows(z, w, (1, 1), (1, 1), (1, 1)) == 0).all())


def test_box_perturbation_matches_auto_lirpa():
    al = import_auto_lirpa()
    gen = torch.Generator().manual_seed(1)
    for frac in (0.0, 0.05, 0.3, 1.0):
        B, S, n = 3, 7, 50
        lo = torch.randn(B, n, dtype=torch.float64, generator=gen)
        width = torch.rand(B, n, dtype=torch.float64, generator=gen) * (
            torch.rand(B, n, generator=gen) < frac
        )
        hi = lo + width
        A = torch.randn(B, S, n, dtype=torch.float64, generator=gen)
        ours = box_perturbation(lo, hi)
        ref = al.PerturbationLpNorm(norm=float("inf"), eps=1.0, x_L=lo, x_U=hi)
        x = (lo + hi) / 2
        for sign in (-1, 1):
            torch.testing.assert_close(ours.concretize(x, A, sign=sign), ref.concretize(x, A, sign=sign))


def _adjoint_node(stride, padding, dilation, weight):
    cls = custom_ops()["certattr::ConvAdjoint"]
    node = cls.__new__(cls)
    nn.Module.__init__(node)
    node.stride, node.padding, node.dilation = stride, padding, dilation
    node.output_padding = (0, 0)
    node.is_input_perturbed = lambda i: False

    class W:
        lower = weight

    return node, W()


@pytest.mark.parametrize("kernel", [1, 4])
def test_conv_adjoint_backward_shortcuts(kernel):
    gen = torch.Generator().manual_seed(2)
    c_in, c_out = 3, 5
    hw = 1 if kernel == 1 else 12
    stride, padding = ((1, 1), (0, 0)) if kernel == 1 else ((2, 2), (1, 1))
    weight = torch.randn(c_out, c_in, kernel, kernel, dtype=torch.float64, generator=gen)
    node, w = _adjoint_node(stride, padding, (1, 1), weight)
    n = c_in * hw * hw
    eye = torch.eye(n, dtype=torch.float64).view(n, 1, c_in, hw, hw).expand(n, 4, c_in, hw, hw)
    other = torch.randn(n, 4, c_in, hw, hw, dtype=torch.float64, generator=gen)
    for la, ua in ((eye, eye), (eye, eye.clone()), (other, eye), (other, None)):
        (lower, upper), _ = node.bound_backward(la, ua, None, w)[0]
        torch.testing.assert_close(lower, _dense(la, weight, stride, padding, (1, 1)), rtol=1e-13, atol=1e-12)
        if ua is None:
            assert upper is None
        else:
            torch.testing.assert_close(
                upper, _dense(ua, weight, stride, padding, (1, 1)), rtol=1e-13, atol=1e-12
            )


def _attack_check(model, x, eps, norm):
    res = certified_bound(model, x, eps, norm, "saliency", method="crown")
    assert res.details["gradient"] == "crown+interval"
    gen = torch.Generator().manual_seed(3)
    for _ in range(64):
        d = torch.rand(x.shape, generator=gen) * 2 - 1
        if norm == "2":
            d = d / d.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
        xp = (x + eps * d).clamp(0, 1).requires_grad_(True)
        out = model(xp)
        g = torch.autograd.grad(out.gather(1, res.target.view(-1, 1)).sum(), xp)[0]
        assert bool((g >= res.lower).all()) and bool((g <= res.upper).all())


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_crown_box_holds_cnn_and_mlp(norm):
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 4, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 12),
        nn.ReLU(),
        nn.Linear(12, 5),
    ).eval()
    mlp = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4)
    ).eval()
    x = torch.rand(3, 1, 14, 14)
    _attack_check(cnn, x, 0.05 if norm == "inf" else 0.3, norm)
    _attack_check(mlp, torch.rand(3, 1, 8, 8), 0.05 if norm == "inf" else 0.3, norm)
