"""Input branch-and-bound (bounds.complete_input, ``complete_bound(branching="input")``): soundness against
sampling and PGD through the real net (zero tolerance), the witness, the gap shrinking with the budget, a
dense-grid oracle on a 2-D input, dispatch and bad input."""

from __future__ import annotations

import pytest
import torch
from soundness_fuzz import pgd, sample_points, smooth_surrogate
from torch import nn

import bounds.complete as complete_module
import bounds.complete_input as ci
from bounds import complete_bound
from bounds.attribution import attribution as attr_fn
from bounds.checks import PhaseBranchingUnsupported
from bounds.complete_input import input_branch_bound, shrink_to_ball

IG_STEPS = 6


def _mlp(n: int, act: type, seed: int, hidden: int = 10, scale: float = 1.0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(n, hidden), act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, 3))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(scale)
    return net.eval()


def _cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(16, 3),
    ).eval()


def _attack_values(net, x, eps, norm, attribution, target, objective, gen) -> torch.Tensor:
    """Badness (B, P) of the real net's attribution at sampled and PGD points (P per sample)."""
    dom = (0.0, 1.0)

    def a_of(model, xp, graph=False):
        return attr_fn(model, xp, target, attribution, steps=IG_STEPS, create_graph=graph)

    g0 = a_of(net, x).detach().flatten(1).double()
    pts = [sample_points(x, eps, norm, dom, 48, gen)]
    models = [net] + ([smooth_surrogate(net, 10.0, 0.05)] if any(isinstance(m, nn.ReLU) for m in net) else [])
    for model in models:
        g0m = a_of(model, x).detach()
        start = sample_points(x, eps, norm, dom, 1, gen)[0]
        its = pgd(lambda xp, m=model, g=g0m: ((a_of(m, xp, True) - g) ** 2).flatten(1).sum(1), x, eps, norm,
                  dom, 10, start)
        pts.append(torch.stack(its))
    allp = torch.cat(pts)  # (P, B, ...)
    vals = []
    for p in allp:
        g = a_of(net, p.detach()).detach().flatten(1).double()
        if objective == "euclidean":
            vals.append((g - g0).norm(dim=1))
        else:
            vals.append(torch.nn.functional.cosine_similarity(g, g0, dim=1, eps=1e-300))
    return torch.stack(vals, dim=1)


def _check_witness(res, net, x, eps, norm, attribution, objective):
    for i in range(x.shape[0]):
        w = res.witness[i : i + 1]
        assert w.dtype == x.dtype
        d64 = (w.double() - x[i : i + 1].double()).flatten()
        d32 = (w - x[i : i + 1]).flatten()
        if norm == "inf":
            assert float(d64.abs().max()) <= eps and float(d32.abs().max()) <= eps
        else:
            assert float(d64.norm()) <= eps and float(d32.norm()) <= eps
        assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0
        t = res.target[i : i + 1]
        g1 = attr_fn(net, w, t, attribution, steps=IG_STEPS).detach().double().flatten()
        g0 = attr_fn(net, x[i : i + 1], t, attribution, steps=IG_STEPS).detach().double().flatten()
        if objective == "euclidean":
            assert float((g1 - g0).norm()) == pytest.approx(float(res.lower[i]), rel=0, abs=1e-12)
        else:
            cos = float((g1 @ g0) / (g1.norm() * g0.norm()))
            assert cos == pytest.approx(float(res.upper[i]), rel=0, abs=1e-9)


