"""Tests of the spec-row objectives (bounds/objectives.py): chord Euclidean, cosine, top-k pairs.

1. The algebra against brute force: the chord bound of the square and the pair rows of the map
   (multi-channel layout included) hold at random points of random boxes.
2. Soundness through the real net (ReLU MLPs with many unstable units, a softplus MLP, a 2-channel
   ReLU CNN with max-pooling; ℓ∞ and ℓ2; saliency, gradient x input and IG, inputs with ~25% exact
   zeros): the fuzz suite's attacks (sampling, vertices, sparse corners, deviation PGD through the real
   net and a smooth surrogate, coordinate PGD) plus PGD on -cosine and on a top-k overlap surrogate;
   every claim (Euclidean, cosine, top-k) checked at every point.
3. Exact oracle (activation-region enumeration) on tiny ReLU MLPs: the chord Euclidean >= the exact max.
4. What is returned is the proof's quantity: the Euclidean bound is exactly min(box, chord) (rounded
   up), the cosine at least the spec-row one, the top-k pairs are those of the objectives, and the
   one-sided pass gives the same upper bounds as the two-sided one.
5. Measured improvement (not a soundness claim): on fixed ReLU MLPs the new bounds are strictly
   tighter than the box-derived ones (``objectives.ENABLED = False`` gives the box, same process), for
   every attribution.
"""

from __future__ import annotations

import pytest
import soundness_fuzz as sf
import torch
from exact_oracle import exact_saliency_range
from torch import nn

import bounds.objectives as ob
from bounds import certified_bound
from bounds.attribution import attribution as attr_fn
from bounds.certified import certainly_in_topk, map_box
from bounds.floatsafe import round_down, round_up


# ----------------------------------------------------------------------------------------------
# 1. algebra
# ----------------------------------------------------------------------------------------------
def _random_box(shape, gen):
    a = torch.randn(shape, generator=gen, dtype=torch.float64)
    b = torch.randn(shape, generator=gen, dtype=torch.float64)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    hi = torch.where(torch.rand(shape, generator=gen) < 0.1, lo, hi)  # some degenerate coordinates
    return lo, hi


def test_chord_square_bound_brute_force():
    gen = torch.Generator().manual_seed(0)
    lo, hi = _random_box((4, 30), gen)
    g0 = lo + (hi - lo) * torch.rand(lo.shape, generator=gen, dtype=torch.float64)
    for c in ((lo - g0) + (hi - g0), torch.randn(lo.shape, generator=gen, dtype=torch.float64)):
        pts = lo + (hi - lo) * torch.rand((500,) + lo.shape, generator=gen, dtype=torch.float64)
        pts[:100] = torch.where(torch.rand((100,) + lo.shape, generator=gen) < 0.5, lo, hi)  # vertices
        c_up = (c * pts).sum(dim=2).amax(dim=0)  # the exact max of c . g' over these points
        bound = ob.chord_square_bound(g0, lo, hi, c, c_up)
        assert (((pts - g0) ** 2).sum(dim=2) <= bound).all()
    # the chord is the box bound when the row bound is the box's own bound of c . g'
    c = (lo - g0) + (hi - g0)
    box_row = torch.maximum(c * lo, c * hi).sum(dim=1)
    box = torch.maximum((lo - g0) ** 2, (hi - g0) ** 2).sum(dim=1)
    assert torch.allclose(ob.chord_square_bound(g0, lo, hi, c, box_row), box, rtol=1e-12)


@pytest.mark.parametrize("shape", [(3, 12), (2, 3, 4, 4)])
def test_pair_rows_bound_map_differences(shape):
    """m_j - m_i <= row . g + const at random points g of the box, for every emitted pair."""
    gen = torch.Generator().manual_seed(1)
    lo, hi = _random_box(shape, gen)
    g0 = lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)
    rows, idx, const = ob._pair_rows(g0, lo, hi, torch.float32)
    assert rows is not None
    pts = lo + (hi - lo) * torch.rand((300,) + shape, generator=gen, dtype=torch.float64)
    pts[:100] = torch.where(torch.rand((100,) + shape, generator=gen) < 0.5, lo, hi)
    maps = torch.stack([sf._map(p) for p in pts])  # (P, B, N)
    lin = torch.einsum("bqn,pbn->pbq", rows, pts.flatten(2))  # (P, B, pairs)
    valid = idx[..., 0] >= 0
    s, i, j = idx[valid].unbind(dim=1)
    q = valid.nonzero()[:, 1]
    diff = maps[:, s, j] - maps[:, s, i]
    assert (diff <= lin[:, s, q] + const[s, q]).all()
    # every emitted pair is one the box could not decide
    m_lo, m_hi = map_box(lo, hi)
    assert (m_hi[s, j] >= m_lo[s, i]).all()


