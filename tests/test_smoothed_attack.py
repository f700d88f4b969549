"""The attack on the smoothed attribution h (certattr.attacks.smoothed): it breaks the paper's closed
form (the kept 2-D bowl counterexample) beyond the Monte Carlo error, and never the sound certificate."""
from __future__ import annotations

import math

import pytest
import torch
from smooth_models import Bowl
from torch import nn

from bounds import smoothed_certificate
from bounds.smoothed import paper_closed_form_bound
from certattr.attacks import smoothed_attack, smoothed_key
from certattr.attacks.smoothed import confidence_bounds
from certattr.errors import CertattrError


class Parabola(nn.Module):
    """f_0(x) = k (x_1 - 0.3)^2 + x_2: h rotates fast along x_1 near x_1 = 0.3."""

    def forward(self, x):
        f = 5.0 * (x[:, 0] - 0.3) ** 2 + x[:, 1]
        return torch.stack([f, f - 100.0], 1)


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def test_breaks_the_paper_closed_form_but_not_the_certificate():
    c = torch.tensor([0.5, 0.5], dtype=torch.float64)
    model, x0 = Bowl(c), (c + torch.tensor([0.1, 0.0], dtype=torch.float64)).unsqueeze(0)
    eps, radius = 0.2, 1.0
    res = smoothed_attack(model, x0, eps=eps, norm=2, radius=radius, objective="cosine", steps=30, restarts=3,
                          eval_samples=20_000, alpha_eval=1e-3, seed=1)
    assert res.measured_on == smoothed_key(radius) and res.kind == "smoothed-cosine"
    assert float((res.x_adv - x0).norm()) <= eps + 1e-9
    ucb = float(res.extras["cosine_ucb"][0])
    h0 = float(res.details["h_x"].norm())
    paper = paper_closed_form_bound(h0, eps, radius, 2)
    assert float(res.cosine[0]) < -0.8
    assert ucb < paper - 0.5  # a violation of the closed form beyond the Monte Carlo error
    cert = smoothed_certificate(model, x0, eps=eps, radius=radius, n_samples=20_000, seed=2)
    assert float(cert.cosine[0]) <= ucb  # the sound certificate abstains (-1): not violated
    assert float(res.extras["euclidean_lcb"][0]) <= float(cert.deviation[0])


def test_sound_certificate_holds_where_it_certifies():
    x = torch.tensor([[0.45, 0.3], [0.6, 0.3], [0.3, 0.5]], dtype=torch.float64)
    eps, radius = 0.1, 0.5
    model = Parabola()
    cert = smoothed_certificate(model, x, eps=eps, radius=radius, n_samples=20_000, seed=3)
    assert int((~cert.abstain).sum()) >= 2
    for objective in ("euclidean", "cosine"):
        res = smoothed_attack(model, x, eps=eps, norm=2, radius=radius, objective=objective, steps=25,
                              restarts=2, eval_samples=20_000, seed=5)
        assert (res.extras["euclidean_lcb"] <= cert.deviation + 1e-12).all()
        assert (res.extras["cosine_ucb"] >= cert.cosine - 1e-12).all()
        assert res.label_kept.all()
    # the attack is strong: on the fastest-turning sample it reaches a large part of d
    assert float(res.euclidean.max()) > 0.4 * float(cert.deviation[0])


def test_confidence_bounds_contain_the_truth():
    gen = torch.Generator().manual_seed(0)
    h0, h1 = torch.randn(64, 5, generator=gen, dtype=torch.float64), torch.randn(64, 5, generator=gen, dtype=torch.float64)
    t = 0.3
    d0 = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    d1 = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    e0 = h0 + t * d0 / d0.norm(dim=1, keepdim=True) * torch.rand(64, 1, generator=gen, dtype=torch.float64)
    e1 = h1 + t * d1 / d1.norm(dim=1, keepdim=True) * torch.rand(64, 1, generator=gen, dtype=torch.float64)
    lcb, ucb = confidence_bounds(e0, e1, t)  # estimates within t of the truth
    true_cos = (h0 * h1).sum(1) / (h0.norm(dim=1) * h1.norm(dim=1))
    assert (lcb <= (h1 - h0).norm(dim=1) + 1e-12).all()
    assert (ucb >= true_cos - 1e-12).all()


def test_tabular_and_image_shapes_and_errors():
    torch.manual_seed(0)
    tab = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.rand(4, 6)
    res = smoothed_attack(tab, x, eps=0.1, norm="inf", radius=0.5, steps=3, eval_samples=64, ref_samples=16,
                          select_samples=16, noise_samples=4)
    assert res.euclidean.shape == (4,) and res.k == 1 and math.isnan(float(res.center_of_mass_shift[0]))
    img = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
    res = smoothed_attack(img, torch.rand(2, 2, 3, 3), eps=0.1, radius=0.5, steps=2, eval_samples=32, ref_samples=8,
                          select_samples=8, noise_samples=2)
    assert res.x_adv.shape == (2, 2, 3, 3)
    with pytest.raises(CertattrError, match="radius"):
        smoothed_attack(tab, x, eps=0.1, radius=0.0)
    with pytest.raises(CertattrError, match="alpha_eval"):
        smoothed_attack(tab, x, eps=0.1, alpha_eval=2.0)