SOUND_CASES = [  # (net, norm, attribution, objective, eps)
    ("softplus", "inf", "saliency", "euclidean", 0.08),
    ("tanh", "2", "saliency", "euclidean", 0.2),
    ("sigmoid", "inf", "grad_x_input", "euclidean", 0.1),
    ("softplus", "2", "ig", "euclidean", 0.2),
    ("tanh", "inf", "saliency", "cosine", 0.1),
    ("cnn", "inf", "saliency", "euclidean", 0.05),
    ("cnn", "2", "grad_x_input", "euclidean", 0.2),
    ("cnn", "inf", "ig", "cosine", 0.05),
]
ACTS = {"softplus": nn.Softplus, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def weaken_incumbent(monkeypatch) -> None:
    """x and 4 random points only: the upper then rests on the box bounds, not on a strong attack
    (else a wrong bound that prunes everything would still report the attack's value)."""
    for name, value in (("ATTACK_SAMPLES", 0), ("ATTACK_STEPS", 0), ("BOX_PGD_STEPS", 0), ("SCORE_CENTRES", False)):
        monkeypatch.setattr(ci, name, value)


@pytest.mark.parametrize("kind,norm,attribution,objective,eps", SOUND_CASES)
def test_sound_against_attacks_and_witness(kind, norm, attribution, objective, eps, monkeypatch):
    seed = SOUND_CASES.index((kind, norm, attribution, objective, eps))
    weaken_incumbent(monkeypatch)
    if kind == "cnn":
        net, x = _cnn(seed), torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    else:
        net = _mlp(5, ACTS[kind], seed, scale=2.0)
        x = torch.rand(2, 5, generator=torch.Generator().manual_seed(seed))
    res = complete_bound(net, x, eps, norm, attribution, objective, budget_s=0.4, branching="input",
                         ig_steps=IG_STEPS, seed=seed)
    assert res.method == "input-bab"
    vals = _attack_values(net, x, eps, norm, attribution, res.target, objective, torch.Generator().manual_seed(7))
    lo, up = res.lower.double(), res.upper.double()
    assert (lo <= up).all()
    if objective == "euclidean":
        assert (vals.max(dim=1).values <= up).all(), (vals.max(dim=1).values, up)
        assert torch.equal(res.euclidean, up)
    else:  # lower: certified min cosine; upper: the cosine reached at the witness
        assert (vals.min(dim=1).values >= lo).all(), (vals.min(dim=1).values, lo)
        assert torch.equal(res.cosine, lo)
    assert torch.allclose(res.gap, up - lo)
    assert all(s in ("gap closed", "budget", "memory", "exhausted") for s in res.stop_reason)
    _check_witness(res, net, x, eps, norm, attribution, objective)


@pytest.mark.parametrize("norm,eps", [("inf", 0.1), ("2", 0.1)])
def test_gap_shrinks_and_closes_on_a_2d_smooth_net(norm, eps, monkeypatch):
    """float64 model (no float32 floor): the gap shrinks with the budget and closes to <= 5%; with a weak
    incumbent the upper (then the box bounds alone) still converges to the grid maximum from above."""
    net = _mlp(2, nn.Softplus, 1, hidden=16, scale=3.0).double()
    x = torch.tensor([[0.4, 0.6]], dtype=torch.float64)
    short = input_branch_bound(net, x, eps, norm, budget_s=0.05, tol=0.0, batch_size=2)
    long = input_branch_bound(net, x, eps, norm, budget_s=30.0, tol=0.02)  # stops when closed (~3 s idle)
    with monkeypatch.context() as mp:
        weaken_incumbent(mp)
        weak = input_branch_bound(net, x, eps, norm, budget_s=2.0, tol=0.0)
    assert float(long.gap[0]) < float(short.gap[0])
    assert float(long.gap[0]) <= 0.05 * float(long.upper[0])
    assert long.stop_reason[0] == "gap closed"
    # dense-grid oracle: lower <= (a point's deviation) and grid max <= upper
    s = torch.linspace(-eps, eps, 401, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(s, s, indexing="ij"), -1).reshape(-1, 2)
    if norm == "2":
        grid = grid[grid.norm(dim=1) <= eps]
    pts = (x + grid).clamp(0, 1)
    t = long.target.expand(pts.shape[0])
    g = attr_fn(net, pts, t, "saliency").detach()
    g0 = attr_fn(net, x, long.target, "saliency").detach()
    grid_max = float((g - g0).norm(dim=1).max())
    assert grid_max <= float(long.upper[0])
    assert float(long.lower[0]) <= grid_max * (1 + 1e-3)
    assert float(long.upper[0]) <= grid_max * 1.05
    assert grid_max <= float(weak.upper[0]) <= grid_max * 1.05


def test_float32_net_closes_up_to_the_float_floor():
    """float32: the certified float-error widening leaves a floor; the gap still shrinks to a few %."""
    net = _mlp(2, nn.Tanh, 3, hidden=12, scale=3.0)
    x = torch.tensor([[0.3, 0.7]])
    input_branch_bound(net, x, 0.1, "inf", budget_s=0.01)  # builds (and caches) auto_LiRPA's modules
    res = input_branch_bound(net, x, 0.1, "inf", budget_s=1.5, tol=0.0)
    assert float(res.gap[0]) <= 0.1 * float(res.upper[0])
    _check_witness(res, net, x, 0.1, "inf", "saliency", "euclidean")


def test_split_rules_and_eps_zero():
    net = _mlp(3, nn.Sigmoid, 4, scale=2.0)
    x = torch.rand(1, 3, generator=torch.Generator().manual_seed(4))
    a = input_branch_bound(net, x, 0.1, budget_s=0.3, split_rule="widest")
    b = input_branch_bound(net, x, 0.1, budget_s=0.3, split_rule="smear")
    assert a.details["per_sample"][0]["split_rule"] == "widest"
    for r in (a, b):
        assert float(r.lower[0]) <= float(r.upper[0])
    z = input_branch_bound(net, x, 0.0)
    assert float(z.lower[0]) == float(z.upper[0]) == 0.0 and z.stop_reason == ["gap closed"]
    assert torch.equal(z.witness, x)


def test_memory_cap_stops_the_search():
    net = _mlp(3, nn.Softplus, 5, scale=2.0)
    x = torch.rand(1, 3, generator=torch.Generator().manual_seed(5))
    r = input_branch_bound(net, x, 0.1, budget_s=5.0, tol=0.0, max_memory_mb=1e-4)
    assert r.stop_reason == ["memory"] and float(r.lower[0]) <= float(r.upper[0])
    assert r.details["per_sample"][0]["time"] < 5.0


def test_shrink_to_ball_keeps_every_ball_point():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, dtype=torch.float64, generator=gen)
    r = 0.3
    lo = x - r + torch.rand(50, 6, dtype=torch.float64, generator=gen) * 0.4
    hi = lo + torch.rand(50, 6, dtype=torch.float64, generator=gen) * 0.3
    lo0, hi0 = lo.clone(), hi.clone()
    keep = shrink_to_ball(lo, hi, x, r)
    pts = lo0.unsqueeze(1) + torch.rand(50, 2000, 6, dtype=torch.float64, generator=gen) * (hi0 - lo0).unsqueeze(1)
    inside = (pts - x).norm(dim=2) <= r
    in_new = ((pts >= lo.unsqueeze(1)) & (pts <= hi.unsqueeze(1))).all(dim=2)
    assert (in_new | ~inside).all()  # every ball point of the old box is in the new box
    assert not (inside.any(dim=1) & ~keep).any()  # a dropped box had no ball point
    assert (hi <= hi0).all() and (lo >= lo0).all()


