"""Tests for certattr.attacks: projection (scipy oracles), seeded streams, PGD, IFIA, deviation attacks,
Chen et al.'s protocol, input validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from certattr.attacks import deviation_attack, evaluate_attribution_robustness, ifia, pgd
from certattr.attacks.base import (
    SampleStream,
    max_violation,
    project,
    real_eval,
    row_beta_surrogate,
    sample_keys,
)
from certattr.attributions import attribution_map, saliency
from certattr.errors import CertattrError
from certattr.metrics import dissimilarities
from certattr.models import build_model, softplus_surrogate

TOL = 1e-6


def _small_cnn(seed: int = 0, activation: str = "relu"):
    torch.manual_seed(seed)
    model = build_model("cnn-small", in_shape=(1, 12, 12), activation=activation).eval()
    return model


def _images(n: int, seed: int = 0, shape=(1, 12, 12)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n,) + shape, generator=gen)
    x[x < 0.4] = 0.0  # MNIST-like: black background on the domain boundary
    return x


def _correct(model, x, y, n):
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return x[ok][:n], y[ok][:n]


def _assert_feasible(x_adv, x, eps, norm, lo=0.0, hi=1.0):
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "inf" else delta.norm(dim=1)
    assert float(size.max()) <= eps + TOL
    assert float(x_adv.min()) >= lo - TOL and float(x_adv.max()) <= hi + TOL


def _assert_label_contract(model, x, res):
    """label_kept is the real net's verdict; x_adv is x itself where nothing was found."""
    with torch.no_grad():
        kept = model(res.x_adv).argmax(1) == res.label
    assert torch.equal(kept, res.label_kept)
    assert torch.equal(res.x_adv[~res.found], x[~res.found])
    assert bool(res.label_kept[res.found].all())


# ------------------------------------------------------------------------------------ projection

def test_linf_projection_is_the_exact_box_projection_scipy():
    rng = np.random.default_rng(0)
    x0 = torch.from_numpy(rng.random((4, 6)))
    v = torch.from_numpy(rng.normal(0.5, 0.6, (4, 6)))
    eps = 0.2
    ours = project(v, x0, eps, "inf", (0.0, 1.0))
    for i in range(4):
        lb = np.maximum(0.0, x0[i].numpy() - eps)
        ub = np.minimum(1.0, x0[i].numpy() + eps)
        ref = optimize.lsq_linear(np.eye(6), v[i].numpy(), bounds=(lb, ub)).x
        np.testing.assert_allclose(ours[i].numpy(), ref, atol=1e-8)


def test_l2_projection_feasible_and_exact_when_domain_does_not_bind():
    rng = np.random.default_rng(1)
    x0 = torch.from_numpy(rng.random((64, 10)))
    v = x0 + torch.from_numpy(rng.normal(0, 0.5, (64, 10)))
    eps = 0.4
    out = project(v, x0, eps, "2", (0.0, 1.0))
    assert float((out - x0).norm(dim=1).max()) <= eps + 1e-12
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert float(max_violation(out, x0, eps, "2", (0.0, 1.0))) <= 1e-12
    radial = x0 + (v - x0) * (eps / (v - x0).norm(dim=1, keepdim=True)).clamp(max=1)
    inside = ((radial >= 0) & (radial <= 1)).all(dim=1)
    assert inside.any()
    # where clipping does not bind, the result is the exact projection onto the ball (scipy SLSQP oracle)
    i = int(inside.nonzero()[0])
    res = optimize.minimize(lambda z: ((z - v[i].numpy()) ** 2).sum(), x0[i].numpy(), method="SLSQP",
                            constraints=[{"type": "ineq", "fun": lambda z: eps ** 2 - ((z - x0[i].numpy()) ** 2).sum()}],
                            bounds=[(0, 1)] * 10, options={"ftol": 1e-12})
    np.testing.assert_allclose(out[i].numpy(), res.x, atol=1e-5)
    # feasible points are fixed points
    torch.testing.assert_close(project(out, x0, eps, "2", (0.0, 1.0)), out)


