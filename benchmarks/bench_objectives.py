"""Benchmark: the spec-row objectives (bounds/objectives.py) against the box-derived ones, same process.

    python benchmarks/bench_objectives.py [--n 16] [--nets relu-mlp,softplus-mlp,mnist-mlp,mnist-cnn]
        [--attributions saliency,grad_x_input,ig] [--ig-steps 8] [--ig-nets relu-mlp,softplus-mlp,mnist-mlp]
        [--threads 2] [--pair-budget 64]
        [--out benchmarks/results/objectives.txt]

For every net, attribution and radius: ``certified_bound`` (method "crown", the attribution of the
predicted logit, domain [0, 1]; IG with ``--ig-steps`` path points, on the ``--ig-nets`` only: IG on
the MNIST CNN costs ig_steps x the saliency time) once with ``objectives.ENABLED =
False`` (the box objectives: Euclidean from the box, cosine = max(box, tangent), top-k from the map box)
and once with it on (chord Euclidean, spec-row cosine, top-k pair rows, each max/min-ed with the box
one), after one warm-up call (the auto_LiRPA module cache).  One-sided spec pass: the recorded
``objective_bounds`` call is rerun twice each with ``objectives.ONE_SIDED`` False (the pass also computes
the unused lower bounds) and True, alternating; minimum wall and process CPU times (CPU time is the
steadier measure on a shared machine; same bounds, checked).
Reported: median Euclidean bound (box, new) and the median per-sample ratio new / box; median certified
cosine and the fraction of samples certified at cosine >= 0.9; mean certified top-k intersection; wall
time of both calls, the overhead ratio, and the objectives' own time (``details["objectives"]["time"]``:
the extra CROWN pass and the combination; the wall-time ratio is noisy on a shared machine).  Nets: random ReLU / softplus MLPs (16-32-32-4, seeded, inputs
uniform in [0, 1]), and MNIST (first --n test images) with the zoo ``mlp`` (784-100-100-10, 1 epoch
natural training here) and ``cnn-small`` (the test fixture's cached weights when present, else trained
here for 1 epoch on 20k images).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import pathlib
import platform
import statistics
import sys
import time
import warnings

import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bounds.objectives as ob
from bounds import certified_bound


def _load() -> str:
    try:
        return " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _random_mlp(act, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), act(), nn.Linear(32, 32), act(), nn.Linear(32, 4)).eval()


def _mnist_model(name: str, log) -> nn.Module:
    from certattr.data import load_dataset
    from certattr.models import build_model
    from certattr.train import fit

    x_tr, y_tr = load_dataset("mnist", "train")
    torch.manual_seed(0)
    if name == "cnn-small":  # the recipe of tests/conftest.py's trained_cnn_small (cached weights)
        recipe = {"name": "cnn-small", "epochs": 2, "lr": 2e-3, "activation": "relu", "n": 20000, "seed": 0}
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
        path = ROOT / "tests" / ".cache" / f"cnn-small-{key}.safetensors"
        model = build_model("cnn-small")
        if path.exists():
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(path)))
            how = f"weights {path.relative_to(ROOT)} (2 epochs, 20k images)"
        else:
            fit(model, (x_tr[:20000], y_tr[:20000]), epochs=1, batch_size=64, lr=2e-3, seed=0, progress=False)
            how = "trained here, 1 epoch on 20k images"
    else:
        model = build_model("mlp", hidden=(100, 100))
        fit(model, (x_tr[:20000], y_tr[:20000]), epochs=1, batch_size=128, lr=1e-3, seed=0, progress=False)
        how = "784-100-100-10, trained here, 1 epoch on 20k images"
    model.eval()
    x_te, y_te = load_dataset("mnist", "test")
    with torch.no_grad():
        acc = float((model(x_te[:1000]).argmax(1) == y_te[:1000]).float().mean())
    log(f"# {name}: {how}; accuracy {acc:.3f} on the first 1000 test images")
    return model


def _run(model, x, norm, eps, ks, attribution="saliency", steps=8):
    kw = {"attribution": attribution, "ig_steps": steps}
    ob.ENABLED = False
    try:
        certified_bound(model, x[:2], eps, norm, **kw)  # warm-up (module cache)
        t = time.perf_counter()
        box = certified_bound(model, x, eps, norm, **kw)
        t_box = time.perf_counter() - t
    finally:
        ob.ENABLED = True
    certified_bound(model, x[:2], eps, norm, **kw)  # warm-up of the spec-row pass's module
    calls = []
    orig = ob.objective_bounds

    def spy(*a, **k):
        calls.append((a, k))
        return orig(*a, **k)

    ob.objective_bounds = spy
    try:
        t = time.perf_counter()
        new = certified_bound(model, x, eps, norm, **kw)
        t_new = time.perf_counter() - t
    finally:
        ob.objective_bounds = orig
    nan = float("nan")
    t_one, t_two, c_one, c_two, same = _one_sided_times(calls[0]) if calls else (nan, nan, nan, nan, True)
    ratio = (new.euclidean / box.euclidean.clamp_min(1e-30)).tolist()
    row = {
        "euc_box": statistics.median(box.euclidean.tolist()),
        "euc_new": statistics.median(new.euclidean.tolist()),
        "euc_ratio": statistics.median(ratio),
        "cos_box": statistics.median(box.cosine.tolist()),
        "cos_new": statistics.median(new.cosine.tolist()),
        "c90_box": float((box.cosine >= 0.9).float().mean()),
        "c90_new": float((new.cosine >= 0.9).float().mean()),
        "topk": [(k, float(box.topk_intersection(k).mean()), float(new.topk_intersection(k).mean())) for k in ks],
        "t_box": t_box,
        "t_new": t_new,
        "rows": new.details.get("objectives", {}).get("spec_rows"),
        "pairs": new.details.get("objectives", {}).get("topk_pairs_refuted"),
        "t_obj": new.details.get("objectives", {}).get("time", float("nan")),
        "t_one": t_one,
        "t_two": t_two,
        "c_one": c_one,
        "c_two": c_two,
        "same": same,
    }
    return row


def _one_sided_times(call, repeats: int = 2) -> tuple[float, float, bool]:
    """The recorded ``objective_bounds`` call rerun ``repeats`` times each with ``ONE_SIDED`` True and
    False, alternating: (min time one-sided, min time two-sided, identical results)."""
    args, kwargs = call
    times: dict = {True: [], False: []}
    cpu: dict = {True: [], False: []}
    res = {}
    try:
        for _ in range(repeats):
            for flag in (False, True):
                ob.ONE_SIDED = flag
                t, c = time.perf_counter(), time.process_time()
                res[flag] = ob.objective_bounds(*args, **kwargs)
                times[flag].append(time.perf_counter() - t)
                cpu[flag].append(time.process_time() - c)
    finally:
        ob.ONE_SIDED = True
    a, b = res[True], res[False]
    same = torch.equal(a.euclidean, b.euclidean) and torch.equal(a.cosine, b.cosine) and (
        (a.pairs is None and b.pairs is None) or torch.equal(a.pairs, b.pairs))
    return min(times[True]), min(times[False]), min(cpu[True]), min(cpu[False]), bool(same)


_SHORT = {"saliency": "sal", "grad_x_input": "gxi", "ig": "ig"}


def _fmt(net, attribution, norm, eps, r) -> str:
    topk = " ".join(f"top{k} {a:.3f}->{b:.3f}" for k, a, b in r["topk"])
    return (
        f"{net:13s} {_SHORT[attribution]:3s} {norm:>3s} {eps:<7g} euclid {r['euc_box']:.4g} -> {r['euc_new']:.4g} (median ratio "
        f"{r['euc_ratio']:.3f}) | cos {r['cos_box']:.3f} -> {r['cos_new']:.3f}, cos>=0.9 {r['c90_box']:.2f} -> "
        f"{r['c90_new']:.2f} | {topk} | time {r['t_box']:.2f}s -> {r['t_new']:.2f}s "
        f"(x{r['t_new'] / max(r['t_box'], 1e-9):.2f}; objectives' own time {r['t_obj']:.2f}s; spec rows/sample "
        f"{r['rows']}, pairs refuted {r['pairs']}) | spec pass one-sided / two-sided: wall {r['t_one']:.3f}s / "
        f"{r['t_two']:.3f}s = x{r['t_one'] / max(r['t_two'], 1e-9):.2f}, cpu {r['c_one']:.3f}s / {r['c_two']:.3f}s = "
        f"x{r['c_one'] / max(r['c_two'], 1e-9):.2f}{'' if r['same'] else ' BOUNDS DIFFER'}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="samples per configuration")
    ap.add_argument("--nets", default="relu-mlp,softplus-mlp,mnist-mlp,mnist-cnn")
    ap.add_argument("--attributions", default="saliency,grad_x_input,ig")
    ap.add_argument("--ig-steps", type=int, default=8, help="IG path points (certified_bound's ig_steps)")
    ap.add_argument("--ig-nets", default="relu-mlp,softplus-mlp,mnist-mlp", help="nets that get IG rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pair-budget", type=int, default=ob.PAIR_BUDGET, help="objectives.PAIR_BUDGET")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "objectives.txt"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    ob.PAIR_BUDGET = args.pair_budget
    lines: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    log(f"# bench_objectives.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.node()} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, PAIR_BUDGET {ob.PAIR_BUDGET}; n = {args.n} samples each; "
        f"IG {args.ig_steps} path points; load average at start {_load()}")
    log("# box = objectives from the elementwise box (objectives.ENABLED = False); new = spec-row objectives; "
        "sal / gxi / ig = saliency / gradient x input / integrated gradients")
    for net in args.nets.split(","):
        if net in ("relu-mlp", "softplus-mlp"):
            act = nn.ReLU if net == "relu-mlp" else (lambda: nn.Softplus(beta=5))
            model = _random_mlp(act, 0)
            x = torch.rand(args.n, 16, generator=torch.Generator().manual_seed(1))
            configs, ks = [("inf", 0.02), ("inf", 0.05), ("2", 0.1)], (1, 3, 5)
        else:
            from certattr.data import load_dataset

            model = _mnist_model("cnn-small" if net == "mnist-cnn" else "mlp", log)
            x = load_dataset("mnist", "test")[0][: args.n]
            configs, ks = [("inf", 0.002), ("inf", 0.005), ("2", 0.03), ("2", 0.1)], (5, 20, 100)
        for attribution in args.attributions.split(","):
            if attribution == "ig" and net not in args.ig_nets.split(","):
                continue
            for norm, eps in configs:
                row = _run(model, x, norm, eps, ks, attribution, args.ig_steps)
                log(_fmt(net, attribution, norm, eps, row))
    log(f"# load average at the end {_load()}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
