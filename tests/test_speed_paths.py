"""The speed paths of certified_bound's CROWN pass compute the same numbers as the plain operations.

* ``windowed_conv.conv2d_rows`` full-plane mode (a kernel as large as the plane: a linear layer after
  a Flatten, written as a convolution by ``GradNet``) and its per-weight cache of class matrices,
  against F.conv2d; the fallback above ``MAX_GROUPS`` offset classes;
* ``GradNet`` with such "image linear" adjoints computes autograd's gradient;
* end to end: the certified box with the windowed paths equals the box with every adjoint dense (to
  float64 summation order), holds at sampled points of the ball on a net whose phases flip inside it,
  and ``heap.retained_heap`` changes no bit of it;
* ``lirpa_compat``'s chunked float64 transposed convolution equals torch's, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_fast_crown_ops import _dense, _local_rows
from torch import nn

from bounds import certified_bound, heap
from bounds import windowed_conv as wc
from bounds.gradgraph import GradNet, parse_chain


def test_conv2d_rows_full_plane_mode_and_cache():
    checked = 0
    for trial in range(60):
        gen = torch.Generator().manual_seed(trial)
        H, W = int(torch.randint(3, 10, (1,), generator=gen)), int(torch.randint(3, 10, (1,), generator=gen))
        p = int(torch.randint(0, 2, (1,), generator=gen))
        s = int(torch.randint(1, 3, (1,), generator=gen))
        kh, kw = H + 2 * p - int(torch.randint(0, 2, (1,), generator=gen)), W + 2 * p  # output 1-2 x 1
        a = _local_rows(12, 2, 3, H, W, gen, max_extent=2)
        w = torch.randn(5, 3, kh, kw, dtype=torch.float64, generator=gen)
        cache: dict = {}
        ref = _dense(a, w, (s, s), (p, p), (1, 1))
        for _ in range(2):  # the second call reads the cached class matrices
            out = wc.conv2d_rows(a, w, (s, s), (p, p), (1, 1), cache)
            torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13 * float(ref.abs().max() + 1))
        w.mul_(-2.0)  # written in place: the cache must not serve the old matrices
        ref = _dense(a, w, (s, s), (p, p), (1, 1))
        torch.testing.assert_close(wc.conv2d_rows(a, w, (s, s), (p, p), (1, 1), cache), ref, rtol=1e-13,
                                   atol=1e-13 * float(ref.abs().max() + 1))
        checked += 1
    assert checked == 60


def test_conv2d_rows_many_classes_fall_back(monkeypatch):
    monkeypatch.setattr(wc, "MAX_GROUPS", 2)
    gen = torch.Generator().manual_seed(5)
    a = _local_rows(20, 2, 2, 7, 7, gen, max_extent=1)
    w = torch.randn(3, 2, 7, 7, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(wc.conv2d_rows(a, w, (1, 1), (0, 0), (1, 1)), _dense(a, w, 1, 0, 1),
                               rtol=1e-13, atol=1e-13)


def _cnn():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 5),
    ).eval()
    with torch.no_grad():  # biases of the weights' size: many phases flip inside the ball
        for m in net:
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.bias.mul_(0.2)
    return net


def test_gradnet_image_linear_is_the_gradient():
    net = _cnn()
    x = torch.rand(3, 1, 14, 14, dtype=torch.float64)
    chain = parse_chain(net, (1, 14, 14), dtype=torch.float64)
    gnet = GradNet(chain)
    assert gnet.image_linear == {5}  # the Linear after the Flatten of the (6, 4, 4) image
    mlp_chain = parse_chain(nn.Sequential(nn.Flatten(), nn.Linear(196, 7), nn.ReLU(), nn.Linear(7, 3)), (1, 14, 14))
    assert GradNet(mlp_chain).image_linear == set()  # a Flatten of the input stays a matmul
    net64 = net.double()
    xr = x.clone().requires_grad_(True)
    out = net64(xr)
    y = out.argmax(1)
    (g,) = torch.autograd.grad(out.gather(1, y.view(-1, 1)).sum(), xr)
    onehot = F.one_hot(y, 5).double()
    with torch.no_grad():
        acts = chain.leaf_values(x)
    factors = [(acts[i - 1] > 0).double() for i, op in enumerate(chain.ops) if type(op).__name__ == "Act"]
    torch.testing.assert_close(gnet(x, onehot, *factors).view_as(g), g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm,eps", [("inf", 0.08), ("2", 0.5)])
def test_windowed_box_equals_dense_and_holds(monkeypatch, norm, eps):
    net = _cnn()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 14, 14, generator=gen)
    fast = certified_bound(net, x, eps, norm, "saliency", method="crown")
    assert fast.details["gradient"] == "crown+interval"
    monkeypatch.setattr(wc, "MAX_WINDOW_FRACTION", 0.0)  # every adjoint convolution dense
    dense = certified_bound(net, x, eps, norm, "saliency", method="crown")
    scale = float(torch.maximum(dense.lower.abs(), dense.upper.abs()).max())
    torch.testing.assert_close(fast.lower, dense.lower, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(fast.upper, dense.upper, rtol=0, atol=1e-6 * scale)
    assert float((fast.upper - fast.lower).min()) > 0  # wide enough that phases flip
    for _ in range(64):
        d = torch.rand(x.shape, generator=gen) * 2 - 1
        if norm == "2":
            d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        xp = (x + eps * d).clamp(0, 1).requires_grad_(True)
        out = net(xp)
        (g,) = torch.autograd.grad(out.gather(1, fast.target.view(-1, 1)).sum(), xp)
        assert bool((g >= fast.lower).all()) and bool((g <= fast.upper).all())


def test_retained_heap_changes_nothing(monkeypatch):
    monkeypatch.setenv("CERTATTR_RETAIN_HEAP", "1")  # opt-in: enable it for this test
    monkeypatch.setitem(heap._state, "checked", False)
    monkeypatch.setitem(heap._state, "libc", None)
    net = _cnn()
    x = torch.rand(2, 1, 14, 14, generator=torch.Generator().manual_seed(2))
    with_heap = certified_bound(net, x, 0.05, "inf", "saliency", method="crown")
    assert heap._state["depth"] == 0
    if heap._libc() is not None:
        with heap.retained_heap(), heap.retained_heap():  # nested: only the outermost acts
            assert heap._state["depth"] == 2
        assert heap._state["depth"] == 0
    monkeypatch.setitem(heap._state, "libc", None)  # as on a system without glibc
    monkeypatch.setitem(heap._state, "checked", True)
    plain = certified_bound(net, x, 0.05, "inf", "saliency", method="crown")
    assert torch.equal(with_heap.lower, plain.lower) and torch.equal(with_heap.upper, plain.upper)


def test_chunked_conv_transpose_is_bitwise_the_same(monkeypatch):
    from bounds import lirpa_compat
    from bounds.lirpa_compat import import_auto_lirpa

    import_auto_lirpa()
    from auto_LiRPA.operators import convolution

    monkeypatch.setattr(lirpa_compat, "_COLUMN_BYTES", 4096)  # many chunks
    gen = torch.Generator().manual_seed(3)
    for shape, ws, s, p in (((37, 4, 5, 5), (4, 3, 4, 4), (2, 2), (1, 1)), ((20, 2, 6, 6), (2, 5, 3, 3), (1, 1), (0, 0))):
        a = torch.randn(shape, dtype=torch.float64, generator=gen)
        w = torch.randn(ws, dtype=torch.float64, generator=gen)
        ref = F.conv_transpose2d(a, w, None, s, p)
        assert torch.equal(convolution.F.conv_transpose2d(a, w, None, s, p), ref)


def test_box_of_a_sample_does_not_depend_on_its_batch():
    # the forward CROWN pass runs in blocks of rows with every neuron bounded by CROWN, so a sample's
    # box is the same alone or among others (auto_LiRPA's sparse mode tied it to the batch's union)
    net = _cnn()
    x = torch.rand(5, 1, 14, 14, generator=torch.Generator().manual_seed(4))
    together = certified_bound(net, x, 0.05, "inf", "saliency", method="crown")
    alone = certified_bound(net, x[2:3], 0.05, "inf", "saliency", method="crown")
    assert torch.equal(together.lower[2:3], alone.lower) and torch.equal(together.upper[2:3], alone.upper)
