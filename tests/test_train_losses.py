"""Robust training losses: finiteness, gradients to every weight, clean inner loops, the building blocks
against closed forms (IG completeness, linear PGD optimum, Captum-checked IG), and input validation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certattr.attributions import integrated_gradients
from certattr.errors import CertattrError
from certattr.models import build_model, softplus_surrogate
from certattr.train import fit
from certattr.train.inner import inner_max, logit_ig, loss_ig, project, softplus_branch
from certattr.train.losses import LOSSES, default_hparams, get_loss, validate_hparams, weight_key

METHODS = [
    "natural",
    "pgd-at",
    "trades",
    "ig-norm",
    "ig-sum-norm",
    "art",
    "far-aat",
    "far-advaat",
    "sarkar",
    "igr",
]
SMALL = {"steps": 2, "ig_steps": 3, "attack_ig_steps": 2}


def small_hp(method: str, **extra) -> dict:
    hp = default_hparams(method, "mnist")
    hp.update({k: v for k, v in SMALL.items() if k in hp})
    hp.update(extra)
    return hp


@pytest.fixture(scope="module")
def batch(mnist_test):
    x, y = mnist_test
    return x[:8], y[:8]


def test_every_method_registered():
    assert set(METHODS) <= set(LOSSES)
    for method in METHODS:
        assert callable(get_loss(method))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("training", [True, False])
def test_loss_finite_differentiable_reaches_every_weight(method, training, batch):
    x, y = batch
    torch.manual_seed(0)
    model = build_model("cnn-small")
    model.train(training)
    torch.manual_seed(1)
    loss = get_loss(method)(model, x, y, small_hp(method))
    assert loss.dim() == 0 and torch.isfinite(loss)
    # the inner maximisation left no gradients on the parameters and restored the mode
    assert all(p.grad is None for p in model.parameters())
    assert model.training is training
    assert all(isinstance(m, nn.ReLU) for m in model if not isinstance(m, (nn.Conv2d, nn.Linear, nn.Flatten)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{method}: no gradient reaches {name}"


@pytest.mark.parametrize("method", ["ig-norm", "far-aat", "igr"])
def test_loss_on_softplus_model(method, batch):
    x, y = batch
    torch.manual_seed(0)
    model = build_model("mlp", activation="softplus", beta=5.0, hidden=(32,))
    loss = get_loss(method)(model, x, y, small_hp(method))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad.abs().sum() > 0 for p in model.parameters())


def test_natural_loss_is_cross_entropy(batch):
    x, y = batch
    torch.manual_seed(0)
    model = build_model("cnn-small")
    assert torch.allclose(get_loss("natural")(model, x, y, {}), F.cross_entropy(model(x), y))


def test_pgd_at_with_zero_eps_is_natural(batch):
    x, y = batch
    torch.manual_seed(0)
    model = build_model("cnn-small")
    hp = small_hp("pgd-at", eps=0.0)
    assert torch.allclose(get_loss("pgd-at")(model, x, y, hp), F.cross_entropy(model(x), y))
    hp = small_hp("trades", eps=0.0)
    assert torch.allclose(get_loss("trades")(model, x, y, hp), F.cross_entropy(model(x), y), atol=1e-6)


# ------------------------------------------------------------------------------- building blocks
def _smooth_model(seed=0):
    torch.manual_seed(seed)
    return build_model("mlp", activation="softplus", beta=3.0, hidden=(20,), in_shape=(1, 4, 4))


def test_loss_ig_completeness():
    """sum_i IG^CE(x -> x*)_i = CE(x*) - CE(x) (completeness; the Riemann sum converges as m grows)."""
    model = _smooth_model()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 4, 4, generator=gen, dtype=torch.float64)
    x_star = (x + 0.3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    model = model.double()
    y = torch.tensor([0, 1, 2, 3, 4])
    ig = loss_ig(model, x, x_star, y, 2000, create_graph=False)
    with torch.no_grad():
        delta = F.cross_entropy(model(x_star), y, reduction="none") - F.cross_entropy(
            model(x), y, reduction="none"
        )
    assert torch.allclose(ig.flatten(1).sum(1), delta, atol=2e-3 * delta.abs().max().item() + 1e-6)


def test_logit_ig_matches_certattr_integrated_gradients():
    model = _smooth_model(1)
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 4, 7])
    ours = logit_ig(model, x, y, 16, create_graph=False)
    ref = integrated_gradients(model, x, y, steps=16)
    assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_inner_max_reaches_linear_optimum(norm):
    """max <w, x'> over the ball ∩ [0,1]: linf -> clamp(x + eps sign(w)); l2 (interior x) ->
    x + eps w / ||w||."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 1, 6, 6, generator=gen)
    x = 0.25 + 0.5 * torch.rand(4, 1, 6, 6, generator=gen)
    if norm == "inf":
        eps, expected = 0.3, (x + 0.3 * w.sign()).clamp(0, 1)
    else:
        eps = 0.2
        expected = x + eps * w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.manual_seed(0)

    def objective(z):
        return (z * w).flatten(1).sum(1)

    labels = torch.zeros(4, dtype=torch.long)
    for start in (True, False, "trades"):  # attacks.pgd (uniform / no random start) and the TRADES start
        out = inner_max(
            objective,
            x,
            model=nn.Identity(),
            y=labels,
            eps=eps,
            norm=norm,
            steps=100,
            step_size=eps / 4,
            random_init=start,
        )
        assert torch.allclose(out, expected, atol=1e-5), start


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_project_stays_in_ball_and_domain(norm):
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(16, 1, 5, 5, generator=gen)
    far = x + 3 * torch.randn(x.shape, generator=gen)
    out = project(far, x, 0.5, norm)
    assert out.min() >= 0 and out.max() <= 1
    dist = (out - x).flatten(1).abs().amax(1) if norm == "inf" else (out - x).flatten(1).norm(dim=1)
    assert (dist <= 0.5 + 1e-6).all()


