"""Any model input (SPEC 9.5): a small MLP on a tabular data set (scikit-learn's bundled breast-cancer),
certified and attacked end to end; metric and attack shapes (B, n), (B, H, W), (B, C, H, W)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")

from bounds import certified_bound, practical_bound, smoothed_certificate
from certattr import metrics as M
from certattr.attacks import deviation_attack, ifia, pgd, smoothed_attack
from certattr.data import dataset_info, load_dataset
from certattr.errors import CertattrError
from certattr.models import build_model
from certattr.train import accuracy


def train_tabular(activation: str = "relu", out=None, steps: int = 300):
    """MLP 30-32-32-2 on breast-cancer: full-batch Adam (well under a second); saved as a certattr
    checkpoint at ``out`` when given."""
    from certattr import checkpoint

    x, y = load_dataset("breast-cancer", "train")
    torch.manual_seed(0)
    model = build_model("mlp", in_shape=(30,), num_classes=2, activation=activation, beta=10.0, hidden=(32, 32))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    if out is not None:
        checkpoint.save(model, out, dataset="breast-cancer", in_shape=[30], method="natural")
    return model


@pytest.fixture(scope="module")
def tabular_relu():
    return train_tabular("relu")


def test_dataset_split_and_domain():
    x, y = load_dataset("breast-cancer", "train")
    xt, _ = load_dataset("breast-cancer", "test")
    assert x.shape == (455, 30) and xt.shape == (114, 30) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0 and 0.0 <= float(xt.min()) and float(xt.max()) <= 1.0
    assert set(y.tolist()) == {0, 1} and dataset_info("breast-cancer")["in_shape"] == (30,)
    assert torch.equal(load_dataset("breast-cancer", "test")[0], xt)  # deterministic split


def test_tabular_mlp_certified_and_attacked_end_to_end(tabular_relu):
    model = tabular_relu
    xt, yt = load_dataset("breast-cancer", "test")
    assert accuracy(model, xt, yt) >= 0.9
    x = xt[:16]
    for norm, eps in (("inf", 0.01), ("2", 0.05)):
        cert = certified_bound(model, x, eps=eps, norm=norm, attribution="saliency")
        assert cert.euclidean.shape == (16,) and torch.isfinite(cert.euclidean).all()
        att = deviation_attack(model, x, eps=eps, norm=norm, steps=20, restarts=2, samples=4, seed=0)
        assert att.k == M.default_k(30) == 4
        kept = att.label_kept
        assert (att.euclidean[kept] <= cert.euclidean[kept] * (1 + 1e-5) + 1e-6).all()
        assert (att.cosine[kept] >= cert.cosine[kept] - 1e-5).all()
        prac = practical_bound(model, x, eps=eps, norm=norm, attribution="saliency", linf_method="columns")
        assert prac.network == "softplus-surrogate(beta=10)" and prac.euclidean.shape == (16,)
        sur = deviation_attack(model, x, eps=eps, norm=norm, steps=10, restarts=1, measure="surrogate")
        assert sur.measured_on == "softplus-surrogate(beta=10)"
    top = ifia(model, x, eps=0.05, kind="topk", steps=5)
    assert top.k == 4 and math.isnan(float(top.center_of_mass_shift[0]))
    with pytest.raises(CertattrError, match="image grid"):
        ifia(model, x, eps=0.05, kind="mass_center", steps=1)
    adv = pgd(model, x, yt[:16], eps=0.05, norm="inf", steps=5)
    assert getattr(adv, "x_adv", adv).shape == x.shape
    sm = smoothed_certificate(model, x, eps=0.01, radius=0.5, n_samples=256)
    sa = smoothed_attack(model, x[:4], eps=0.01, norm=2, radius=0.5, steps=3, noise_samples=4, eval_samples=256)
    assert sm.euclidean.shape == (16,) and sa.euclidean.shape == (4,)


@pytest.mark.parametrize("shape", [(4, 6), (4, 1, 1, 6), (4, 5, 5), (4, 3, 5, 5)])
def test_attacks_accept_any_input_shape(shape):
    torch.manual_seed(1)
    n = math.prod(shape[1:])
    model = nn.Sequential(nn.Flatten(), nn.Linear(n, 8), nn.Softplus(beta=5.0), nn.Linear(8, 3))
    x = torch.rand(shape)
    res = deviation_attack(model, x, eps=0.1, norm="inf", steps=3, restarts=1)
    n_map = n if len(shape) == 2 else math.prod(shape[-2:])
    assert res.x_adv.shape == x.shape and res.k == M.default_k(n_map)
    res = ifia(model, x, eps=0.1, steps=2)
    assert res.k == M.default_k(n_map) and res.topk_intersection.shape == (4,)
    with pytest.raises(CertattrError, match="larger than the number of map entries"):
        deviation_attack(model, x, eps=0.1, steps=1, k=n_map + 1)


def test_metrics_accept_attributions_and_maps_of_every_shape():
    gen = torch.Generator().manual_seed(2)
    g1 = torch.randn(3, 2, 6, 6, generator=gen, dtype=torch.float64)
    g2 = g1 + 0.3 * torch.randn(3, 2, 6, 6, generator=gen, dtype=torch.float64)
    m1, m2 = g1.abs().sum(1), g2.abs().sum(1)  # the map rule
    for name in ("topk_intersection", "lens_recall"):
        fn = M.METRICS[name]
        assert torch.equal(fn(g1, g2, 5), fn(m1, m2, 5))
    for name in ("kendall", "spearman", "center_of_mass_shift"):
        fn = M.METRICS[name]
        torch.testing.assert_close(fn(g1, g2), fn(m1, m2))
    # (B, 1, H, W) saliency, (B, H, W) and flat (B, n) agree on the rank metrics
    s1, s2 = g1[:, :1], g2[:, :1]
    assert torch.equal(M.topk_intersection(s1, s2, 7), M.topk_intersection(s1[:, 0], s2[:, 0], 7))
    assert torch.equal(M.topk_intersection(s1, s2, 7), M.topk_intersection(s1.flatten(1), s2.flatten(1), 7))
    torch.testing.assert_close(M.kendall_tau(s1, s2), M.kendall_tau(s1.flatten(1).abs(), s2.flatten(1).abs()))
    d = M.dissimilarities(g1.flatten(1), g2.flatten(1), k=None)
    assert math.isnan(float(d["center_of_mass_shift"][0])) and d["topk_intersection"].shape == (3,)
    assert M.default_k(784) == 100 and M.default_k(30) == 4 and M.default_k(4) == 1
    with pytest.raises(CertattrError, match="B,H,W"):
        M.center_of_mass_shift(g1.flatten(1), g2.flatten(1))


def test_deviation_measured_on_the_surrogate_reports_surrogate_values(tabular_relu):
    from certattr.attributions import saliency
    from certattr.models import softplus_surrogate

    x = load_dataset("breast-cancer", "test")[0][:6]
    res = deviation_attack(tabular_relu, x, eps=0.05, norm=2, steps=5, restarts=1, measure="surrogate",
                           measure_beta=5.0)
    assert res.measured_on == "softplus-surrogate(beta=5)"
    sur = softplus_surrogate(tabular_relu, 5.0)
    y = tabular_relu(x).argmax(1)
    want = (saliency(sur, res.x_adv, y) - saliency(sur, x, y)).flatten(1).norm(dim=1)
    torch.testing.assert_close(res.euclidean, want, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # the label is still checked on the real network
        assert torch.equal(res.label_kept, tabular_relu(res.x_adv).argmax(1) == y)
    with pytest.raises(CertattrError, match="measure"):
        deviation_attack(tabular_relu, x, eps=0.05, steps=1, measure="smoothed")
