"""Final evaluation (NA / AA / IN / CO): oracles are a closed-form linear attack, eps = 0, scipy's Kendall,
and the attack's own returned iterate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau
from torch import nn

from certattr.attacks import ifia
from certattr.metrics import topk_intersection
from certattr.models import build_model
from certattr.train import accuracy, fit
from certattr.train.evaluate import evaluate, format_line, pgd_accuracy
from certattr.train.inner import logit_ig


@pytest.fixture(scope="module")
def natural_model(mnist_train_small):
    x, y = mnist_train_small
    torch.manual_seed(0)
    model = build_model("cnn-small")
    fit(model, (x[:2000], y[:2000]), epochs=1, batch_size=32, lr=3e-3, seed=0, progress=False)
    return model.eval()


def _maps(g):
    return g.abs().sum(1).flatten(1)


def test_pgd_accuracy_matches_closed_form_on_linear_two_class_model():
    """For f(x) = Wx + b with 2 classes, max CE over the linf box ∩ [0,1]^n is attained at the vertex
    z_i = clamp(x_i - eps sign(w_y - w_o)_i, 0, 1); PGD with sign steps reaches it exactly."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(2, 36, generator=gen))
        model[1].bias.zero_()
    x = torch.rand(200, 1, 6, 6, generator=gen)
    y = model(x).argmax(1)  # all correct clean
    y[:20] = 1 - y[:20]  # 20 misclassified on purpose: they count as failures
    eps = 0.05
    w = model[1].weight.detach()
    diff = (w[y] - w[1 - y]).view(-1, 1, 6, 6)
    z = (x - eps * diff.sign()).clamp(0, 1)
    expected = int((model(z).argmax(1) == y).sum()) / 200
    got = pgd_accuracy(model, x, y, eps=eps, steps=20, step_size=eps / 4, seed=1)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.05 < got < 0.9  # the test is informative: some but not all points break


def test_zero_eps_changes_nothing(natural_model, mnist_test):
    x, y = mnist_test
    out = evaluate(
        natural_model,
        x[:200],
        y[:200],
        eps=0.0,
        n_attr=5,
        n_pgd=None,
        pgd_steps=3,
        ifia_steps=3,
        ig_steps=8,
        attack_ig_steps=2,
        runs=2,
    )
    assert (
        out["pgd_accuracy"]
        == out["natural_accuracy"]
        == pytest.approx(accuracy(natural_model, x[:200], y[:200]))
    )
    assert out["topk_intersection"] == 1.0 and out["kendall"] == pytest.approx(1.0)
    assert out["n_attr"] == 5 and out["n_pgd"] == 200


def test_in_co_recomputed_from_the_ifia_iterates_with_scipy(natural_model, mnist_test):
    """evaluate() = mean over the first n_attr correctly classified images of top-k intersection and scipy's
    Kendall tau between IG maps of x and of IFIA's iterate; a natural model's map is fragile."""
    x, y = mnist_test
    settings = {"eps": 0.3, "k": 100, "ig_steps": 16, "attack_ig_steps": 4}
    out = evaluate(
        natural_model,
        x[:60],
        y[:60],
        n_attr=8,
        n_pgd=0,
        ifia_steps=8,
        ifia_step_size=0.05,
        runs=1,
        seed=2,
        **settings,
    )
    correct = torch.nonzero(natural_model(x[:60]).argmax(1) == y[:60]).flatten()[:8]
    xb, yb = x[correct], y[correct]
    res = ifia(
        natural_model,
        xb,
        eps=0.3,
        kind="topk",
        attribution="ig",
        k=100,
        steps=8,
        step_size=0.05,
        seed=2,
        target=yb,
        ig_steps=16,
        attack_ig_steps=4,
    )
    x_adv = res.x_adv
    assert (x_adv - xb).abs().max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(natural_model(x_adv).argmax(1), yb)
    m0 = _maps(logit_ig(natural_model, xb, yb, 16, create_graph=False)).detach()
    m1 = _maps(logit_ig(natural_model, x_adv, yb, 16, create_graph=False)).detach()
    topk = topk_intersection(m0, m1, 100)
    taus = [kendalltau(m0[i].double().numpy(), m1[i].double().numpy()).statistic for i in range(8)]
    assert out["n_attr"] == 8 and out["n_pgd"] == 0
    assert out["topk_intersection"] == pytest.approx(float(topk.mean()), abs=1e-5)
    assert out["kendall"] == pytest.approx(float(np.mean(taus)), abs=1e-4)
    assert out["topk_intersection"] < 0.9


def test_more_runs_never_raise_kendall_and_seeded(natural_model, mnist_test):
    x, y = mnist_test
    kwargs = {
        "eps": 0.3,
        "n_attr": 6,
        "n_pgd": 50,
        "pgd_steps": 3,
        "pgd_step_size": 0.1,
        "ifia_steps": 4,
        "ifia_step_size": 0.05,
        "ig_steps": 8,
        "attack_ig_steps": 2,
        "seed": 5,
    }
    one = evaluate(natural_model, x[:100], y[:100], runs=1, **kwargs)
    two = evaluate(natural_model, x[:100], y[:100], runs=2, **kwargs)
    again = evaluate(natural_model, x[:100], y[:100], runs=2, **kwargs)
    assert two == again
    assert two["kendall"] <= one["kendall"] + 1e-9
    assert 0 <= two["topk_intersection"] <= 1 and two["pgd_accuracy"] <= two["natural_accuracy"]
    line = format_line(two)
    assert (
        line.startswith("final evaluation: natural accuracy") and "Kendall" in line and "PGD accuracy" in line
    )
