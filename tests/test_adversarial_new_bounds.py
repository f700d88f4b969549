"""Adversarial soundness checks of the bounds added for issue 10 (alpha-CROWN, spec-row objectives,
complete_bound's phase and input branching), built to break the certificates through the public APIs.

Every check can fail: certificates are attacked with sampling (uniform, l_inf vertices / l2 sphere,
sparse corners) and PGD through the real net and softplus surrogates (``soundness_fuzz``); witnesses
are recomputed on the real net (the sample alone, as ``complete_bound`` documents) and checked in the
ball in float32 AND float64; cached auto_LiRPA state is compared with a freshly built module.

Adversarial ingredients: call sequences on one cached model with other batch sizes, radii, norms, a
different model of equal shapes and in-place weight edits (alpha parameters live on auto_LiRPA nodes);
exact ties and exact zeros in g(x) (duplicated / zeroed input columns, g(x) = 0 at a domain corner),
every k of the top-k certificate; grouped / dilated / strided / bias-free convolutions, BatchNorm with
tiny variances; radii 1e-6 .. 0.6 and l2; an eps whose float64 subtraction x - eps rounds outwards
(the witness-box regression: ``complete_attack.witness_box``); boxes tangent to the l2 sphere for
``complete_input.shrink_to_ball``.
"""

from __future__ import annotations

import math

import pytest
import torch
from exact_oracle import exact_saliency_range
from soundness_fuzz import pgd, sample_points, smooth_surrogate
from torch import nn

from bounds import certified_bound, complete_bound, crown
from bounds.attribution import attribution as attr_fn
from bounds.complete_attack import project, witness_box
from bounds.complete_input import shrink_to_ball


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _attack_points(net, x, eps, norm, dom, target, attribution="saliency", steps=4, count=160, pgd_steps=12,
                   cosine=False, seed=0):
    """(P, B, ...) points of B_p(x, eps) ∩ domain: sampling + PGD on the deviation (or -cos) through the
    real net and a softplus surrogate."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [sample_points(x, eps, norm, dom, count, gen)]
    for model in (net, smooth_surrogate(net, 10.0, 0.05)):
        g0 = attr_fn(model, x, target, attribution, steps=steps).detach()

        def loss(xp, model=model, g0=g0):
            g = attr_fn(model, xp, target, attribution, steps=steps, create_graph=True).flatten(1)
            if cosine:
                return -(g * g0.flatten(1)).sum(1) / (g.norm(dim=1) * g0.flatten(1).norm(dim=1) + 1e-12)
            return ((g - g0.flatten(1)) ** 2).sum(1)

        start = sample_points(x, eps, norm, dom, 1, gen)[0]
        blocks.append(torch.stack(pgd(loss, x, eps, norm, dom, pgd_steps, start)))
    return torch.cat(blocks)


def _values(net, pts, x, target, attribution="saliency", steps=4, cosine=False):
    """(P, B) float64 deviation ||g(x') - g(x)|| (or cos(g(x), g(x'))) of the float attributions."""
    p = pts.shape[0]
    g0 = attr_fn(net, x, target, attribution, steps=steps).detach().flatten(1).double()
    g = attr_fn(net, pts.flatten(0, 1), target.repeat(p), attribution, steps=steps).detach()
    g = g.flatten(1).double().view(p, x.shape[0], -1)
    if cosine:
        return (g * g0).sum(2) / (g.norm(dim=2) * g0.norm(dim=1)).clamp_min(1e-300)
    return (g - g0).norm(dim=2)


def _check_complete(net, x, eps, norm, r, attribution="saliency", steps=4, cosine=False, dom=(0.0, 1.0)):
    """upper (euclidean) / lower (cosine) against attacks; the witness recomputed (the sample alone) and
    inside the ball ∩ domain as float32 and float64 checks see it."""
    target = r.target
    vals = _values(net, _attack_points(net, x, eps, norm, dom, target, attribution, steps, cosine=cosine),
                   x, target, attribution, steps, cosine)
    if cosine:
        assert bool((vals.min(0).values >= r.lower).all()), (vals.min(0).values, r.lower)
    else:
        assert bool((vals.max(0).values <= r.upper).all()), (vals.max(0).values, r.upper)
    w = r.witness
    for i in range(x.shape[0]):
        v = _values(net, w[i : i + 1].unsqueeze(0), x[i : i + 1], target[i : i + 1], attribution, steps, cosine)
        reached = r.upper[i] if cosine else r.lower[i]
        assert float(v) == pytest.approx(float(reached), rel=1e-12, abs=1e-12)
    d64 = (w.double() - x.double()).flatten(1)
    d32 = (w - x).flatten(1)
    if norm == "inf":
        assert float(d64.abs().max()) <= eps and bool((d32.abs() <= eps).all())
    else:
        assert float(d64.norm(dim=1).max()) <= eps and bool((d32.norm(dim=1) <= eps).all())
    if dom is not None:
        assert float(w.min()) >= dom[0] and float(w.max()) <= dom[1]


# ----------------------------------------------------------------------------------------------
# complete_bound: witnesses in the ball as float64 sees it (regression)
# ----------------------------------------------------------------------------------------------
def test_witness_box_rounds_inwards():
    """fl64(0.5 - (0.25 - 2^-55)) = 0.25 (round half to even) lies outside the exact ball: a witness at
    0.25 fails a float64 check |x' - x| <= eps.  ``witness_box`` moves such end points one ulp in."""
    eps = 0.25 - 2.0**-55
    x64 = torch.tensor([0.5, 0.5, 0.3], dtype=torch.float32).double()  # x in float32, as callers have it
    xl, xu = x64 - eps, x64 + eps
    assert float(xl[0]) == 0.25  # the outward rounding this test is about
    wl, wu = witness_box(x64, eps, xl, xu)
    assert bool(((x64 - wl) <= eps).all()) and bool(((wu - x64) <= eps).all())
    assert bool((wl >= xl).all()) and bool((wu <= xu).all())
    corners = torch.stack([wl, wu, torch.stack([wl[0], wu[1], wl[2]])])
    q = project(corners, wl, wu, torch.float32)
    assert float((q.double() - x64).abs().max()) <= eps
    # exact end points are kept (no needless shrinking)
    wl2, wu2 = witness_box(x64, 0.25, x64 - 0.25, x64 + 0.25)
    assert bool((wl2 == x64 - 0.25).all()) and bool((wu2 == x64 + 0.25).all())