# ------------------------------------------------------------------------------- random streams

def test_stream_depends_only_on_seed_restart_and_sample():
    x = _images(5)
    a = SampleStream(sample_keys(x, 7, 3), x.shape[1:], x.dtype).normal().view(3, 5, -1)
    b = SampleStream(sample_keys(x[2:3], 7, 3), x.shape[1:], x.dtype).normal().view(3, 1, -1)
    torch.testing.assert_close(a[:, 2:3], b, rtol=0, atol=0)
    c = SampleStream(sample_keys(x, 8, 3), x.shape[1:], x.dtype).normal().view(3, 5, -1)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # restarts differ
    assert not torch.equal(a[:, 0], a[:, 1])  # samples differ


def test_stream_distributions_match_scipy():
    x = _images(4)
    stream = SampleStream(sample_keys(x, 0, 1), (2000,), torch.float64)
    z = stream.normal().flatten().numpy()
    u = stream.uniform().flatten().numpy()
    s = stream.signs().flatten().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert set(np.unique(s)) == {-1.0, 1.0} and abs(s.mean()) < 0.05
    ball = SampleStream(sample_keys(x, 0, 1), (3, 4, 4), torch.float64).ball(0.5, "2")
    assert float(ball.flatten(1).norm(dim=1).max()) <= 0.5 + 1e-12


def test_row_beta_surrogate_matches_softplus_surrogate():
    model = _small_cnn()
    x = _images(6)
    sur, holder = row_beta_surrogate(model)
    holder.beta = torch.tensor([1.0, 10.0, 50.0, 1.0, 10.0, 50.0])
    with torch.no_grad():
        out = sur(x)
        for i, beta in enumerate(holder.beta.tolist()):
            torch.testing.assert_close(out[i:i + 1], softplus_surrogate(model, beta)(x[i:i + 1]))


# ------------------------------------------------------------------------------------------ PGD

def test_pgd_breaks_trained_cnn(trained_cnn_small, mnist_test):
    x, y = mnist_test[0][:100], mnist_test[1][:100]
    adv = pgd(trained_cnn_small, x, y, eps=0.3, norm="inf", steps=40, step_size=0.01)
    _assert_feasible(adv, x, 0.3, "inf")
    with torch.no_grad():
        acc = float((trained_cnn_small(adv).argmax(1) == y).float().mean())
    assert acc < 0.05


def test_pgd_train_mode_no_param_grads_l2_and_custom_loss():
    model = _small_cnn().train()
    x = _images(6)
    y = torch.arange(6) % 10
    adv = pgd(model, x, y, eps=1.0, norm=2, steps=5, step_size=0.3, restarts=2)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    _assert_feasible(adv, x, 1.0, "2")
    with torch.no_grad():
        p_clean = torch.softmax(model(x), 1)

    def kl(m, xa, yy):
        return torch.nn.functional.kl_div(torch.log_softmax(m(xa), 1), p_clean, reduction="none").sum(1)

    with torch.no_grad():  # also runs inside no_grad
        adv_kl = pgd(model, x, y, eps=0.1, steps=5, step_size=0.03, loss_fn=kl)
        assert float(kl(model, adv_kl, y).mean()) > float(kl(model, x, y).mean())
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------------------- IFIA

