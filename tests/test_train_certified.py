"""Certified attribution training (cert-ibp, cert-crown-ibp; SPEC 9.4, issue 12).

The certified loss is differentiable (finite differences, float64), sound (sampled gradients never
leave its box; it contains the box of ``bounds.certified_bound(method="ibp")``), a few steps lower the
certified bound that ``bounds`` computes independently, resume is bit-identical, and bad input fails
with clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certattr import checkpoint
from certattr.errors import CertattrError
from certattr.models import build_model
from certattr.train import fit
from certattr.train.certified import (
    certified_loss,
    certified_terms,
    crown_ibp_margin,
    ibp_initialise,
    ibp_margin,
    parse_layers,
    schedule_at,
    smoothed_shape,
)
from certattr.train.losses import default_hparams, get_loss, training_progress, validate_hparams

METHODS = ("cert-ibp", "cert-crown-ibp")


def _hp(method: str, **over) -> dict:
    return validate_hparams(method, {**default_hparams(method, "mnist"), **over})


def _tiny(activation: str = "relu", dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", in_shape=(1, 4, 4), num_classes=3, hidden=(6, 5), activation=activation,
                       beta=5.0).to(dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("activation", ["relu", "softplus"])
@pytest.mark.parametrize("norm,attr_loss", [("inf", "euclidean"), ("2", "cosine")])
def test_loss_gradient_matches_finite_differences(method, activation, norm, attr_loss):
    model = _tiny(activation)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(5, 1, 4, 4, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    y = torch.tensor([0, 1, 2, 0, 1])
    eps = 0.05 if norm == "inf" else 0.2
    hp = _hp(method, eps=eps, norm=norm, attr_loss=attr_loss, kappa=0.5)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())

    def loss(*ps):
        for n, p in zip(names, ps):  # the interval code reads module.weight / .bias: bind the inputs
            mod_name, attr = n.rsplit(".", 1)
            model.get_submodule(mod_name)._parameters[attr] = p
        return certified_loss(model, x, y, hp, crown=method == "cert-crown-ibp", progress=None)

    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradient_at_x_matches_autograd_and_zero_eps_is_a_point():
    for name in ("mlp", "cnn-small", "lenet5"):
        torch.manual_seed(0)
        model = build_model(name)
        x = torch.rand(3, 1, 28, 28)
        y = torch.tensor([1, 4, 7])
        t = certified_terms(model, x, y, eps=0.0)
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xr).gather(1, y.view(-1, 1)).sum(), xr)
        assert torch.allclose(t.g, g, atol=1e-6), name
        assert torch.allclose(t.logits, model(x), atol=1e-5), name
        assert float(t.radius.detach().max()) == 0.0, name


@pytest.mark.parametrize("name,norm", [("mlp", "inf"), ("mlp", "2"), ("cnn-small", "inf"), ("lenet5", "inf")])
def test_sampled_gradients_stay_in_the_training_box(name, norm):
    """Soundness of the training-time bound: gradients (and margins) at random points of the ball ∩
    domain, including the ball's corners / surface, never leave the certified box."""
    torch.manual_seed(0)
    model = build_model(name, hidden=(32, 32)) if name == "mlp" else build_model(name)
    x = torch.rand(2, 1, 28, 28) * 0.5
    y = torch.tensor([3, 5])
    eps = 0.02 if norm == "inf" else 0.3
    t = certified_terms(model, x, y, eps=eps, norm=norm)
    layers = parse_layers(model, (1, 28, 28))
    crown = crown_ibp_margin(layers, t.fwd, y, x, eps, norm)
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        d = torch.randn(x.shape, generator=gen)
        if norm == "inf":
            d = d.sign() * eps if _ % 2 else (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
        else:
            d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps
        xp = (x + d).clamp(0, 1).requires_grad_(True)
        out = model(xp)
        (g,) = torch.autograd.grad(out.gather(1, y.view(-1, 1)).sum(), xp)
        assert (g >= t.lower - 1e-5).all() and (g <= t.upper + 1e-5).all()
        dev = (g - t.g).flatten(1).norm(dim=1)
        assert (dev <= t.radius + 1e-5).all()
        margins = out.gather(1, y.view(-1, 1)) - out
        assert (margins.detach() >= t.margin_ibp - 1e-4).all()
        assert (margins.detach() >= crown - 1e-4).all()


def test_training_box_contains_the_bounds_ibp_box():
    """Inclusion monotonicity: the training loss uses IBP pre-activation bounds, ``bounds`` intersects
    them with CROWN, so the training box contains the box of certified_bound(method="ibp")."""
    bounds = pytest.importorskip("bounds")
    torch.manual_seed(0)
    model = build_model("mlp", hidden=(32, 32)).eval()
    x = torch.rand(3, 1, 28, 28) * 0.5
    y = model(x).argmax(1)
    for norm, eps in (("inf", 0.01), ("2", 0.2)):
        t = certified_terms(model, x, y, eps=eps, norm=norm)
        r = bounds.certified_bound(model, x, eps, norm=norm, method="ibp", target=y)
        assert (t.lower <= r.lower + 1e-5).all() and (t.upper >= r.upper - 1e-5).all(), norm
        assert (t.radius >= r.euclidean - 1e-4).all(), norm


def test_crown_ibp_margin_is_tighter_than_ibp_on_average():
    torch.manual_seed(0)
    model = build_model("mlp", hidden=(64, 64))
    x = torch.rand(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    t = certified_terms(model, x, y, eps=0.01)
    crown = crown_ibp_margin(parse_layers(model, (1, 28, 28)), t.fwd, y, x, 0.01, "inf")
    assert float(crown.detach().mean()) > float(ibp_margin(parse_layers(model, (1, 28, 28)), t.fwd, y).detach().mean())


@pytest.mark.parametrize("method", METHODS)
def test_few_steps_lower_the_certified_bound(method, mnist_train_small):
    """30 steps of cert-* on a tiny MLP lower the certified normalised Euclidean bound that
    bounds.certified_bound(method="ibp") computes on the training batch (measured for cert-ibp:
    median 0.62 -> 0.39)."""
    bounds = pytest.importorskip("bounds")
    x, y = mnist_train_small
    xb, yb = x[:64], y[:64]
    torch.manual_seed(0)
    model = build_model("mlp", hidden=(32, 32))
    fit(model, (x[:2000], y[:2000]), epochs=1, batch_size=64, lr=3e-3, seed=0, progress=False)
    eps = 0.02

    def certified_ratio() -> float:
        model.eval()
        r = bounds.certified_bound(model, xb, eps, norm="inf", method="ibp", target=yb)
        return float((r.euclidean / r.attribution_at_x.flatten(1).norm(dim=1)).median())

    before = certified_ratio()
    hp = {"eps": eps, "warmup_epochs": 0, "ramp_epochs": 0, "lambda": 1.0}
    fit(model, (xb.repeat(30, 1, 1, 1), yb.repeat(30)), method=method, hparams=hp, dataset="mnist", epochs=1,
        batch_size=64, lr=1e-3, seed=0, progress=False)
    after = certified_ratio()
    assert after < 0.75 * before, (before, after)


def test_resume_equals_uninterrupted_and_checkpoint_certifies(tmp_path, mnist_train_small):
    x, y = mnist_train_small
    data = (x[:96], y[:96])
    hp = {"eps": 0.05, "warmup_epochs": 0.5, "ramp_epochs": 1.0, "lambda": 0.5}

    def run(out, epochs, resume=False):
        torch.manual_seed(0)
        model = build_model("cnn-small")
        fit(model, data, method="cert-ibp", hparams=hp, dataset="mnist", epochs=epochs, batch_size=32, seed=3,
            out=out, resume=resume, progress=False)
        return model

    full = run(tmp_path / "full", 3)
    run(tmp_path / "cut", 1)
    resumed = run(tmp_path / "cut", 3, resume=True)
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    loaded = checkpoint.load(tmp_path / "cut")
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in loaded.state_dict().items())
    spec = checkpoint.info(tmp_path / "cut")
    assert spec["method"] == "cert-ibp"
    assert spec["hyperparameters"] == _hp("cert-ibp", **hp)
    bounds = pytest.importorskip("bounds")
    r = bounds.certified_bound(loaded, x[:2], 0.01, norm="inf", method="ibp")
    assert torch.isfinite(r.euclidean).all()


def test_schedule():
    hp = _hp("cert-crown-ibp", eps=0.1, **{"lambda": 2.0}, kappa=0.5, warmup_epochs=1, ramp_epochs=2)
    warm = schedule_at(hp, 0.5)
    assert warm.warmup and warm.eps == 0 and warm.lam == 0 and warm.kappa == 1
    mid = schedule_at(hp, 2.0)
    assert 0 < mid.eps < 0.1 * 0.5 and mid.kappa == pytest.approx(0.75) and mid.beta == pytest.approx(0.5)
    end = schedule_at(hp, 5.0)
    assert end.eps == pytest.approx(0.1) and end.lam == pytest.approx(2.0) and end.kappa == 0.5 and end.beta == 0
    assert schedule_at(hp, None).eps == pytest.approx(0.1)
    assert smoothed_shape(0) == 0 and smoothed_shape(1) == pytest.approx(1)
    a, b = smoothed_shape(0.25 - 1e-6), smoothed_shape(0.25 + 1e-6)
    assert abs(a - b) < 1e-5
    lin = _hp("cert-ibp", schedule="linear", warmup_epochs=0, ramp_epochs=4)
    assert schedule_at(lin, 1.0).eps == pytest.approx(lin["eps"] / 4)


def test_warmup_is_plain_cross_entropy():
    model = _tiny(dtype=torch.float32)
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    hp = _hp("cert-ibp", warmup_epochs=1.0)
    with training_progress(0, 3, 10):
        loss = get_loss("cert-ibp")(model, x, y, hp)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(model(x), y))


