"""CROWN bounds for the upstream-gradient nodes of GradNet (``bounds.crown.FULL_CROWN = "intersect"``, the
default).

In that mode ``crown_gradient(upstream_crown=True)`` lets auto_LiRPA bound the upstream-gradient nodes
d f_y / d(output of activation i) by CROWN and intersects them with the interval pass's boxes the
moment they are computed (``crown._intersecting``).  Attacked here on random nets deep enough that some
node is a product of two or more derivative factors (3-hidden-layer ReLU MLP, a ReLU CNN with max-pool
and three ReLUs, a softplus MLP), weights scaled so that phases flip inside the ball, inputs with exact
zeros: the certified box / Euclidean / cosine / top-k against 64 sampled points (uniform and l_inf
vertices / l2 sphere) and PGD through the real net; the intersected upstream boxes against the true
upstream gradients (autograd, float64) at sampled points; the intersection strictly narrows some node
(a silently ignored option fails) and never widens the supplied boxes; bounding only the positions
with an unstable ReLU factor gives the same final box as bounding all; alpha-CROWN starts from the same
intersected boxes (sound, never looser than CROWN).
"""

from __future__ import annotations

import pytest
import torch
from test_bounds_certified import IG_STEPS, check_sound, deviation_attack, make_x, sample_points
from torch import nn

from bounds import certified_bound, crown, crown_upstream
from bounds.attribution import attribution
from bounds.certified_box import bound_box
from bounds.floatsafe import COMPUTE_DTYPE
from bounds.gradgraph import Act, MaxPool, parse_chain


def _net(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp3":
        net = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                            nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    elif kind == "cnn3":  # three ReLUs and a max-pool, padding and stride
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                            nn.Linear(24, 10), nn.ReLU(), nn.Linear(10, 3))
    elif kind == "mlp-softplus":
        net = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.Softplus(beta=5), nn.Linear(16, 12),
                            nn.Softplus(beta=2), nn.Linear(12, 4))
    else:
        raise KeyError(kind)
    with torch.no_grad():  # biases of the size of the pre-activations' spread: phases flip in the ball
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(1.5)
                m.bias.uniform_(-0.3, 0.3)
    return net.eval()


@pytest.fixture
def intersect(monkeypatch):
    monkeypatch.setattr(crown, "FULL_CROWN", "intersect")


CASES = [
    ("mlp3", "inf", 0.08, "saliency"),
    ("mlp3", "2", 0.4, "grad_x_input"),
    ("cnn3", "inf", 0.06, "saliency"),
    ("cnn3", "2", 0.3, "ig"),
    ("mlp-softplus", "inf", 0.08, "grad_x_input"),
]


@pytest.mark.parametrize("kind,norm,eps,attr", CASES)
def test_sound_sampled_and_attacked(kind, norm, eps, attr, intersect):
    net, x = _net(kind), make_x()
    res = certified_bound(net, x, eps, norm, attr, method="crown", ig_steps=IG_STEPS)
    assert res.method == "crown" and res.details["gradient"] == "crown+interval", res.details
    assert "upstream_width_ratio" in res.details  # the option ran (it was not silently skipped)
    gen = torch.Generator().manual_seed(3)
    xs = sample_points(x, eps, norm, 64, gen)
    gs = attribution(net, xs.flatten(0, 1), res.target.repeat(xs.shape[0]), attr, steps=IG_STEPS)
    points = list(zip(xs, gs.view(xs.shape)))
    points += list(deviation_attack(net, x, res.target, eps, norm, attr, seed=1))
    check_sound(res, points, k=6)


