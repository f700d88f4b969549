"""bounds.product_backward: CROWN's step through a * b (BoundProduct) is valid, and its shortcuts (point
factors, gathered wide columns, the factor's coefficients concretised in place) give the same bound
as the plain mixed-McCormick formula."""

from __future__ import annotations

import pytest
import torch

from bounds import product_backward as pb

S, B, N = 5, 3, 40


def _case(seed: int, point_cols: int = 30, per_spec: bool = False, mixed: str = "default"):
    """Boxes with point factors (all of the first ``point_cols`` columns, plus 20% scattered entries), a
    coefficient matrix with zeros, optional mixing weights."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.float64
    xl = torch.randn(B, N, generator=gen, dtype=d)
    xu = xl + torch.rand(B, N, generator=gen, dtype=d)
    xu[:, :point_cols] = xl[:, :point_cols]
    xu = torch.where(torch.rand(B, N, generator=gen) < 0.2, xl, xu)
    yl = torch.randn(B, N, generator=gen, dtype=d)
    yu = yl + torch.rand(B, N, generator=gen, dtype=d) * 2
    a = torch.randn(S, B, N, generator=gen, dtype=d) * (torch.rand(S, B, N, generator=gen) < 0.6)
    mix = None
    if mixed == "random":
        shape = (S, B, N) if per_spec else (B, N)
        mix = (torch.rand(shape, generator=gen, dtype=d), torch.rand(shape, generator=gen, dtype=d))
    return a, (xl, xu, yl, yu), mix, gen


def _points(bounds, gen, count: int = 64):
    """Samples of (a, b) in the box, vertices included."""
    xl, xu, yl, yu = bounds
    out = []
    for i in range(count):
        if i < 16:  # vertices
            ta = torch.randint(0, 2, xl.shape, generator=gen).to(xl.dtype)
            tb = torch.randint(0, 2, xl.shape, generator=gen).to(xl.dtype)
        else:
            ta = torch.rand(xl.shape, generator=gen, dtype=xl.dtype)
            tb = torch.rand(xl.shape, generator=gen, dtype=xl.dtype)
        out.append((xl + ta * (xu - xl), yl + tb * (yu - yl)))
    return out


def _lin(coef, v):
    return 0.0 if coef is None else (coef * v).sum(dim=2)


def _concretised(coef, bounds, lower: bool):
    """min / max of sum_j coef_j a_j over a's box."""
    if coef is None:
        return 0.0
    xl, xu = bounds[0], bounds[1]
    mid, rad = (xu + xl) / 2, (xu - xl) / 2
    spread = (coef.abs() * rad).sum(dim=2)
    return (coef * mid).sum(dim=2) + (-spread if lower else spread)


def _reference(a, bounds, mix, use_mix):
    """The plain formula (no shortcuts): mixed planes everywhere, A p + min(A, 0) (q - p)."""
    xl, xu, yl, yu = bounds
    lower = (yl, xl, -xl * yl)
    upper = (yu, xl, -xl * yu)
    if use_mix:
        lam, mu = pb.default_mix(yl, yu) if mix is None else mix
        l2, u2 = (yu, xu, -xu * yu), (yl, xu, -xu * yl)
        lower = tuple(lam * p + (1 - lam) * q for p, q in zip(lower, l2))
        upper = tuple(mu * p + (1 - mu) * q for p, q in zip(upper, u2))
    out = []
    for p, q in ((lower, upper), (upper, lower)):
        neg = a.clamp(max=0)
        coefs = [a * p[i] + neg * (q[i] - p[i]) for i in range(2)]
        bias = (a * p[2]).sum(dim=2) + (neg * (q[2] - p[2])).sum(dim=2)
        out.append((coefs[0], coefs[1], bias))
    return out