@pytest.mark.parametrize(
    "over,match",
    [
        ({"eps": 0.0}, "eps must be > 0"),
        ({"eps": -0.1}, "eps"),
        ({"lambda": -1.0}, "lambda must be >= 0"),
        ({"kappa": 1.5}, "kappa must be in"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"schedule": "cosine"}, "schedule must be"),
        ({"attr_loss": "l1"}, "attr_loss must be"),
        ({"attribution": "ig"}, "attribution must be saliency or grad_x_input"),
        ({"adv_steps": 1.5}, "adv_steps"),
        ({"crown_start": 2}, "crown_start"),
        ({"ibp_init": "maybe"}, "ibp_init must be true or false"),
        ({"grad_clip": -1.0}, "grad_clip must be >= 0"),
    ],
)
def test_bad_hyperparameters(over, match):
    method = "cert-crown-ibp"
    with pytest.raises(CertattrError, match=match):
        validate_hparams(method, {**default_hparams(method, "mnist"), **over})


def test_unknown_key_for_cert_ibp():
    with pytest.raises(CertattrError, match="crown_start"):
        validate_hparams("cert-ibp", {**default_hparams("cert-ibp"), "crown_start": 1.0})


@pytest.mark.parametrize("layer,name", [(nn.BatchNorm1d(8), "BatchNorm1d"), (nn.Tanh(), "Tanh"),
                                         (nn.Dropout(0.5), "Dropout")])