def test_ifia_topk_beats_random_baseline(trained_cnn_small, mnist_test):
    x, y = _correct(trained_cnn_small, mnist_test[0][:40], mnist_test[1][:40], 24)
    kw = {"eps": 0.1, "norm": "inf", "k": 100, "steps": 30, "step_size": 0.01}
    top = ifia(trained_cnn_small, x, kind="topk", **kw)
    rnd = ifia(trained_cnn_small, x, kind="random", **kw)
    for res in (top, rnd):
        _assert_feasible(res.x_adv, x, 0.1, "inf")
        _assert_label_contract(trained_cnn_small, x, res)
    assert top.network == "softplus-surrogate(beta=10)"
    assert float(top.topk_intersection.mean()) < float(rnd.topk_intersection.mean()) - 0.05
    # reported metrics are the real network's dissimilarities between g(x) and g(x_adv)
    ref = dissimilarities(saliency(trained_cnn_small, x, y), saliency(trained_cnn_small, top.x_adv, y), 100)
    for key, value in ref.items():
        torch.testing.assert_close(getattr(top, key), value, equal_nan=True)
    tau = [stats.kendalltau(attribution_map(saliency(trained_cnn_small, x[i:i + 1], y[i:i + 1]))[0].numpy(),
                            attribution_map(saliency(trained_cnn_small, top.x_adv[i:i + 1], y[i:i + 1]))[0].numpy())[0]
           for i in range(3)]
    np.testing.assert_allclose(top.kendall[:3].numpy(), tau, atol=1e-5)


@pytest.mark.parametrize("norm,eps,step", [("inf", 0.1, 0.02), ("2", 1.0, 0.2)])
def test_ifia_kinds_feasible_and_criteria(norm, eps, step):
    model = _small_cnn()
    x = _images(5)
    mask = torch.zeros(12, 12)
    mask[:6, :6] = 1
    for kind in ("topk", "mass_center", "targeted", "random"):
        res = ifia(model, x, eps=eps, norm=norm, kind=kind, k=20, steps=6, step_size=step, restarts=2,
                   target_mask=mask if kind == "targeted" else None)
        _assert_feasible(res.x_adv, x, eps, norm)
        _assert_label_contract(model, x, res)
        assert res.kind == f"ifia-{kind}" and res.restarts == 2 and res.steps == 6 and res.time > 0
        m_adv = attribution_map(saliency(model, res.x_adv, res.label))
        m0 = attribution_map(saliency(model, x, res.label))
        found = res.found
        if kind in ("topk", "random"):
            torch.testing.assert_close(res.criterion[found], res.topk_intersection[found])
        elif kind == "mass_center":
            torch.testing.assert_close(-res.criterion[found], res.center_of_mass_shift[found], rtol=1e-4, atol=1e-4)
        else:
            share = (m_adv * mask.flatten()).sum(1) / m_adv.sum(1)
            torch.testing.assert_close(-res.criterion[found], share[found], rtol=1e-4, atol=1e-5)
            share0 = (m0 * mask.flatten()).sum(1) / m0.sum(1)
            assert bool((share[found] >= share0[found] - 1e-6).all()) or not found.any()


def test_ifia_ig_and_grad_x_input_run():
    model = _small_cnn()
    x = _images(3)
    for attribution in ("ig", "grad_x_input"):
        res = ifia(model, x, eps=0.05, kind="topk", attribution=attribution, k=10, steps=3, ig_steps=8,
                   attack_ig_steps=4, restarts=2)
        _assert_feasible(res.x_adv, x, 0.05, "inf")
        _assert_label_contract(model, x, res)
        assert res.attribution == attribution
    # per-row surrogate betas through the IG path points (ReLU model, several betas in one batch)
    dev = deviation_attack(model, x, eps=0.05, steps=2, restarts=3, attribution="ig", ig_steps=8,
                           attack_ig_steps=4, k=10)
    assert dev.network == "softplus-surrogate(beta=5,10,20)"
    _assert_feasible(dev.x_adv, x, 0.05, "inf")
    _assert_label_contract(model, x, dev)


# ------------------------------------------------------------------------------------ deviation