@pytest.mark.parametrize("use_mix", [True, False])
@pytest.mark.parametrize("mixed,per_spec", [("default", False), ("random", False), ("random", True)])
@pytest.mark.parametrize("concretize", [False, True])
@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])  # dense ops / gathered columns
def test_bounds_valid_and_equal_to_plain_formula(monkeypatch, use_mix, mixed, per_spec, concretize, fraction):
    monkeypatch.setattr(pb, "MAX_WIDE_FRACTION", fraction)
    for seed in range(3):
        a, bounds, mix, gen = _case(seed, per_spec=per_spec, mixed=mixed)
        (ax, ay), lb, ub = pb.product_backward(a, a, bounds, mix, use_mix, concretize)
        if concretize:
            assert ax == (None, None)
        for xa, xb in _points(bounds, gen):
            exact = (a * xa * xb).sum(dim=2)
            lo = _concretised(ax[0], bounds, True) + _lin(ay[0], xb) + lb
            hi = _concretised(ax[1], bounds, False) + _lin(ay[1], xb) + ub
            # the linear (unconcretised) form is valid too
            lo_lin = _lin(ax[0], xa) + _lin(ay[0], xb) + lb
            hi_lin = _lin(ax[1], xa) + _lin(ay[1], xb) + ub
            tol = 1e-12 * (1 + exact.abs())
            assert (lo <= exact + tol).all() and (exact <= hi + tol).all()
            assert (lo_lin <= exact + tol).all() and (exact <= hi_lin + tol).all()
        # the same bound as the plain formula once a's coefficients are concretised over its box
        ref = _reference(a, bounds, mix, use_mix)
        for side, (rx, ry, rb), cx, cy, cb in ((True, ref[0], ax[0], ay[0], lb), (False, ref[1], ax[1], ay[1], ub)):
            yl, yu = bounds[2], bounds[3]
            for yb in (yl, yu, (yl + yu) / 2):
                want = _concretised(rx, bounds, side) + _lin(ry, yb) + rb
                got = _concretised(cx, bounds, side) + _lin(cy, yb) + cb
                assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_all_points_give_one_shared_tensor_and_no_factor_coefficients():
    a, (xl, xu, yl, yu), _, _ = _case(0, point_cols=N)
    xu = xl.clone()
    (ax, ay), lb, ub = pb.product_backward(a, a, (xl, xu, yl, yu), None, True)
    assert ax == (None, None) and ay[0] is ay[1]
    assert torch.equal(ay[0], a * xl) and lb == 0 and ub == 0


def test_shared_batch_coefficients_and_shapes():
    """An identity-like spec expanded over the batch (stride 0), 5-d shapes, per-spec weights."""
    gen = torch.Generator().manual_seed(3)
    d = torch.float64
    shape = (B, 2, 3, 3)
    xl = torch.rand(shape, generator=gen, dtype=d).round()
    xu = xl.clone()
    xu[:, 0, 1, 1] = 1.0
    xl[:, 0, 1, 1] = 0.0
    yl = -torch.rand(shape, generator=gen, dtype=d)
    yu = torch.rand(shape, generator=gen, dtype=d)
    eye = torch.eye(18, dtype=d).view(18, 1, 2, 3, 3).expand(18, B, 2, 3, 3)
    (ax, ay), lb, ub = pb.product_backward(eye, eye, (xl, xu, yl, yu), None, True, True)
    assert ax == (None, None) and ay[0].shape == (18, B, 2, 3, 3) and lb.shape == (18, B)
    # row 4 (the one unstable entry): valid at every vertex (a, b) of its box
    for av in (0.0, 1.0):
        for bv in (yl[:, 0, 1, 1], yu[:, 0, 1, 1]):
            b = yl.clone()
            b[:, 0, 1, 1] = bv
            exact = av * bv
            lo = (ay[0][4] * b).flatten(1).sum(1) + lb[4]
            hi = (ay[1][4] * b).flatten(1).sum(1) + ub[4]
            assert (lo <= exact + 1e-12).all() and (hi >= exact - 1e-12).all()