def test_unsupported_layer_is_named(layer, name):
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), layer, nn.Linear(8, 3))
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=name):
        get_loss("cert-ibp")(model, x, y, _hp("cert-ibp"))
    with pytest.raises(ValueError, match=name):
        fit(model, (x, y), method="cert-ibp", hparams={"warmup_epochs": 0}, epochs=1, progress=False)


def test_batchnorm_is_refused_with_the_reason():
    """The "BatchNorm in eval" pitfall: in training mode BatchNorm normalises with batch statistics, so a
    bound computed during training would certify another function than the saved model evaluates."""
    for bn, net in ((nn.BatchNorm1d(8), lambda bn: nn.Sequential(nn.Flatten(), nn.Linear(16, 8), bn, nn.ReLU(),
                                                                  nn.Linear(8, 3))),
                    (nn.BatchNorm2d(2), lambda bn: nn.Sequential(nn.Conv2d(1, 2, 3), bn, nn.ReLU(), nn.Flatten(),
                                                                  nn.Linear(8, 3)))):
        with pytest.raises(CertattrError, match="batch statistics"):
            parse_layers(net(bn), (1, 4, 4))


def test_ibp_init_draws_shi_et_al_weights_once_at_the_first_step():
    """ibp_init: at the first step (progress 0) every affine weight but the last is redrawn from
    N(0, (sqrt(2 pi) / fan_in)^2) (Shi et al. 2021), biases and the last layer kept; never outside the loop
    or at a later step (so a resumed run does not re-initialise)."""
    torch.manual_seed(0)
    model = build_model("mlp", hidden=(64, 64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    hp = _hp("cert-ibp", ibp_init=True)
    get_loss("cert-ibp")(model, x, y, hp)  # outside the loop: no re-initialisation
    with training_progress(0, 1, 10):  # a later step: none either
        get_loss("cert-ibp")(model, x, y, hp)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with training_progress(0, 0, 10):
        get_loss("cert-ibp")(model, x, y, hp)
    after = model.state_dict()
    linears = [k for k in after if k.endswith("weight")]
    for key in linears[:-1]:
        fan_in = after[key].shape[1]
        assert float(after[key].std()) == pytest.approx((2 * torch.pi) ** 0.5 / fan_in, rel=0.05), key
        assert abs(float(after[key].mean())) < 0.2 * (2 * torch.pi) ** 0.5 / fan_in
    for key in after:
        if key in linears[:-1]:
            assert not torch.equal(after[key], before[key])
        else:
            assert torch.equal(after[key], before[key]), key  # biases and the last layer
    layers = parse_layers(_tiny(), (1, 4, 4))
    ibp_initialise(layers, torch.Generator().manual_seed(1))
    assert torch.isfinite(layers[1].module.weight).all()


def test_resume_with_ibp_init_and_grad_clip_equals_uninterrupted(tmp_path, mnist_train_small):
    x, y = mnist_train_small
    data = (x[:96], y[:96])
    hp = {"eps": 0.05, "warmup_epochs": 0.0, "ramp_epochs": 1.0, "ibp_init": True, "grad_clip": 0.5}

    def run(out, epochs, resume=False):
        torch.manual_seed(0)
        model = build_model("mlp", hidden=(32, 32))
        summary = fit(model, data, method="cert-ibp", hparams=hp, dataset="mnist", epochs=epochs, batch_size=32,
                      seed=3, out=out, resume=resume, progress=False)
        return model, summary

    full, summary = run(tmp_path / "full", 3)
    assert summary["grad_clipped_steps"] > 0  # the clip binds: the test exercises it
    run(tmp_path / "cut", 1)
    resumed, _ = run(tmp_path / "cut", 3, resume=True)
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    spec = checkpoint.info(tmp_path / "cut")
    assert spec["hyperparameters"]["ibp_init"] is True and spec["hyperparameters"]["grad_clip"] == 0.5
