"""Practical first-order bound (bounds/practical.py, bounds/linalg.py) against closed forms and brute force.

Oracles: sigma_max of an explicit matrix (torch.linalg), the exact linf worst case of a linear map by
enumerating the 2^n vertices, the exact Jacobian (torch.autograd.functional.jacobian) + SVD, Nesterov's
pi/2 ratio for the SDP relaxation, and the linearised margins from the explicit logit Jacobian.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bounds import linalg, practical_bound, tangent_cosine
from bounds.attribution import attribution as attribution_fn
from bounds.practical import _softplus_copy


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: one intra-op thread is much faster (and immune to oversubscription)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


class Quadratic(nn.Module):
    """f_0(x) = 0.5 x^T A x + b^T x; the other logits are f_0 - 1 - k, so the label is always 0 and
    saliency g = A x + b (A symmetric): J = A exactly."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor, classes: int = 3):
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("b", b)
        self.classes = classes

    def forward(self, x):
        z = x.reshape(x.shape[0], -1)
        f = 0.5 * ((z @ self.A) * z).sum(1) + z @ self.b
        return torch.stack([f] + [f - 1.0 - k for k in range(self.classes - 1)], 1)


def _quadratic(n: int, seed: int) -> tuple[Quadratic, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=gen, dtype=torch.float64)
    A = (M + M.T) / 2
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    return Quadratic(A, b), A


def _brute_box(J: np.ndarray, low: np.ndarray, up: np.ndarray) -> float:
    """max ||J delta|| over the vertices of the box [low, up] (n <= 14)."""
    n = J.shape[1]
    bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    verts = np.where(bits == 1, up[None, :], low[None, :])
    return float(np.sqrt(((verts @ J.T) ** 2).sum(1).max()))


def _tiny_mlp(activation: str = "softplus", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    act = nn.Softplus(beta=3.0) if activation == "softplus" else nn.ReLU()
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 8), act, nn.Linear(8, 3)).double().eval()


def _tiny_cnn(activation: str = "softplus", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    act = (lambda: nn.Softplus(beta=2.0)) if activation == "softplus" else nn.ReLU
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), act(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(12, 6), act(), nn.Linear(6, 4)).double().eval()


def _exact_jacobian(model, x, target, name, steps=8):
    """(B, n, n) Jacobians of the attribution, one sample at a time, by torch.autograd.functional.jacobian."""
    out = []
    for i in range(x.shape[0]):
        def g(z, i=i):
            z = z if z.requires_grad else z.requires_grad_(True)
            return attribution_fn(model, z, target[i:i + 1], name, steps=steps, create_graph=True)
        J = torch.autograd.functional.jacobian(g, x[i:i + 1].clone())
        n = x[i].numel()
        out.append(J.reshape(n, n))
    return torch.stack(out)


# ------------------------------------------------------------------------------------- quadratic model