def test_dispatch_auto():
    x = torch.rand(1, 4, generator=torch.Generator().manual_seed(1))
    smooth = _mlp(4, nn.Tanh, 0)
    relu = _mlp(4, nn.ReLU, 0)
    assert complete_bound(smooth, x, 0.05, budget_s=0.2).method == "input-bab"
    assert complete_bound(relu, x, 0.05, budget_s=0.2).method == "bab"
    assert complete_bound(relu, x, 0.05, attribution="grad_x_input", budget_s=0.2).method == "input-bab"
    assert complete_bound(relu, x, 0.05, budget_s=0.2, branching="input").method == "input-bab"
    with pytest.raises(ValueError, match="Tanh|relu|ReLU|support"):
        complete_bound(smooth, x, 0.05, budget_s=0.2, branching="phases")


def test_dispatch_falls_back_on_phase_branching_unsupported(monkeypatch):
    def refuse(*args, **kwargs):
        raise PhaseBranchingUnsupported("no phases here")

    monkeypatch.setattr(complete_module, "relu_mlp_from_chain", refuse)
    relu = _mlp(4, nn.ReLU, 0)
    x = torch.rand(1, 4, generator=torch.Generator().manual_seed(1))
    assert complete_bound(relu, x, 0.05, budget_s=0.2).method == "input-bab"
    with pytest.raises(PhaseBranchingUnsupported):
        complete_bound(relu, x, 0.05, budget_s=0.2, branching="phases")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"budget_s": 0}, "budget_s"),
        ({"budget_s": float("nan")}, "budget_s"),
        ({"tol": -0.1}, "tol"),
        ({"objective": "topk"}, "objective"),
        ({"attribution": "lime"}, "attribution"),
        ({"norm": 1}, "norm"),
        ({"max_memory_mb": 0}, "max_memory_mb"),
        ({"batch_size": 0}, "batch_size"),
        ({"ig_steps": 0}, "ig_steps"),
        ({"split_rule": "random"}, "split_rule"),
        ({"eps": -1.0}, "eps"),
    ],
)
def test_bad_input(kwargs, match):
    net = _mlp(3, nn.Softplus, 0)
    args = {"eps": 0.1, **kwargs}
    eps = args.pop("eps")
    with pytest.raises(ValueError, match=match):
        input_branch_bound(net, torch.rand(1, 3), eps, **args)