def test_deviation_beats_random_noise_of_same_norm(trained_cnn_small, mnist_test):
    model = trained_cnn_small
    x, y = _correct(model, mnist_test[0][:40], mnist_test[1][:40], 16)
    eps = 0.1
    res = deviation_attack(model, x, eps=eps, norm="inf", objective="euclidean", steps=25, restarts=5)
    _assert_feasible(res.x_adv, x, eps, "inf")
    _assert_label_contract(model, x, res)
    assert bool(res.found.all())
    torch.testing.assert_close(res.criterion, res.euclidean)
    g0 = saliency(model, x, y)
    gen = torch.Generator().manual_seed(0)
    best_random = torch.zeros(x.shape[0])
    for _ in range(10):  # best of 10 random vertices of the ball (clipped), label-preserving only
        xr = (x + eps * (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1)).clamp(0, 1)
        kept, g = real_eval(model, xr, y, "saliency", 1)
        dev = (g - g0).flatten(1).norm(dim=1)
        best_random = torch.where(kept, torch.maximum(best_random, dev), best_random)
    assert float(res.euclidean.mean()) > 1.2 * float(best_random.mean())

    cos = deviation_attack(model, x[:6], eps=eps, norm=2, objective="cosine", steps=10, restarts=3, samples=2)
    _assert_feasible(cos.x_adv, x[:6], eps, "2")
    _assert_label_contract(model, x[:6], cos)
    assert float(cos.cosine.mean()) < 1.0
    torch.testing.assert_close(cos.criterion, cos.cosine)


def test_deviation_on_softplus_model_and_ig():
    model = _small_cnn(activation="softplus")
    x = _images(3)
    res = deviation_attack(model, x, eps=0.5, norm=2, steps=4, restarts=2, attribution="ig", ig_steps=8,
                           attack_ig_steps=4, k=10)
    assert res.network == "real (no ReLU)"
    _assert_feasible(res.x_adv, x, 0.5, "2")
    _assert_label_contract(model, x, res)
    assert float(res.euclidean.min()) > 0


# ----------------------------------------------------------------------------- reproducibility

@pytest.mark.parametrize("which", ["pgd", "ifia", "ifia-l2", "deviation"])
def test_seeded_and_batch_independent(which):
    model = _small_cnn(1)
    x = _images(8, seed=3)

    def run(xb, seed=0):
        if which == "pgd":
            return pgd(model, xb, None, eps=0.2, steps=5, step_size=0.05, restarts=2, seed=seed)
        if which == "ifia":
            return ifia(model, xb, eps=0.1, k=20, steps=5, step_size=0.02, restarts=2, seed=seed).x_adv
        if which == "ifia-l2":
            return ifia(model, xb, eps=1.0, norm=2, k=20, steps=5, step_size=0.2, restarts=2, seed=seed).x_adv
        return deviation_attack(model, xb, eps=0.1, steps=5, restarts=3, samples=2, seed=seed).x_adv

    full = run(x)
    torch.testing.assert_close(run(x), full, rtol=0, atol=0)
    singles = torch.cat([run(x[i:i + 1]) for i in range(8)])
    torch.testing.assert_close(singles, full, rtol=0, atol=1e-6)
    if which != "ifia":  # restart 0 of IFIA starts at x: with random restarts the seed matters
        assert not torch.equal(run(x, seed=1), full)


# ------------------------------------------------------------------------------------ protocol

def test_protocol_keeps_lowest_kendall_run_of_correct_points():
    model = _small_cnn(2)
    x = _images(10, seed=5)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    y[:3] = (pred[:3] + 1) % 10  # three misclassified points are skipped
    kw = {"eps": 0.1, "kind": "topk", "k": 20, "steps": 4, "step_size": 0.02, "restarts": 2}
    out = evaluate_attribution_robustness(model, x, y, runs=3, seed=4, batch_size=4, **kw)
    assert out.indices.tolist() == list(range(3, 10))
    assert out.accuracy == pytest.approx(0.7)
    runs = [ifia(model, x[3:], seed=4 + r, target=y[3:], **kw, **({"random_start": True} if r else {}))
            for r in range(3)]
    assert not torch.equal(runs[0].x_adv, runs[1].x_adv)  # later runs explore other starts
    taus = torch.stack([r.kendall for r in runs])
    best = taus.argmin(0)
    torch.testing.assert_close(out.kendall.float(), taus.min(0).values.float())
    torch.testing.assert_close(out.topk_intersection.float(),
                               torch.stack([r.topk_intersection for r in runs])[best, torch.arange(7)].float())
    assert out.mean_kendall == pytest.approx(float(taus.min(0).values.mean()), abs=1e-6)