def test_softplus_branch_shares_weights_and_restores():
    torch.manual_seed(0)
    model = build_model("cnn-small")
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with softplus_branch(model, 7.0):
        assert not any(isinstance(m, nn.ReLU) for m in model.modules())
        out = model(x)
    assert torch.allclose(out, softplus_surrogate(model, 7.0)(x), atol=1e-6)
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 3
    out.sum().backward()  # the graph recorded inside the branch reaches the shared weights
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "method,hp,match",
    [
        ("pgd-at", {"eps": -0.1}, "eps"),
        ("trades", {"beta": -1.0}, "beta"),
        ("ig-norm", {"lambda": -2.0}, "lambda"),
        ("pgd-at", {"eps": 1.5}, "larger than the data domain"),
        ("pgd-at", {"eps": 0.6, "domain": [0.0, 0.5]}, "larger than the data domain"),
        ("pgd-at", {"eps": 28.5, "norm": "2"}, "larger than the data domain"),
        ("pgd-at", {"steps": -1}, "steps"),
        ("pgd-at", {"step_size": 0.0}, "step_size"),
        ("ig-norm", {"ig_steps": 0}, "ig_steps"),
        ("ig-norm", {"lamda": 1.0}, "no hyperparameter 'lamda'"),
        ("far-aat", {"attribution": "lime"}, "attribution"),
        ("pgd-at", {"norm": "l7"}, "norm"),
        ("pgd-at", {"eps": float("nan")}, "eps"),
    ],
)
def test_bad_hyperparameters_raise(method, hp, match):
    with pytest.raises(CertattrError, match=match):
        validate_hparams(method, {**default_hparams(method, "mnist"), **hp}, in_shape=(1, 28, 28))


def test_valid_hyperparameters_normalised():
    out = validate_hparams("pgd-at", {"eps": "8/255", "norm": "linf", "steps": 3.0}, in_shape=(1, 28, 28))
    assert out == {"eps": pytest.approx(8 / 255), "norm": "inf", "steps": 3}
    assert validate_hparams("pgd-at", {"eps": 27.9, "norm": 2}, in_shape=(1, 28, 28))["eps"] == 27.9
    assert validate_hparams("pgd-at", {"eps": 1.0})["eps"] == 1.0  # linf: exactly hi - lo is allowed


def test_unknown_method_raises():
    with pytest.raises(CertattrError, match="unknown training method"):
        get_loss("adversarial-magic")
    with pytest.raises(CertattrError, match="unknown training method"):
        default_hparams("nope")


def test_weight_keys():
    assert weight_key("trades") == "beta" and weight_key("ig-sum-norm") == "beta"
    assert weight_key("ig-norm") == "lambda" and weight_key("art") == "lambda"
    assert weight_key("natural") is None and weight_key("pgd-at") is None


def test_defaults_from_papers():
    pgd = default_hparams("pgd-at", "mnist")
    assert (pgd["eps"], pgd["steps"], pgd["step_size"], pgd["norm"], pgd["random_start"]) == (
        0.3,
        40,
        0.01,
        "inf",
        True,
    )
    mnist = default_hparams("ig-norm", "mnist")
    assert (
        mnist["eps"],
        mnist["steps"],
        mnist["step_size"],
        mnist["ig_steps"],
        mnist["attack_ig_steps"],
        mnist["lambda"],
    ) == (0.3, 40, 0.01, 50, 10, 1.0)
    assert default_hparams("ig-sum-norm", "mnist")["beta"] == 0.1
    assert default_hparams("trades", "mnist")["beta"] == 6.0
    art = default_hparams("art", "mnist")
    assert (art["softplus_beta"], art["lambda"]) == (50.0, 0.5)
    assert default_hparams("pgd-at", "fashion-mnist")["eps"] == 0.1
    assert default_hparams("pgd-at", "cifar10")["eps"] == pytest.approx(8 / 255)


@pytest.mark.parametrize("hp", [{"eps": -0.3}, {"eps": 2.0}, {"lambda": -1.0}])
def test_fit_rejects_bad_hyperparameters_before_any_step(hp, batch):
    x, y = batch
    torch.manual_seed(0)
    model = build_model("cnn-small")
    before = copy.deepcopy(model.state_dict())
    method = "ig-norm"
    with pytest.raises(CertattrError):
        fit(
            model,
            (x, y),
            method=method,
            hparams={**SMALL, **hp},
            dataset="mnist",
            epochs=1,
            batch_size=8,
            progress=False,
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fit_rejects_unknown_method(batch):
    with pytest.raises(CertattrError, match="unknown training method"):
        fit(build_model("cnn-small"), batch, method="magic", progress=False)