def test_bad_input_x_and_branching():
    net = _mlp(3, nn.Softplus, 0)
    with pytest.raises(ValueError, match="domain"):
        input_branch_bound(net, torch.full((1, 3), 1.5), 0.1)
    with pytest.raises(ValueError, match="dtype"):
        input_branch_bound(net, torch.rand(1, 3, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="branching"):
        complete_bound(net, torch.rand(1, 3), 0.1, branching="both")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_sound_slow_random(seed, monkeypatch):
    """More nets, longer budgets, every attribution and norm (weak incumbent: the bounds carry the upper)."""
    weaken_incumbent(monkeypatch)
    gen = torch.Generator().manual_seed(100 + seed)
    act = (nn.Softplus, nn.Tanh, nn.Sigmoid)[seed % 3]
    norm = ("inf", "2")[seed % 2]
    attribution = ("saliency", "grad_x_input", "ig")[seed % 3]
    net = _mlp(6, act, 100 + seed, hidden=16, scale=2.5)
    x = torch.rand(3, 6, generator=gen)
    eps = 0.1 if norm == "inf" else 0.25
    res = input_branch_bound(net, x, eps, norm, attribution, budget_s=3.0, ig_steps=IG_STEPS, seed=seed)
    vals = _attack_values(net, x, eps, norm, attribution, res.target, "euclidean", gen)
    assert (vals.max(dim=1).values <= res.upper).all()
    _check_witness(res, net, x, eps, norm, attribution, "euclidean")


def test_cli_certify_complete_input_branching(tmp_path):
    """``certattr certify --bound complete --branching input`` on a softplus MLP: rows with lower <= upper."""
    import csv

    from certattr import checkpoint
    from certattr.cli import main
    from certattr.models import build_model

    torch.manual_seed(0)
    path = tmp_path / "sp"
    checkpoint.save(build_model("mlp", hidden=(8,), activation="softplus"), path, dataset="mnist")
    out = tmp_path / "in.tsv"
    rc = main(["certify", str(path), "--dataset", "mnist", "--n", "1", "--bound", "complete", "--norm", "2",
               "--eps", "0.05", "--budget", "0.3", "--branching", "input", "--out", str(out), "--no-progress"])
    assert rc == 0
    lines = out.read_text().splitlines()
    assert any("branching input" in ln for ln in lines if ln.startswith("#"))
    rows = list(csv.reader([ln for ln in lines if not ln.startswith("#")], delimiter="\t"))
    rec = dict(zip(rows[0], rows[1]))
    assert 0 <= float(rec["lower"]) <= float(rec["euclidean"])
    with pytest.raises(SystemExit):  # argparse: invalid choice
        main(["certify", str(path), "--n", "1", "--bound", "complete", "--eps", "0.05", "--branching", "neither",
              "--out", str(out), "--no-progress"])