def test_complete_witness_in_float64_ball_adversarial_eps():
    """End to end: a net whose worst case sits on a vertex, eps chosen so that x - eps rounds outwards
    in float64 (before the fix the witness was 2^-55 outside the ball)."""
    eps = 0.25 - 2.0**-55
    x = torch.full((1, 2), 0.5)
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    r = complete_bound(net, x, eps, "inf", budget_s=1.0)
    assert float((r.witness.double() - x.double()).abs().max()) <= eps
    _check_complete(net, x, eps, "inf", r)


# ----------------------------------------------------------------------------------------------
# complete_bound phase mode: dense conversion of awkward convolutions, tiny-variance BatchNorm
# ----------------------------------------------------------------------------------------------
def _awkward_cnn(kind: str):
    torch.manual_seed(1)
    if kind == "groups":  # grouped conv, then a strided dilated bias-free conv
        net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.ReLU(),
                            nn.Conv2d(4, 2, 3, stride=2, dilation=2, padding=2, bias=False), nn.ReLU(),
                            nn.Flatten(), nn.Linear(8, 3))
        return net.eval(), (2, 4, 4)
    if kind == "bn_tiny":  # BatchNorm variances down to 1e-6 (scales ~1000), avg-pool, BatchNorm1d
        net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                            nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.ReLU(),
                            nn.Linear(6, 3))
        with torch.no_grad():
            net[1].running_var.copy_(torch.tensor([1e-6, 1e-3, 2.0]))
            net[1].running_mean.uniform_(-0.3, 0.3)
            net[6].running_var.fill_(1e-5)
            net[6].running_mean.uniform_(-0.2, 0.2)
        return net.eval(), (1, 4, 4)
    # non-square kernel and stride, overlapping padded avg-pool
    net = nn.Sequential(nn.Conv2d(1, 3, (3, 2), stride=(2, 1), padding=(1, 0)), nn.ReLU(),
                        nn.AvgPool2d(3, stride=1, padding=1), nn.Conv2d(3, 2, 2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4, 2))
    return net.eval(), (1, 4, 4)