def test_pair_count_without_pairs_equals_box_rule():
    gen = torch.Generator().manual_seed(2)
    m_lo = torch.rand(5, 40, generator=gen, dtype=torch.float64)
    m_hi = m_lo + 0.3 * torch.rand(5, 40, generator=gen, dtype=torch.float64)
    m_hi[:, :5] = m_lo[:, :5]  # exact ties with other entries' lower bounds
    m_lo[:, 5] = m_hi[:, 6]
    count = ob.pair_certified_count(m_lo, m_hi, None)
    for k in (1, 3, 7, 20):
        assert torch.equal(count < k, certainly_in_topk(m_lo, m_hi, k))


# ----------------------------------------------------------------------------------------------
# 2. soundness through the real net
# ----------------------------------------------------------------------------------------------
def _mlp(act, seed: int, n: int = 10, h: int = 20, scale: float = 1.5) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(n, h), act(), nn.Linear(h, h), act(), nn.Linear(h, 4))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(scale)
    return net.eval()


def _cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 3)
    ).eval()


def _with_zeros(x: torch.Tensor, seed: int) -> torch.Tensor:
    """x with ~25% exact zeros (gradient x input and IG are exactly 0 there at x) and an all-zero last
    sample (a(x) = 0: no cosine, the Euclidean bound alone)."""
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))
    x = torch.where(u < 0.25, torch.zeros_like(x), x)
    x[-1] = 0.0
    return x


