"""alpha-CROWN (``certified_bound(method="alpha-crown")``, bounds/alpha_crown.py).

Soundness is attacked as for CROWN (``test_bounds_certified``): 64 sampled points per sample (uniform,
l_inf vertices / l2 sphere points) and PGD on ||g(x') - g(x)||^2 through a softplus surrogate with
every iterate evaluated on the real net, on nets with many unstable units (ReLU MLP, ReLU CNN with
max-pool, softplus MLP, a conv net with BatchNorm, softplus, tanh and sigmoid), l_inf and l2, every
attribution.  The random fuzz suite (``soundness_fuzz.py``) runs alpha-crown on every configuration.
Also: the optimised McCormick planes are valid for every mixing weight in [0, 1] (checked pointwise),
the optimised spec rows are sound and never looser than CROWN's, alpha-crown is at least as tight as
crown on these nets and strictly tighter somewhere (a silent fallback to CROWN fails), it runs under
``torch.no_grad()``, and bad ``alpha_iters`` are refused.
"""

from __future__ import annotations

import pytest
import torch
from test_bounds_certified import (
    IG_STEPS,
    check_sound,
    deviation_attack,
    make_net,
    make_x,
    sample_points,
)

from bounds import certified_bound
from bounds.attribution import attribution
from bounds.certified_box import bound_box
from bounds.crown import crown_gradient
from bounds.floatsafe import COMPUTE_DTYPE
from bounds.gradgraph import parse_chain
from bounds.lirpa_compat import custom_ops

ITERS = 8  # enough to move the relaxations, small enough for the default run

CASES = [
    ("mlp-relu", "inf", 0.08, "saliency"),
    ("mlp-relu", "2", 0.4, "grad_x_input"),
    ("mlp-softplus", "inf", 0.08, "grad_x_input"),
    ("mlp-softplus", "2", 0.4, "saliency"),
    ("cnn-relu", "inf", 0.05, "ig"),
    ("cnn-mix", "inf", 0.05, "saliency"),
    ("cnn-mix", "2", 0.3, "ig"),
]
SLOW = [
    ("cnn-relu", "2", 0.3, "saliency"),
    ("cnn-mix", "inf", 0.05, "grad_x_input"),
    ("mlp-softplus", "inf", 0.08, "ig"),
]


def _points(net, x, eps, norm, attr, target, seed=7):
    gen = torch.Generator().manual_seed(seed)
    xs = sample_points(x, eps, norm, 64, gen)
    gs = attribution(net, xs.flatten(0, 1), target.repeat(xs.shape[0]), attr, steps=IG_STEPS)
    points = list(zip(xs, gs.view(xs.shape)))
    return points + list(deviation_attack(net, x, target, eps, norm, attr, seed=seed))


@pytest.mark.parametrize(
    "kind,norm,eps,attr", CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW]
)
def test_alpha_sound_and_at_least_as_tight(kind, norm, eps, attr):
    net = make_net(kind)
    x = make_x()
    crown = certified_bound(net, x, eps, norm, attr, method="crown", ig_steps=IG_STEPS)
    alpha = certified_bound(net, x, eps, norm, attr, method="alpha-crown", ig_steps=IG_STEPS, alpha_iters=ITERS)
    assert alpha.method == "alpha-crown" and alpha.details["gradient"] == "alpha-crown+interval"
    assert alpha.details["preactivation"] == "crown+ibp", alpha.details.get("crown_error")
    check_sound(alpha, _points(net, x, eps, norm, attr, alpha.target), k=6)
    # never looser than CROWN: iterate 0 of every optimisation is CROWN, and the pre-activation
    # bounds it starts from are CROWN's or tighter (relative slack for float64 summation order)
    slack = 1e-9 * (1 + crown.upper.abs().max())
    assert (alpha.lower >= crown.lower - slack).all() and (alpha.upper <= crown.upper + slack).all()
    assert (alpha.euclidean <= crown.euclidean * (1 + 1e-9) + 1e-12).all()
    assert (alpha.label_certified | ~crown.label_certified).all()


def test_alpha_is_strictly_tighter_somewhere():
    """On unstable nets the optimisation must buy something (a silent fallback to CROWN gives 0)."""
    gains = []
    for kind, eps in (("mlp-softplus", 0.08), ("cnn-mix", 0.05)):
        net, x = make_net(kind), make_x()
        crown = certified_bound(net, x, eps, "inf", "saliency", method="crown")
        alpha = certified_bound(net, x, eps, "inf", "saliency", method="alpha-crown", alpha_iters=ITERS)
        gains.append(float((alpha.upper - alpha.lower).mean() / (crown.upper - crown.lower).mean()))
    assert min(gains) < 0.995, gains