def _edge_inputs(shape, seed=3):
    torch.manual_seed(seed)
    x = torch.rand(2, *shape)
    x[0].view(-1)[:3] = 0.0  # on the domain boundary
    x[1].view(-1)[:3] = 1.0
    return x


@pytest.mark.parametrize("kind,norm,eps", [("groups", "inf", 0.05), ("stride_pad", "2", 0.3)])
def test_complete_phases_awkward_cnn(kind, norm, eps):
    net, shape = _awkward_cnn(kind)
    x = _edge_inputs(shape)
    r = complete_bound(net, x, eps, norm, budget_s=1.0)
    assert r.method == "bab"
    _check_complete(net, x, eps, norm, r)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["groups", "bn_tiny", "stride_pad"])
@pytest.mark.parametrize("norm,eps,objective", [("inf", 0.05, "euclidean"), ("inf", 1e-6, "euclidean"),
                                                ("2", 0.3, "euclidean"), ("inf", 0.6, "euclidean"),
                                                ("inf", 0.1, "cosine")])
def test_complete_phases_awkward_cnn_slow(kind, norm, eps, objective):
    net, shape = _awkward_cnn(kind)
    x = _edge_inputs(shape)
    r = complete_bound(net, x, eps, norm, objective=objective, budget_s=2.0)
    _check_complete(net, x, eps, norm, r, cosine=objective == "cosine")