def _upstream_at(net: nn.Module, xs: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    """d f_y / d(output of each activation / max-pool module), autograd, in module order."""
    outs = []

    def keep(_m, _i, o):
        o.retain_grad()
        outs.append(o)

    hooks = [m.register_forward_hook(keep) for m in net.modules() if isinstance(m, (nn.ReLU, nn.Softplus, nn.MaxPool2d))]
    try:
        xs = xs.clone().requires_grad_(True)
        net(xs).gather(1, target.view(-1, 1)).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return [o.grad.detach() for o in outs]


@pytest.mark.parametrize("kind,eps", [("mlp3", 0.08), ("cnn3", 0.06), ("mlp-softplus", 0.08)])
def test_intersected_upstream_boxes_contain_true_upstream(kind, eps, monkeypatch):
    monkeypatch.setattr(crown, "FULL_CROWN", False)
    net = _net(kind).double()
    x = make_x().double()
    chain = parse_chain(net, tuple(x.shape[1:]), dtype=COMPUTE_DTYPE)
    target = net(x).argmax(dim=1)
    state: dict = {}
    with torch.no_grad():
        bound_box(net, chain, x, target, eps, "inf", "saliency", "crown", (0.0, 1.0), 1, None, {}, x.dtype,
                  state=state)
    args = state["crown_args"]  # FULL_CROWN off: ``supplied`` holds the interval pass's boxes
    assert args["upstream_crown"] is False
    crowned = crown.upstream_worth_crown(chain)
    assert crowned
    tightened: dict = {}
    ups = args["supplied"][1]
    with torch.no_grad():
        crown.crown_gradient(**{**args, "upstream_crown": True}, tightened=tightened)
    assert set(tightened) == crowned
    gen = torch.Generator().manual_seed(5)
    xs = sample_points(x.float(), eps, "inf", 32, gen).double()
    nonlin = [i for i, op in enumerate(chain.ops) if isinstance(op, (Act, MaxPool))]
    narrowed = 0.0
    for xp in xs:
        true = dict(zip(nonlin, _upstream_at(net, xp, target)))
        for i, (lo, hi) in tightened.items():
            lo, hi = lo.reshape(true[i].shape), hi.reshape(true[i].shape)
            assert (true[i] >= lo - 1e-9).all() and (true[i] <= hi + 1e-9).all(), i
    for i, (lo, hi) in tightened.items():
        ilo, ihi = ups[i][0].reshape(lo.shape), ups[i][1].reshape(hi.shape)
        assert (lo >= ilo).all() and (hi <= ihi).all()  # never wider than the supplied boxes
        narrowed = max(narrowed, float(((ihi - ilo) - (hi - lo)).max()))
    assert narrowed > 1e-6  # CROWN narrowed some coordinate of some node


def test_intersect_narrows_cnn_box(monkeypatch):
    """On the 3-ReLU CNN the intersected upstream boxes must narrow the final box on average."""
    net, x = _net("cnn3"), make_x()
    monkeypatch.setattr(crown, "FULL_CROWN", False)
    off = certified_bound(net, x, 0.06, "inf", "saliency", method="crown")
    assert "upstream_width_ratio" not in off.details
    monkeypatch.setattr(crown, "FULL_CROWN", "intersect")
    on = certified_bound(net, x, 0.06, "inf", "saliency", method="crown")
    assert on.details["upstream_width_ratio"] < 0.99
    w_off, w_on = float((off.upper - off.lower).mean()), float((on.upper - on.lower).mean())
    assert w_on < w_off, (w_on, w_off)


def test_worth_crown_selection():
    """The last activation's upstream is constant and the one before is linear in independent ReLU
    factors (interval exact): only earlier nodes, or the one before a smooth last activation, are kept."""
    chain = parse_chain(_net("mlp3"), (1, 6, 6), dtype=COMPUTE_DTYPE)
    nonlin = [i for i, op in enumerate(chain.ops) if isinstance(op, (Act, MaxPool))]
    assert crown.upstream_worth_crown(chain) == {nonlin[0]}
    chain = parse_chain(_net("mlp-softplus"), (1, 6, 6), dtype=COMPUTE_DTYPE)
    nonlin = [i for i, op in enumerate(chain.ops) if isinstance(op, (Act, MaxPool))]
    assert crown.upstream_worth_crown(chain) == {nonlin[0]}
    two_relu = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    assert crown.upstream_worth_crown(parse_chain(two_relu, (1, 6, 6), dtype=COMPUTE_DTYPE)) == set()


def test_reference_cleared_after_each_call(intersect):
    """No reference boxes stay on the cached module after a call (``crown._references``)."""
    net, x = _net("mlp3"), make_x()
    certified_bound(net, x, 0.05, "inf", "saliency", method="crown")
    bms = [v for v in crown._CACHE.values() if getattr(v, "_certattr_wrapped", False)]
    assert bms and all(bm._certattr_ref is None for bm in bms)


def test_sparse_pass_equals_dense_pass(monkeypatch):
    """Bounding only the positions whose derivative factor has a box of nonzero width (the sparse pass)
    gives the same final box as bounding every position (the dense pass, SPARSE_FRACTION = -1): a
    constant factor makes the product's McCormick planes exact whatever the upstream box."""
    net, x = _net("cnn3"), make_x()
    sparse = certified_bound(net, x, 0.06, "inf", "saliency", method="crown")
    monkeypatch.setattr(crown_upstream, "SPARSE_FRACTION", -1.0)
    dense = certified_bound(net, x, 0.06, "inf", "saliency", method="crown")
    assert dense.details["upstream_width_ratio"] < sparse.details["upstream_width_ratio"]  # it did differ
    scale = 1e-9 * (1 + float(dense.upper.abs().max()))
    assert torch.allclose(sparse.lower, dense.lower, atol=scale, rtol=0)
    assert torch.allclose(sparse.upper, dense.upper, atol=scale, rtol=0)


@pytest.mark.parametrize("kind", ["cnn3", "mlp-softplus"])
def test_alpha_crown_uses_the_intersected_boxes(kind):
    """alpha-CROWN's iterate 0 bounds the upstream nodes the same way, so it is sound and never looser
    than CROWN under the default FULL_CROWN = "intersect"."""
    assert crown.FULL_CROWN == "intersect"
    net, x = _net(kind), make_x()
    plain = certified_bound(net, x, 0.06, "inf", "saliency", method="crown")
    alpha = certified_bound(net, x, 0.06, "inf", "saliency", method="alpha-crown", alpha_iters=4)
    assert alpha.details["gradient"] == "alpha-crown+interval", alpha.details
    assert "upstream_width_ratio" in alpha.details
    slack = 1e-9 * (1 + float(plain.upper.abs().max()))
    assert (alpha.lower >= plain.lower - slack).all() and (alpha.upper <= plain.upper + slack).all()
    gen = torch.Generator().manual_seed(9)
    xs = sample_points(x, 0.06, "inf", 64, gen)
    gs = attribution(net, xs.flatten(0, 1), alpha.target.repeat(xs.shape[0]), "saliency")
    check_sound(alpha, list(zip(xs, gs.view(xs.shape))) + list(deviation_attack(
        net, x, alpha.target, 0.06, "inf", "saliency", seed=2)), k=6)