def test_product_planes_valid_for_any_mixing_weights():
    """lam L1 + (1 - lam) L2 <= a b <= mu U1 + (1 - mu) U2 on the box, for random lam, mu in [0, 1]."""
    product = custom_ops()["certattr::Product"]
    gen = torch.Generator().manual_seed(0)

    class Box:
        def __init__(self, lo, hi):
            self.lower, self.upper = lo, hi

    shape = (3, 50)
    la = torch.randn(shape, generator=gen, dtype=torch.float64)
    ua = la + torch.rand(shape, generator=gen, dtype=torch.float64) * 2
    lb = torch.randn(shape, generator=gen, dtype=torch.float64)
    ub = lb + torch.rand(shape, generator=gen, dtype=torch.float64) * 2
    lam = torch.rand((4,) + shape, generator=gen, dtype=torch.float64)
    lam[0] = 0.0
    lam[1] = 1.0
    mu = torch.rand((4,) + shape, generator=gen, dtype=torch.float64)
    lower, upper = product._planes(object.__new__(product), Box(la, ua), Box(lb, ub), (lam, mu))
    for _ in range(20):
        ta = torch.rand(shape, generator=gen, dtype=torch.float64)
        tb = torch.rand(shape, generator=gen, dtype=torch.float64)
        a, b = la + ta * (ua - la), lb + tb * (ub - lb)
        lo = lower[0] * a + lower[1] * b + lower[2]
        hi = upper[0] * a + upper[1] * b + upper[2]
        assert (lo <= a * b + 1e-12).all() and (hi >= a * b - 1e-12).all()


def _state(net, x, eps, norm, iters):
    chain = parse_chain(net, tuple(x.shape[1:]), dtype=COMPUTE_DTYPE)
    target = net(x).argmax(dim=1)
    state: dict = {}
    with torch.no_grad():
        bound_box(net, chain, x, target, eps, norm, "saliency", "alpha-crown", (0.0, 1.0), 1, None, {},
                  x.dtype, state=state, alpha_iters=iters)
    return state, target


@pytest.mark.parametrize("kind", ["mlp-softplus", "cnn-relu"])
def test_optimised_spec_rows_sound_and_tighter(kind):
    """crown_gradient(spec=C, optimize=k): sound for the linear functionals C g (sampled), and never
    looser than optimize=0 on the same intermediate bounds."""
    net = make_net(kind).double()
    x = make_x(batch=2).double()
    eps, norm = 0.06, "inf"
    state, target = _state(net, x, eps, norm, ITERS)
    args = state["crown_args"]
    assert args["optimize"] == ITERS
    n = x[0].numel()
    gen = torch.Generator().manual_seed(3)
    spec = torch.randn(x.shape[0], 3, n, generator=gen, dtype=torch.float64)
    lo0, hi0 = crown_gradient(**{**args, "optimize": 0}, spec=spec)
    lo1, hi1 = crown_gradient(**args, spec=spec)
    assert lo1.shape == (x.shape[0], 3)
    assert (lo1 >= lo0 - 1e-10).all() and (hi1 <= hi0 + 1e-10).all()
    xs = sample_points(x, eps, norm, 128, gen)
    gs = attribution(net, xs.flatten(0, 1), target.repeat(xs.shape[0]), "saliency").view(xs.shape[0], x.shape[0], n)
    vals = torch.einsum("bmn,pbn->pbm", spec, gs)
    assert (vals >= lo1 - 1e-9).all() and (vals <= hi1 + 1e-9).all()


def test_runs_under_no_grad_and_is_deterministic():
    net, x = make_net("mlp-softplus"), make_x()
    ref = certified_bound(net, x, 0.05, "inf", method="alpha-crown", alpha_iters=3)
    with torch.no_grad():
        res = certified_bound(net, x, 0.05, "inf", method="alpha-crown", alpha_iters=3)
    assert res.details["preactivation"] == "crown+ibp" and res.method == "alpha-crown"
    assert torch.equal(res.lower, ref.lower) and torch.equal(res.upper, ref.upper)
    with torch.no_grad():
        certified_bound(net, x, 0.05, "inf", method="alpha-crown", alpha_iters=1)
        assert not torch.is_grad_enabled()


@pytest.mark.parametrize("bad", [0, -3, 1.5, "many", True, None])
def test_bad_alpha_iters(bad):
    net, x = make_net("mlp-relu"), make_x()
    with pytest.raises(ValueError, match="alpha_iters"):
        certified_bound(net, x, 0.05, "inf", method="alpha-crown", alpha_iters=bad)


def test_unknown_method_lists_alpha_crown():
    net, x = make_net("mlp-relu"), make_x()
    with pytest.raises(ValueError, match="alpha-crown"):
        certified_bound(net, x, 0.05, "inf", method="beta-crown")


def test_failed_optimisation_falls_back_to_crown(monkeypatch):
    """If auto_LiRPA's optimisation breaks (0.3 has shape bugs in some sparse-alpha paths), the result is
    CROWN's, with the error recorded, never the interval box alone."""
    from bounds import alpha_crown, crown

    def broken(*args, **kwargs):
        raise RuntimeError("simulated auto_LiRPA failure")

    net, x = make_net("mlp-softplus"), make_x()
    ref = certified_bound(net, x, 0.08, "inf", method="crown")
    monkeypatch.setattr(crown, "_CONV_MODE_FAILED", {})  # the failure memo must not outlive the test
    monkeypatch.setattr(alpha_crown, "forward_bounds", broken)
    monkeypatch.setattr(alpha_crown, "optimize_bounds", broken)
    res = certified_bound(net, x, 0.08, "inf", method="alpha-crown")
    assert "simulated" in res.details["alpha_forward_error"] and "simulated" in res.details["alpha_gradient_error"]
    assert res.details["preactivation"] == "crown+ibp" and res.method == "alpha-crown"
    assert torch.allclose(res.lower, ref.lower, rtol=0, atol=1e-12)
    assert torch.allclose(res.upper, ref.upper, rtol=0, atol=1e-12)