# -------------------------------------------------------------------------------- bad input

def test_bad_inputs_raise_certattr_error():
    model = _small_cnn()
    x = _images(2)
    bad = [
        lambda: ifia(model, x, eps=-0.1),
        lambda: ifia(model, x, eps=0.1, kind="nope"),
        lambda: ifia(model, x, eps=0.1, norm="3"),
        lambda: ifia(model, x, eps=0.1, attribution="lime"),
        lambda: ifia(model, x, eps=0.1, k=145),
        lambda: ifia(model, x, eps=0.1, kind="targeted"),
        lambda: ifia(model, x * 2 + 0.5, eps=0.1),
        lambda: deviation_attack(model, x, eps=-1),
        lambda: deviation_attack(model, x, eps=0.1, objective="l1"),
        lambda: deviation_attack(model, x, eps=0.1, norm="l1"),
        lambda: deviation_attack(model, x, eps=0.1, attribution="smoothgrad"),
        lambda: deviation_attack(model, x - 0.5, eps=0.1),
        lambda: deviation_attack(model, x, eps=0.1, k=1000),
        lambda: deviation_attack(model, x, eps=0.1, restarts=0, samples=0),
        lambda: pgd(model, x, None, eps=-0.3),
        lambda: pgd(model, x, None, eps=0.3, norm="l0"),
        lambda: pgd(model, x + 1.5, None, eps=0.3),
        lambda: pgd(model, x, None, eps=0.3, step_size=0),
    ]
    for i, call in enumerate(bad):
        with pytest.raises(CertattrError):
            call()
            pytest.fail(f"case {i} did not raise")


def test_ifia_random_start_option():
    model = _small_cnn()
    x = _images(3)
    kw = {"eps": 0.1, "kind": "topk", "k": 20, "steps": 3, "step_size": 0.02}
    at_x = ifia(model, x, **kw)
    assert torch.equal(ifia(model, x, random_start=False, **kw).x_adv, at_x.x_adv)
    moved = ifia(model, x, random_start=True, **kw)
    assert not torch.equal(moved.x_adv, at_x.x_adv)
    _assert_feasible(moved.x_adv, x, 0.1, "inf")
    # restarts=2 with random_start=False: both restarts are the same deterministic run from x
    torch.testing.assert_close(ifia(model, x, random_start=False, restarts=2, **kw).x_adv, at_x.x_adv)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attacks_on_cuda_match_cpu():
    model = _small_cnn()
    x = _images(4)
    cpu = deviation_attack(model, x, eps=0.1, steps=3, restarts=2, samples=1)
    gpu = deviation_attack(model.cuda(), x.cuda(), eps=0.1, steps=3, restarts=2, samples=1)
    assert gpu.x_adv.device.type == "cuda"
    _assert_feasible(gpu.x_adv.cpu(), x, 0.1, "inf")
    assert bool(gpu.found.all()) and bool(cpu.found.all())
    # the random streams are integer hashes: the same draws on both devices
    keys = sample_keys(x, 3, 2)
    assert torch.equal(sample_keys(x.cuda(), 3, 2).cpu(), keys)
    a = SampleStream(keys, x.shape[1:], x.dtype)
    b = SampleStream(keys.cuda(), x.shape[1:], x.dtype)
    assert torch.equal(a.uniform(), b.uniform().cpu())
    torch.testing.assert_close(a.normal(), b.normal().cpu(), rtol=1e-5, atol=1e-5)
    adv = pgd(model, x.cuda(), None, eps=0.1, steps=3, step_size=0.03)
    _assert_feasible(adv.cpu(), x, 0.1, "inf")
    res = ifia(model, x.cuda(), eps=0.1, k=20, steps=3, restarts=2)
    _assert_feasible(res.x_adv.cpu(), x, 0.1, "inf")