def test_quadratic_l2_is_eps_sigma_max():
    model, A = _quadratic(10, seed=1)
    x = torch.rand(3, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eps = 0.3
    r = practical_bound(model, x, eps=eps, norm=2)
    sigma = torch.linalg.svdvals(A)[0]
    torch.testing.assert_close(r.euclidean, torch.full((3,), float(eps * sigma), dtype=torch.float64), rtol=1e-6, atol=0)
    assert r.kind == "practical" and r.network == "real" and r.norm == "2"
    assert (r.details["residual"] < 1e-4).all() and r.details["converged"].all()
    assert (r.target == 0).all() and r.label_certified.all()  # margins 1, 2 with zero gradient
    g = A @ x.T + model.b[:, None]
    torch.testing.assert_close(r.cosine, tangent_cosine(r.euclidean, g.T.norm(dim=1)))


@pytest.mark.parametrize("method", ["sqrt_n", "columns", "sdp", "dual", "auto"])
def test_quadratic_linf_relaxations_bracket_the_vertex_maximum(method):
    n, eps = 10, 0.2
    model, A = _quadratic(n, seed=3)
    x = torch.rand(2, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    r = practical_bound(model, x, eps=eps, norm="inf", linf_method=method, domain=None)
    An = A.numpy()
    exact = eps * _brute_box(An, -np.ones(n), np.ones(n))  # linearised worst case over the vertices
    sigma = float(torch.linalg.svdvals(A)[0])
    upper = eps * math.sqrt(n) * sigma
    assert (r.euclidean >= exact * (1 - 1e-9)).all()
    assert (r.euclidean <= upper * (1 + 1e-9)).all()
    for name, value in r.details["linf"].items():  # every relaxation that ran is a valid upper bound
        assert (value >= exact * (1 - 1e-9)).all(), name
    assert r.details["linf"]["sqrt_n"] == pytest.approx(upper, rel=1e-6)
    cols = eps * np.linalg.norm(An, axis=0).sum()
    if "columns" in r.details["linf"]:
        assert r.details["linf"]["columns"].numpy() == pytest.approx(cols, rel=1e-9)
    if method in ("sdp", "dual", "auto"):
        sdp = r.details["linf"][method if method != "auto" else "dual"]
        # Nesterov: the SDP value is within pi/2 of the squared inf->2 norm (A^T A is PSD)
        assert (sdp <= exact * math.sqrt(math.pi / 2) * (1 + 1e-6)).all()
        assert (sdp <= min(cols, upper) * (1 + 1e-9)).all()
    if method == "auto":
        assert set(r.details["linf"]) == {"sqrt_n", "columns", "sdp", "dual"}  # n = 10: all affordable
        torch.testing.assert_close(r.details["linf"]["sdp"], r.details["linf"]["dual"], rtol=1e-3, atol=0)


def test_linf_domain_box_is_valid_and_tighter():
    n, eps = 8, 0.3
    model, A = _quadratic(n, seed=5)
    x = torch.tensor([[0.0, 1.0, 0.1, 0.95, 0.5, 0.0, 0.2, 0.7]], dtype=torch.float64)
    r_box = practical_bound(model, x, eps=eps, norm="inf", linf_method="auto", domain=(0.0, 1.0))
    r_full = practical_bound(model, x, eps=eps, norm="inf", linf_method="auto", domain=None)
    low = np.maximum(-eps, 0.0 - x[0].numpy())
    up = np.minimum(eps, 1.0 - x[0].numpy())
    exact = _brute_box(A.numpy(), low, up)
    for name, value in r_box.details["linf"].items():
        assert float(value) >= exact * (1 - 1e-9), name
    assert r_box.details["box_centred"]
    assert float(r_box.details["linf"]["columns"]) <= float(r_full.details["linf"]["columns"]) + 1e-12
    assert float(r_box.details["linf"]["dual"]) <= float(r_full.details["linf"]["dual"]) * (1 + 1e-6)
    assert float(r_box.euclidean) < float(r_full.euclidean)


# ------------------------------------------------------------------------------------- networks vs brute force


@pytest.mark.parametrize("name", ["saliency", "grad_x_input", "ig"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_sigma_max_matches_exact_jacobian_svd(name, arch):
    model = _tiny_mlp() if arch == "mlp" else _tiny_cnn()
    shape = (3, 6) if arch == "mlp" else (3, 1, 4, 4)
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    r = practical_bound(model, x, eps=0.1, norm=2, attribution=name, ig_steps=8)
    J = _exact_jacobian(model, x, r.target, name, steps=8)
    sigma = torch.linalg.svdvals(J)[:, 0]
    torch.testing.assert_close(r.details["sigma_max"], sigma, rtol=1e-3, atol=0)
    torch.testing.assert_close(r.euclidean, 0.1 * sigma, rtol=1e-3, atol=0)
    if name == "saliency":
        assert torch.allclose(J, J.transpose(1, 2), atol=1e-12)  # the Hessian path relies on symmetry
    # linf columns bound: sum of the exact column norms
    rl = practical_bound(model, x, eps=0.1, norm="inf", attribution=name, ig_steps=8, linf_method="columns",
                         domain=None)
    torch.testing.assert_close(rl.details["linf"]["columns"], 0.1 * J.norm(dim=1).sum(1), rtol=1e-9, atol=1e-15)


def test_relu_network_uses_softplus_surrogate():
    relu = _tiny_cnn("relu", seed=3)
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    r = practical_bound(relu, x, eps=0.05, surrogate_beta=10.0)
    assert r.network == "softplus-surrogate(beta=10)"
    surrogate = _softplus_copy(relu, 10.0)
    assert not any(isinstance(m, nn.ReLU) for m in surrogate.modules())
    assert any(isinstance(m, nn.ReLU) for m in relu.modules())  # the user's model is untouched
    r2 = practical_bound(surrogate, x, eps=0.05, target=r.target)
    assert r2.network == "real"
    torch.testing.assert_close(r.euclidean, r2.euclidean, rtol=1e-9, atol=0)
    sigma = torch.linalg.svdvals(_exact_jacobian(surrogate, x, r.target, "saliency"))[:, 0]
    torch.testing.assert_close(r.euclidean, 0.05 * sigma, rtol=1e-3, atol=0)
    # target = argmax of the REAL network
    assert torch.equal(r.target, relu(x).argmax(1))


def test_batch_of_four_equals_four_single_runs():
    model = _tiny_cnn(seed=4)
    x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for kw in ({"norm": 2}, {"norm": "inf", "linf_method": "columns"}, {"norm": 2, "attribution": "grad_x_input"}):
        batch = practical_bound(model, x, eps=0.1, **kw)
        singles = [practical_bound(model, x[i:i + 1], eps=0.1, **kw) for i in range(4)]
        torch.testing.assert_close(batch.euclidean, torch.cat([s.euclidean for s in singles]), rtol=1e-7, atol=0)
        torch.testing.assert_close(batch.cosine, torch.cat([s.cosine for s in singles]), rtol=1e-7, atol=1e-12)
        assert batch.details["iterations"].tolist() == [int(s.details["iterations"]) for s in singles]
        assert batch.label_certified.tolist() == [bool(s.label_certified) for s in singles]
        assert (batch.details["residual"] < 10 * 1e-4).all()


def test_larger_batch_matches_exact_with_small_residuals(monkeypatch):
    # enough samples, converging at different iterations, that finished ones are dropped from the batch
    # several times during Lanczos (each time relative to the already reduced batch)
    from bounds.practical import JacobianProducts

    sizes = []
    original = JacobianProducts.subset

    def spy(self, rows):
        sizes.append((self.batch, len(rows)))
        return original(self, rows)

    monkeypatch.setattr(JacobianProducts, "subset", spy)
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Softplus(beta=4.0), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(64, 12), nn.Softplus(beta=4.0), nn.Linear(12, 4)).double().eval()
    x = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    r = practical_bound(model, x, eps=0.1, tol=1e-6)
    assert len(sizes) >= 2 and sizes[1][0] < 24  # a reduced batch was itself reduced
    sigma = torch.linalg.svdvals(_exact_jacobian(model, x, r.target, "saliency"))[:, 0]
    torch.testing.assert_close(r.details["sigma_max"], sigma, rtol=1e-6, atol=0)
    assert (r.details["residual"] < 1e-4).all()
    assert r.details["row_products"] < r.details["products"] * 24  # finished samples stopped costing work


@pytest.mark.parametrize("norm,q", [(2, 2), ("inf", 1)])
def test_label_certificate_is_the_linearised_margin(norm, q):
    model = _tiny_mlp(seed=5)
    x = torch.rand(6, 6, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    eps = 0.4
    r = practical_bound(model, x, eps=eps, norm=norm)
    logits = model(x).detach()
    jac = torch.stack([torch.autograd.functional.jacobian(model, x[i:i + 1]).reshape(3, 6) for i in range(6)])
    y = logits.argmax(1)
    worst = []
    for i in range(6):
        vals = [float(logits[i, y[i]] - logits[i, j]) - eps * float((jac[i, y[i]] - jac[i, j]).norm(p=q))
                for j in range(3) if j != y[i]]
        worst.append(min(vals))
    worst = torch.tensor(worst, dtype=torch.float64)
    torch.testing.assert_close(r.details["linearised_margin"], worst, rtol=1e-9, atol=1e-12)
    assert r.label_certified.tolist() == (worst > 0).tolist()


def test_eps_zero_is_exact():
    model = _tiny_cnn(seed=6)
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    for norm in (2, "inf"):
        r = practical_bound(model, x, eps=0.0, norm=norm)
        assert torch.equal(r.euclidean, torch.zeros(3, dtype=torch.float64))
        assert torch.equal(r.cosine, torch.ones(3, dtype=torch.float64))


def test_float32_conv_net_and_cosine():
    model = _tiny_cnn(seed=7).float()
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(12))
    r = practical_bound(model, x, eps=0.02)
    g = attribution_fn(model, x, r.target, "saliency")
    torch.testing.assert_close(r.details["g_norm"], g.reshape(5, -1).norm(dim=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(r.cosine, tangent_cosine(r.euclidean, r.details["g_norm"]))
    assert r.euclidean.dtype == torch.float32 and (r.euclidean > 0).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"eps": -0.1}, "eps"),
    ({"eps": float("nan")}, "eps"),
    ({"eps": 0.1, "norm": "L3"}, "norm"),
    ({"eps": 0.1, "norm": 1}, "norm"),
    ({"eps": 0.1, "attribution": "lime"}, "attribution"),
    ({"eps": 0.1, "linf_method": "magic"}, "linf_method"),
    ({"eps": 0.1, "domain": (1.0, 0.0)}, "domain"),
    ({"eps": 0.1, "target": 7}, "target"),
    ({"eps": 0.1, "surrogate_beta": 0.0}, "surrogate_beta"),
])
def test_bad_input_raises_clear_errors(kwargs, match):
    model = _tiny_mlp()
    x = torch.rand(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        practical_bound(model, x, **kwargs)


def test_nan_input_raises():
    x = torch.rand(2, 6, dtype=torch.float64)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        practical_bound(_tiny_mlp(), x, eps=0.1)
    with pytest.raises(ValueError, match="batch"):
        practical_bound(_tiny_mlp(), torch.rand(6, dtype=torch.float64), eps=0.1)


def test_norm_spellings():
    model, _ = _quadratic(4, seed=2)
    x = torch.rand(1, 4, dtype=torch.float64)
    a = practical_bound(model, x, eps=0.1, norm="l2").euclidean
    b = practical_bound(model, x, eps=0.1, norm=2).euclidean
    c = practical_bound(model, x, eps=0.1, norm=float("inf"), domain=None, linf_method="columns").euclidean
    d = practical_bound(model, x, eps=0.1, norm="Linf", domain=None, linf_method="columns").euclidean
    assert torch.equal(a, b) and torch.equal(c, d)


# ------------------------------------------------------------------------------------- linalg


def _sym_batch(batch, n, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(batch, n, n, generator=gen, dtype=dtype)
    return (M + M.transpose(1, 2)) / 2


def test_lanczos_and_power_iteration_match_eigvalsh():
    S = _sym_batch(5, 40, seed=13)
    # make sample 0 nearly symmetric at both ends: lambda_min ~ -lambda_max (a misconvergence trap)
    evals, evecs = torch.linalg.eigh(S[0])
    evals[-1], evals[0] = 10.0, -10.1
    S[0] = evecs @ torch.diag(evals) @ evecs.T
    exact = torch.linalg.eigvalsh(S)
    v0 = torch.randn(5, 40, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    res = linalg.lanczos_top(lambda v: torch.bmm(S, v.unsqueeze(2)).squeeze(2), v0, tol=1e-8, max_iter=40,
                             largest_magnitude=True)
    torch.testing.assert_close(res.value.abs(), exact.abs().amax(1), rtol=1e-7, atol=0)
    assert res.converged.all()
    gram = torch.bmm(S, S)
    psd = linalg.lanczos_top(lambda v: torch.bmm(gram, v.unsqueeze(2)).squeeze(2), v0, tol=1e-8, max_iter=40)
    torch.testing.assert_close(psd.value, exact.abs().amax(1) ** 2, rtol=1e-7, atol=0)
    # residual of the returned Ritz vector is what was reported (up to the estimate's accuracy)
    y = psd.vector
    resid = (torch.bmm(gram, y.unsqueeze(2)).squeeze(2) - psd.value.unsqueeze(1) * y).norm(dim=1) / psd.value
    assert (resid < 1e-6).all()
    pw = linalg.power_iteration(lambda v: torch.bmm(gram[1:], v.unsqueeze(2)).squeeze(2), v0[1:], tol=1e-6,
                                max_iter=3000)
    torch.testing.assert_close(pw.value, exact[1:].abs().amax(1) ** 2, rtol=2e-3, atol=0)
    assert (pw.value <= exact[1:].abs().amax(1) ** 2 * (1 + 1e-12)).all()  # Rayleigh quotients: lower estimates


def test_lanczos_dropping_finished_rows_changes_nothing():
    S = _sym_batch(12, 30, seed=17)
    S = S * torch.linspace(0.5, 3.0, 12, dtype=torch.float64).view(-1, 1, 1)
    v0 = torch.randn(30, generator=torch.Generator().manual_seed(18), dtype=torch.float64).expand(12, 30).clone()
    current = {"rows": torch.arange(12)}
    calls = []

    def make(rows):
        return lambda v: torch.bmm(S[rows], v.unsqueeze(2)).squeeze(2)

    def restrict(keep):  # keep is relative to the operator in use now
        current["rows"] = current["rows"][keep]
        calls.append(len(keep))
        return make(current["rows"])

    plain = linalg.lanczos_top(make(torch.arange(12)), v0, tol=1e-7, max_iter=30, largest_magnitude=True)
    fast = linalg.lanczos_top(make(torch.arange(12)), v0, tol=1e-7, max_iter=30, largest_magnitude=True,
                              restrict=restrict, shrink=0.9)
    assert len(calls) >= 2  # several successive restrictions happened
    torch.testing.assert_close(fast.value, plain.value, rtol=1e-12, atol=0)
    torch.testing.assert_close(fast.vector, plain.vector, rtol=0, atol=1e-10)
    assert torch.equal(fast.iterations, plain.iterations)
    torch.testing.assert_close(plain.value.abs(), torch.linalg.eigvalsh(S).abs().amax(1), rtol=1e-9, atol=0)


def test_lanczos_small_dimension_breakdown():
    S = torch.diag(torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64)).expand(2, 3, 3).clone()
    S[1] = torch.zeros(3, 3, dtype=torch.float64)  # zero operator: value 0, no NaN
    v0 = torch.ones(2, 3, dtype=torch.float64)
    res = linalg.lanczos_top(lambda v: torch.bmm(S, v.unsqueeze(2)).squeeze(2), v0, max_iter=100,
                             largest_magnitude=True)
    assert res.value.tolist() == pytest.approx([3.0, 0.0], abs=1e-12)
    assert int(res.iterations.max()) <= 3 and res.converged.all()


def test_sdp_and_dual_against_brute_force():
    rng = np.random.default_rng(15)
    for n in (5, 9, 12):
        J = rng.standard_normal((3, n, n)) * rng.uniform(0.1, 2.0, (3, 1, n))
        gram = np.einsum("bij,bik->bjk", J, J)
        dual, _ = linalg.dual_bound(gram)
        sdp, sinfo = linalg.sdp_bound(gram)
        for b in range(3):
            exact2 = linalg.brute_force_inf_to_2(J[b]) ** 2
            cols2 = np.linalg.norm(J[b], axis=0).sum() ** 2
            top = n * np.linalg.eigvalsh(gram[b])[-1]
            for value in (dual[b], sdp[b]):
                assert exact2 * (1 - 1e-9) <= value <= exact2 * math.pi / 2 * (1 + 1e-6)
                assert value <= min(cols2, top) * (1 + 1e-9)
            assert dual[b] == pytest.approx(sdp[b], rel=2e-3)
        assert all(s.startswith("optimal") for s in sinfo["status"])


def test_dual_value_is_a_valid_bound_for_any_point():
    rng = np.random.default_rng(16)
    J = rng.standard_normal((7, 7))
    gram = (J.T @ J)[None]
    exact2 = linalg.brute_force_inf_to_2(J) ** 2
    for _ in range(20):
        y = rng.standard_normal((1, 7)) * 10
        assert linalg.dual_value(gram, y)[0] >= exact2 * (1 - 1e-12)