def test_complete_zero_gradient_at_domain_corner():
    """g(x) = 0 exactly (every first-layer unit at z = 0, relu'(0) = 0, x at the domain corner): the
    exact oracle's maximum lies in [lower, upper] for both branchings; the cosine is undefined at x, so
    its certified lower bound must be -1."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        net[0].bias.zero_()
        net[0].weight.abs_()
    x = torch.zeros(1, 3)
    for branching in ("phases", "input"):
        r = complete_bound(net, x, 0.1, "inf", budget_s=0.5, branching=branching)
        ex = exact_saliency_range(net.double(), x[0].double(), 0.1, int(r.target[0]))["max_euclidean"]
        net.float()
        assert float(r.lower[0]) <= ex + 1e-9 and ex <= float(r.upper[0])
        assert float(r.attribution_at_x.abs().max()) == 0.0
        rc = complete_bound(net, x, 0.1, "inf", objective="cosine", budget_s=0.5, branching=branching)
        assert float(rc.lower[0]) == -1.0


# ----------------------------------------------------------------------------------------------
# complete_bound input mode: l2 (shrink_to_ball), cosine, gradient x input, IG
# ----------------------------------------------------------------------------------------------
def test_shrink_to_ball_keeps_every_point():
    """Boxes straddling, tangent to (a face or a corner exactly at distance r) and just outside the
    sphere: every point of ball ∩ box lies in the shrunk box of a kept row."""
    gen = torch.Generator().manual_seed(0)
    n, r = 4, 0.3
    x = torch.tensor([0.5, 0.25, 1e3, -7.0], dtype=torch.float64)
    lo = x + (torch.rand(400, n, generator=gen, dtype=torch.float64) * 2 - 1) * r
    hi = lo + torch.rand(400, n, generator=gen, dtype=torch.float64) * r * 0.7
    lo[0] = x + torch.tensor([r, -0.1, -0.1, -0.1], dtype=torch.float64)  # a face tangent at x + r e_0
    hi[0] = lo[0] + 0.2
    c = r / math.sqrt(n)
    lo[1] = x + c  # a corner on the sphere (up to rounding)
    hi[1] = x + 2 * c
    lo0, hi0 = lo.clone(), hi.clone()
    keep = shrink_to_ball(lo, hi, x, r)
    assert bool(keep[0]) and bool(keep[1])
    # points of ball ∩ box: random points of each box, pulled to the ball where they fall outside
    pts = lo0.unsqueeze(1) + torch.rand(400, 64, n, generator=gen, dtype=torch.float64) * (hi0 - lo0).unsqueeze(1)
    pts = torch.cat([pts, lo0.unsqueeze(1), hi0.unsqueeze(1)], dim=1)
    inside = (pts - x).norm(dim=2) <= r
    ok = (~inside) | (keep.unsqueeze(1) & (pts >= lo.unsqueeze(1)).all(2) & (pts <= hi.unsqueeze(1)).all(2))
    assert bool(ok.all())
    tangent = x.clone()
    tangent[0] += r
    assert bool((tangent >= lo[0]).all()) and bool((tangent <= hi[0]).all())


def _smooth_mlp():
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(5, 10), nn.Tanh(), nn.Linear(10, 8), nn.Softplus(beta=3.0),
                         nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("attribution,norm,eps,objective", [
    ("saliency", "2", 0.3, "cosine"),
    ("grad_x_input", "2", 0.2, "euclidean"),
    ("ig", "inf", 0.05, "euclidean"),
])
def test_complete_input_smooth(attribution, norm, eps, objective):
    net = _smooth_mlp()
    torch.manual_seed(5)
    x = torch.rand(2, 5)
    x[:, :2] = 0.0
    x[1, 2] = 1.0
    r = complete_bound(net, x, eps, norm, attribution=attribution, objective=objective, budget_s=0.7,
                       branching="input", ig_steps=4)
    assert r.method == "input-bab"
    _check_complete(net, x, eps, norm, r, attribution=attribution, cosine=objective == "cosine")


@pytest.mark.slow
@pytest.mark.parametrize("attribution", ["saliency", "grad_x_input", "ig"])
@pytest.mark.parametrize("norm,eps", [("inf", 0.05), ("2", 0.2), ("inf", 1e-6)])
def test_complete_input_maxpool_slow(attribution, norm, eps):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(8, 3)).eval()
    torch.manual_seed(5)
    x = torch.rand(2, 1, 4, 4)
    x.view(2, -1)[:, :2] = 0.0
    r = complete_bound(net, x, eps, norm, attribution=attribution, budget_s=1.5, branching="input", ig_steps=4)
    _check_complete(net, x, eps, norm, r, attribution=attribution)


# ----------------------------------------------------------------------------------------------
# certified_bound: sharper objectives under ties, zeros and every k
# ----------------------------------------------------------------------------------------------
def _topk_overlap(m1, m2, k):
    t1 = torch.zeros_like(m1, dtype=torch.bool).scatter_(1, m1.topk(k, dim=1).indices, True)
    t2 = torch.zeros_like(m2, dtype=torch.bool).scatter_(1, m2.topk(k, dim=1).indices, True)
    return (t1 & t2).sum(dim=1).double() / k


def _check_certified(net, x, eps, norm, res, dom):
    """Box, Euclidean, cosine and the top-k intersection for EVERY k at attack points; the top-k also
    under the reversed tie-breaking (the certificate claims every tie-breaking)."""
    target = res.target
    pts = _attack_points(net, x, eps, norm, dom, target)
    g = attr_fn(net, pts.flatten(0, 1), target.repeat(pts.shape[0]), "saliency").detach().view(pts.shape)
    g0 = res.attribution_at_x
    assert bool((g <= res.upper.unsqueeze(0)).all()) and bool((g >= res.lower.unsqueeze(0)).all())
    gf, g0f = g.flatten(2).double(), g0.flatten(1).double().unsqueeze(0)
    assert bool(((gf - g0f).norm(dim=2) <= res.euclidean.double()).all())
    nrm = gf.norm(dim=2) * g0f.norm(dim=2)
    cos = (gf * g0f).sum(2) / nrm.clamp_min(1e-300)
    assert bool(((cos >= res.cosine.double()) | (nrm == 0)).all())

    def amap(t):
        return t.abs().sum(dim=1).flatten(1) if t.dim() >= 3 else t.abs().flatten(1)

    m0, mp = amap(g0), amap(g.flatten(0, 1))
    n = m0.shape[1]
    for k in range(1, n + 1):
        bound = res.topk_intersection(k).double()
        for flip in (False, True):
            a, b = (m0.flip(1), mp.flip(1)) if flip else (m0, mp)
            actual = _topk_overlap(a.repeat(pts.shape[0], 1), b, k).view(pts.shape[:2])
            # compare counts: the bound is a float32 ratio (4/5 rounds to 0.80000001)
            assert bool(((actual * k).round() >= (bound * k).round().unsqueeze(0)).all()), (k, flip)


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_objectives_ties_and_zero_columns(method):
    """Duplicated input columns (exactly tied saliency entries) and a zeroed column (g_j = 0 everywhere),
    tiny to huge radii, l_inf and l2, domain and none."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        net[0].weight[:, 1] = net[0].weight[:, 0]
        net[0].weight[:, 3] = net[0].weight[:, 2]
        net[0].weight[:, 5] = 0.0
    x = torch.rand(3, 6)
    for eps, norm, dom in ((1e-6, "inf", (0.0, 1.0)), (0.02, "inf", (0.0, 1.0)), (0.05, "2", (0.0, 1.0)),
                           (50.0, "2", None)):
        res = certified_bound(net, x, eps, norm, method=method, domain=dom, alpha_iters=2)
        _check_certified(net, x, eps, norm, res, dom)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