def _attack_objectives(net, x, res, cfg, gen) -> list[tuple[str, torch.Tensor]]:
    """PGD on -cosine and on a top-k overlap surrogate (the entries certified for k, pushed down; the
    others, pushed up), through the real net and a smooth surrogate."""
    target, eps, norm, dom = res.target, cfg.eps, cfg.norm, cfg.domain
    attr, steps = cfg.attribution, cfg.ig_steps
    g0 = res.attribution_at_x.detach().flatten(1)
    k = max(2, g0.shape[1] // 5)
    m0 = sf._map(res.attribution_at_x)
    top = torch.zeros_like(m0, dtype=torch.bool).scatter_(1, m0.topk(k, dim=1).indices, True)
    weight = torch.where(top, -1.0, 1.0)
    blocks = []
    for name, model in (("real", net), ("surrogate", sf.smooth_surrogate(net, 10.0, 0.05))):
        def neg_cos(xp, m=model):
            g = attr_fn(m, xp, target, attr, steps=steps, create_graph=True).flatten(1)
            return -torch.nn.functional.cosine_similarity(g, g0, dim=1)

        def topk_loss(xp, m=model):
            g = attr_fn(m, xp, target, attr, steps=steps, create_graph=True)
            return (weight * sf._map(g) / sf._map(g).sum(dim=1, keepdim=True).clamp_min(1e-12)).sum(dim=1)

        for loss in (neg_cos, topk_loss):
            start = sf.sample_points(x, eps, norm, dom, 1, gen)[0]
            blocks.append((f"pgd-{loss.__name__}-{name}", torch.stack(sf.pgd(loss, x, eps, norm, dom, 10, start))))
    return blocks


CASES = [
    ("relu-mlp", "inf", 0.05, "saliency"),
    ("relu-mlp", "2", 0.15, "saliency"),
    ("softplus-mlp", "inf", 0.05, "saliency"),
    ("softplus-mlp", "2", 0.2, "saliency"),
    ("relu-cnn", "inf", 0.03, "saliency"),
    ("relu-cnn", "2", 0.1, "saliency"),
    ("relu-mlp", "inf", 0.05, "grad_x_input"),
    ("relu-mlp", "2", 0.15, "grad_x_input"),
    ("softplus-mlp", "inf", 0.05, "grad_x_input"),
    ("relu-cnn", "inf", 0.03, "grad_x_input"),
    ("relu-cnn", "2", 0.1, "grad_x_input"),
    ("relu-mlp", "inf", 0.05, "ig"),
    ("softplus-mlp", "2", 0.2, "ig"),
    ("relu-cnn", "inf", 0.03, "ig"),
]
IG_STEPS = 4


def _case(kind: str, zeros: bool = False):
    if kind == "relu-mlp":
        net, x = _mlp(nn.ReLU, 0), torch.rand(4, 10, generator=torch.Generator().manual_seed(5))
    elif kind == "softplus-mlp":
        net, x = _mlp(lambda: nn.Softplus(beta=4), 1), torch.rand(4, 10, generator=torch.Generator().manual_seed(6))
    else:
        net, x = _cnn(2), torch.rand(3, 2, 6, 6, generator=torch.Generator().manual_seed(7))
    return net, (_with_zeros(x, 8) if zeros else x)


@pytest.mark.parametrize(("kind", "norm", "eps", "attribution"), CASES)
def test_objectives_sound_under_attack(kind, norm, eps, attribution):
    _check_sound(kind, norm, eps, attribution, "crown")


@pytest.mark.parametrize(("attribution", "norm"), [("grad_x_input", "inf"), ("ig", "2")])
def test_alpha_crown_objectives_sound_under_attack(attribution, norm):
    """alpha-CROWN's optimised spec rows (softplus: McCormick mixes and slopes optimised)."""
    _check_sound("softplus-mlp", norm, 0.05 if norm == "inf" else 0.2, attribution, "alpha-crown")


def _check_sound(kind, norm, eps, attribution, method):
    net, x = _case(kind, zeros=attribution != "saliency")
    res = certified_bound(net, x, eps, norm, attribution, method=method, ig_steps=IG_STEPS)
    assert res.method == method
    obj = res.details["objectives"]
    assert "chord" in obj["euclidean"]  # the new objectives were computed (and used somewhere)
    cfg = sf.FuzzConfig(seed=0, in_shape=tuple(x.shape[1:]), layers=[], scale=1.0, norm=norm, eps=eps,
                        attribution=attribution, domain=(0.0, 1.0), ig_steps=IG_STEPS, batch=x.shape[0],
                        classes=4 if kind != "relu-cnn" else 3)
    gen = torch.Generator().manual_seed(11)
    blocks = sf.attack_points(net, x, cfg, res.target, {"crown": res}, sf.DEFAULT_BUDGET, gen)
    blocks += _attack_objectives(net, x, res, cfg, gen)
    pts = torch.cat([p for _, p in blocks])
    src = [name for name, p in blocks for _ in range(p.shape[0])]
    gs = attr_fn(net, pts.flatten(0, 1), res.target.repeat(pts.shape[0]), attribution, steps=IG_STEPS).detach()
    violations = sf.check_certificate(res, gs.view(pts.shape), None, src)
    assert not violations, violations


@pytest.mark.parametrize(("kind", "norm", "eps", "attribution", "tight"), [
    ("softplus-mlp", "inf", 0.01, "grad_x_input", True),
    ("softplus-mlp", "inf", 0.01, "ig", True),
    ("softplus-mlp", "inf", 0.01, "saliency", True),
    ("relu-mlp", "inf", 0.05, "ig", False),
    ("relu-cnn", "2", 0.1, "grad_x_input", False),
])
def test_spec_rows_above_linear_pgd(kind, norm, eps, attribution, tight, monkeypatch):
    """The row bounds themselves (``spec_upper`` + the float term, what every objective is built on)
    against PGD on c . a(x') through the real net, for random rows c.  On the near-linear softplus case
    the bound is close to the attack (median slack < 40% of the rise above c . a(x)), so a wrong IG
    weight or a missing product would fail here, where the Euclidean's own slack could hide it."""
    net, x = _case(kind, zeros=True)
    _, _, _ = _box_and_new(net, x[:1], eps, norm, attribution)  # warm the module cache
    seen = {}
    orig = ob.objective_bounds

    def spy(crown_args, err, *args, **kw):
        seen["args"], seen["err"] = crown_args, err
        return orig(crown_args, err, *args, **kw)

    monkeypatch.setattr(ob, "objective_bounds", spy)
    res = certified_bound(net, x, eps, norm, attribution, ig_steps=IG_STEPS)
    b, n, m = x.shape[0], x[0].numel(), 4
    rows = torch.randn(b, m, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ub = ob.spec_upper(seen["args"], rows, attribution) + ob._float_term(rows, seen["err"].reshape(b, 1, -1))
    best = torch.full((b, m), -float("inf"), dtype=torch.float64)
    for r in range(m):
        c = rows[:, r].to(x.dtype)

        def lin(xp, c=c):
            return (attr_fn(net, xp, res.target, attribution, steps=IG_STEPS, create_graph=True).flatten(1) * c).sum(1)

        its = sf.pgd(lin, x, eps, norm, (0.0, 1.0), 15, x.clone())
        its += list(sf.sample_points(x, eps, norm, (0.0, 1.0), 16, torch.Generator().manual_seed(r)))
        for xp in its:
            a = attr_fn(net, xp, res.target, attribution, steps=IG_STEPS).detach().flatten(1).double()
            best[:, r] = torch.maximum(best[:, r], (a * rows[:, r]).sum(1))
    assert (best <= ub).all(), (best - ub).max()
    if tight:
        v0 = (res.attribution_at_x.flatten(1).double().unsqueeze(1) * rows).sum(2)
        assert float(((ub - best) / (ub - v0)).median()) < 0.4


def test_ibp_keeps_the_box():
    net, x = _mlp(nn.ReLU, 0), torch.rand(2, 10, generator=torch.Generator().manual_seed(5))
    for attribution in ob.ATTRIBUTIONS:
        res = certified_bound(net, x, 0.05, "inf", attribution, method="ibp", ig_steps=3)
        assert res.details["objectives"]["used"] == "box"
        assert res.topk_pairs is None


def test_recorded_pass_must_match_the_attribution():
    """A GradNet pass without the product cannot bound gradient x input rows (and vice versa)."""
    args = {"times_input": False}
    with pytest.raises(ValueError, match="grad_x_input"):
        ob.spec_upper(args, torch.zeros(1, 3, 4, dtype=torch.float64), "grad_x_input")
    with pytest.raises(ValueError, match="saliency"):
        ob.spec_upper({"times_input": True}, torch.zeros(1, 3, 4, dtype=torch.float64), "saliency")


# ----------------------------------------------------------------------------------------------
# 3. exact oracle
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("seed", "norm", "eps"), [(0, "inf", 0.08), (1, "inf", 0.15), (2, "2", 0.15), (3, "inf", 0.1)])
def test_chord_euclidean_above_exact_max(seed, norm, eps):
    net = _mlp(nn.ReLU, 100 + seed, n=4, h=8, scale=1.0)
    x = torch.rand(2, 4, generator=torch.Generator().manual_seed(200 + seed)) * 0.8 + 0.1
    res = certified_bound(net, x, eps, norm)
    assert "chord" in res.details["objectives"]["euclidean"]
    for b in range(x.shape[0]):
        ex = exact_saliency_range(net, x[b], eps, int(res.target[b]), norm=norm)
        assert float(res.euclidean[b]) >= ex["max_euclidean"] - 1e-7


# ----------------------------------------------------------------------------------------------
# 4. the returned numbers are the proof's quantities
# ----------------------------------------------------------------------------------------------
def _box_and_new(net, x, eps, norm, attribution, monkeypatch=None):
    """(box result, new result, the ObjectiveBounds the new call computed), same process."""
    ob.ENABLED = False
    try:
        box = certified_bound(net, x, eps, norm, attribution, ig_steps=IG_STEPS)
    finally:
        ob.ENABLED = True
    seen = []
    if monkeypatch is not None:
        orig = ob.objective_bounds

        def spy(*args, **kw):
            seen.append(orig(*args, **kw))
            return seen[-1]

        monkeypatch.setattr(ob, "objective_bounds", spy)
    new = certified_bound(net, x, eps, norm, attribution, ig_steps=IG_STEPS)
    return box, new, (seen[0] if seen else None)


@pytest.mark.parametrize("attribution", ["saliency", "grad_x_input", "ig"])
def test_returned_bounds_are_the_proofs(attribution, monkeypatch):
    net = _mlp(nn.ReLU, 3, n=16, h=32, scale=1.0)
    x = _with_zeros(torch.rand(6, 16, generator=torch.Generator().manual_seed(9)), 10)
    box, new, sharp = _box_and_new(net, x, 0.03, "inf", attribution, monkeypatch)
    assert sharp is not None
    dt = new.euclidean.dtype
    # Euclidean: exactly min(box, chord), rounded up into the model's dtype (rounding is monotone)
    assert torch.equal(new.euclidean, torch.minimum(box.euclidean, round_up(sharp.euclidean, dt)))
    # cosine: at least the spec-row bound and the box one (the tangent bound may add more)
    assert (new.cosine >= torch.maximum(box.cosine, round_down(sharp.cosine.clamp(-1, 1), dt))).all()
    assert torch.equal(new.lower, box.lower) and torch.equal(new.upper, box.upper)  # the box is unchanged
    if sharp.pairs is None:
        assert new.topk_pairs is None
    else:
        assert torch.equal(new.topk_pairs, sharp.pairs)


@pytest.mark.parametrize("attribution", ["saliency", "grad_x_input", "ig"])
def test_one_sided_pass_same_upper_bounds(attribution):
    """``ONE_SIDED`` skips auto_LiRPA's lower side: the upper bounds (all that is used) are identical."""
    net = _mlp(nn.ReLU, 3, n=16, h=32, scale=1.0)
    x = torch.rand(4, 16, generator=torch.Generator().manual_seed(9))
    out = []
    for flag in (False, True):
        ob.ONE_SIDED = flag
        try:
            r = certified_bound(net, x, 0.03, "inf", attribution, ig_steps=IG_STEPS)
        finally:
            ob.ONE_SIDED = True
        out.append(r)
    assert torch.equal(out[0].euclidean, out[1].euclidean) and torch.equal(out[0].cosine, out[1].cosine)
    a, b = out[0].topk_pairs, out[1].topk_pairs
    assert (a is None and b is None) or torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# 5. measured improvement over the box
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attribution", ["saliency", "grad_x_input", "ig"])
def test_new_objectives_tighter_than_box(attribution):
    net, x = _mlp(nn.ReLU, 3, n=16, h=32, scale=1.0), torch.rand(8, 16, generator=torch.Generator().manual_seed(9))
    box, new, _ = _box_and_new(net, x, 0.03, "inf", attribution)
    assert (new.euclidean <= box.euclidean).all() and (new.euclidean < box.euclidean).any()
    assert (new.cosine >= box.cosine).all() and (new.cosine > box.cosine).any()
    ks = (1, 3, 5)
    assert all((new.topk_intersection(k) >= box.topk_intersection(k)).all() for k in ks)
    assert any((new.topk_intersection(k) > box.topk_intersection(k)).any() for k in ks)


@pytest.mark.slow
@pytest.mark.parametrize("attribution", ["saliency", "grad_x_input", "ig"])
@pytest.mark.parametrize("chunk", range(4))
def test_fuzz_configs_forced_to_attribution(chunk, attribution):
    """The fuzz suite's random configurations (every layer kind, both norms, domain or none, inputs with
    exact zeros), forced to one attribution (every certificate goes through the spec-row objectives);
    slow attack budget."""
    import dataclasses

    for seed in range(3000 + 10 * chunk, 3010 + 10 * chunk):
        cfg = dataclasses.replace(sf.random_config(seed), attribution=attribution)
        rep = sf.run_config(cfg, sf.SLOW_BUDGET)
        assert not rep["violations"] and not rep["errors"], (cfg.reproducer(), rep["violations"], rep["errors"])