@pytest.mark.parametrize("eps", [1e-5, 0.01, 0.1])
def test_objectives_multichannel_zero_channel_slow(method, eps):
    """Two input channels, one of which no filter reads (its saliency is exactly 0): the map sums
    channels, so the pair rows mix a zero channel with a live one."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4), nn.Softplus(beta=4.0),
                        nn.Linear(4, 3)).eval()
    with torch.no_grad():
        net[0].weight[:, 1] = 0.0
    x = torch.rand(2, 2, 3, 3)
    res = certified_bound(net, x, eps, "inf", method=method)
    _check_certified(net, x, eps, "inf", res, (0.0, 1.0))


# ----------------------------------------------------------------------------------------------
# alpha-CROWN: cached auto_LiRPA modules (alpha parameters on nodes) never leak between calls
# ----------------------------------------------------------------------------------------------
def _fresh(model, x, eps, norm, **kw):
    saved, failed = dict(crown._CACHE), dict(crown._CONV_MODE_FAILED)
    crown._CACHE.clear()
    crown._CONV_MODE_FAILED.clear()
    try:
        return certified_bound(model, x, eps, norm, method="alpha-crown", **kw)
    finally:
        crown._CACHE.clear()
        crown._CACHE.update(saved)
        crown._CONV_MODE_FAILED.update(failed)


def _same(r, f):
    for a, b in ((r.lower, f.lower), (r.upper, f.upper), (r.euclidean, f.euclidean), (r.cosine, f.cosine)):
        assert torch.equal(a, b)
    assert torch.equal(r.label_certified, f.label_certified)


def _box_sound(net, x, eps, norm, r, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pts = sample_points(x, eps, norm, (0.0, 1.0), 64, gen)
    g = attr_fn(net, pts.flatten(0, 1), r.target.repeat(pts.shape[0]), "saliency").detach().view(pts.shape)
    assert bool((g <= r.upper.unsqueeze(0)).all()) and bool((g >= r.lower.unsqueeze(0)).all())


def test_alpha_crown_cache_sequence_matches_fresh():
    """One cached tanh MLP called with other batch sizes, radii and norms, then a different model of the
    same shapes, then an in-place weight edit: every result equals a freshly built module's."""
    def mk(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).eval()

    a, b = mk(1), mk(2)
    torch.manual_seed(3)
    xa, xb = torch.rand(3, 5), torch.rand(1, 5)
    seq = [(a, xa, 0.05, "inf"), (a, xb, 0.3, "inf"), (a, xa[:2], 0.01, "2"), (b, xa, 0.05, "inf"),
           (a, xa, 0.05, "inf")]
    for net, x, eps, norm in seq:
        r = certified_bound(net, x, eps, norm, method="alpha-crown", alpha_iters=2)
        _same(r, _fresh(net, x, eps, norm, alpha_iters=2))
        _box_sound(net, x, eps, norm, r)
    with torch.no_grad():
        a[0].weight.mul_(3.0)
    r = certified_bound(a, xa, 0.05, "inf", method="alpha-crown", alpha_iters=2)
    _same(r, _fresh(a, xa, 0.05, "inf", alpha_iters=2))
    _box_sound(a, xa, 0.05, "inf", r)


@pytest.mark.slow
def test_alpha_crown_cache_sequence_cnn_slow():
    """The same sequence on a CNN (patches / matrix mode, the remembered attempt of ``forward_bounds``)."""
    def mk(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2), nn.Sigmoid(),
                             nn.Flatten(), nn.Linear(8, 3)).eval()

    a, b = mk(1), mk(2)
    torch.manual_seed(3)
    xa, xb = torch.rand(3, 1, 4, 4), torch.rand(1, 1, 4, 4)
    seq = [(a, xa, 0.05, "inf"), (a, xb, 0.3, "inf"), (a, xa[:2], 0.2, "2"), (b, xa, 0.05, "inf"),
           (a, xa, 0.05, "inf")]
    for net, x, eps, norm in seq:
        r = certified_bound(net, x, eps, norm, method="alpha-crown", alpha_iters=3)
        _same(r, _fresh(net, x, eps, norm, alpha_iters=3))
        _box_sound(net, x, eps, norm, r)


@pytest.mark.parametrize("attribution", ["saliency", "grad_x_input"])
def test_huge_radius_never_nan(attribution):
    """eps = 1e300 without a domain: auto_LiRPA's bounds hit inf - inf; alpha-CROWN's optimiser then
    produced NaN planes and a NaN certificate (regression).  Every bound must be a number or +-inf."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Softplus(), nn.Linear(6, 3)).eval()
    x = torch.rand(2, 4)
    for method in ("crown", "alpha-crown"):
        for norm in ("inf", "2"):
            r = certified_bound(net, x, 1e300, norm, attribution, method=method, domain=None, alpha_iters=2)
            for t in (r.lower, r.upper, r.euclidean, r.cosine):
                assert not bool(torch.isnan(t).any()), (method, norm)
            assert bool((r.lower <= r.attribution_at_x).all()) and bool((r.upper >= r.attribution_at_x).all())


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
@pytest.mark.parametrize("norm", ["inf", "2"])
def test_affine_net_certified(method, norm):
    """A net without activations (the gradient is constant, independent of x'): auto_LiRPA 0.3 broadcast
    its bounds over (rows x rows) and alpha-CROWN crashed with a shape error (regression); the box must
    contain the (constant) gradient and be tight."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).eval()
    x = torch.rand(5, 3)
    r = certified_bound(net, x, 0.1, norm, method=method, alpha_iters=2)
    g = r.attribution_at_x
    assert bool((r.lower <= g).all()) and bool((r.upper >= g).all())
    assert float((r.upper - r.lower).max()) < 1e-4


@pytest.mark.parametrize("attribution", ["saliency", "grad_x_input"])
@pytest.mark.parametrize("objective", ["euclidean", "cosine"])
def test_affine_net_complete(attribution, objective):
    """complete_bound on an affine net (no discrete factor: branching "auto" falls back to input
    branching): the input attack's ascent has no gradient (saliency) and the bounding pass hit the
    auto_LiRPA broadcast; both crashed (regression).  Checked by sampling (PGD has no gradient here)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).eval()
    x = torch.rand(2, 3)
    for norm in ("inf", "2"):
        r = complete_bound(net, x, 0.1, norm, attribution=attribution, objective=objective, budget_s=0.3)
        assert r.method == "input-bab"
        pts = sample_points(x, 0.1, norm, (0.0, 1.0), 200, torch.Generator().manual_seed(0))
        vals = _values(net, pts, x, r.target, attribution, cosine=objective == "cosine")
        if objective == "cosine":
            assert bool((vals.min(0).values >= r.lower).all())
        else:
            assert bool((vals.max(0).values <= r.upper).all())
