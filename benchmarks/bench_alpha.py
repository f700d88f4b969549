"""Benchmark: what alpha-CROWN buys over CROWN in ``certified_bound``, per objective (issue 10).

    python benchmarks/bench_alpha.py [--iters 5] [--n-random 16] [--n-mlp 8] [--n-cnn 4]
        [--linf 0.005 0.02] [--l2 0.03 0.3] [--threads 2] [--out benchmarks/results/alpha.txt]

Both methods run in the same process on the same samples (saliency of the predicted logit, domain
[0, 1]): ``method="crown"`` and ``method="alpha-crown"`` (``alpha_iters`` = --iters).  Networks:
(a) a random ReLU MLP 16-32-32-10 (seeded default init, inputs uniform in [0, 1]^16); (b) a naturally
trained MNIST MLP 784-100-100-10 and (c) a naturally trained MNIST cnn-small (both trained here,
seeded, 20k training images, cached under tests/.cache; cnn-small with the recipe of the test
fixture, so a test run's cache is reused).  Per (net, norm, eps): mean box width (mean of upper - lower
over samples and coordinates), median certified Euclidean bound, median certified cosine, mean
certified top-k intersection (k = 3 on 16 inputs, 10 on MNIST), label-certified fraction, seconds per
sample; and the ratios alpha/crown (width, Euclidean, time).  Finally the fraction of certified_bound's
time spent inside auto_LiRPA (wall time inside its entry points: BoundedModule construction,
compute_bounds, init_slope, counted once when nested; certattr's own Bound ops that auto_LiRPA calls
count as inside and are also given apart; the autograd backward of alpha-CROWN's optimisation loop
through auto_LiRPA's graph counts as outside) for both methods on cnn-small.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bounds import certified_bound
from bounds.alpha_crown import ALPHA_ITERS
from certattr.data import load_dataset
from certattr.models import build_model

CACHE = ROOT / "tests" / ".cache"


def _trained(name: str, n: int, epochs: int, lr: float, log, **kw) -> torch.nn.Module:
    """A naturally trained zoo model, cached by recipe (the key scheme of tests/conftest.py)."""
    from safetensors.torch import load_file, save_file

    from certattr.train import accuracy, fit

    recipe = {"name": name, "epochs": epochs, "lr": lr, "activation": "relu", "n": n, "seed": 0}
    if kw:
        recipe.update({k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()})
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / f"{name}-{key}.safetensors"
    torch.manual_seed(0)
    model = build_model(name, activation="relu", **kw)
    t0 = time.perf_counter()
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        how = f"loaded {path.name}"
    else:
        x, y = load_dataset("mnist", "train")
        fit(model, (x[:n], y[:n]), epochs=epochs, batch_size=64, lr=lr, seed=0, progress=False)
        CACHE.mkdir(exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, path)
        how = f"trained here in {time.perf_counter() - t0:.0f} s"
    model.eval()
    xt, yt = load_dataset("mnist", "test")
    acc = accuracy(model, xt[:1000], yt[:1000])
    log(f"model {name} {kw or ''}: natural, {epochs} epoch(s) on {n} images, Adam lr {lr}, seed 0 ({how}); "
        f"test accuracy {acc:.3f} (first 1000)")
    return model


def _random_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )
    return net.eval()


def _row(res, k: int, seconds: float, n: int) -> dict:
    return {
        "width": float((res.upper - res.lower).double().mean()),
        "eucl": statistics.median(res.euclidean.double().tolist()),
        "cos": statistics.median(res.cosine.double().tolist()),
        "topk": float(res.topk_intersection(k).double().mean()),
        "label": float(res.label_certified.double().mean()),
        "s": seconds / n,
    }


def _run(net, x, norm, eps, k, iters) -> tuple[dict, dict]:
    out = {}
    for method in ("crown", "alpha-crown"):
        t0 = time.perf_counter()
        kw = {"alpha_iters": iters} if method == "alpha-crown" else {}
        res = certified_bound(net, x, eps, norm, "saliency", method=method, **kw)
        out[method] = _row(res, k, time.perf_counter() - t0, x.shape[0])
        if method == "alpha-crown":
            for key in ("alpha_forward_error", "alpha_gradient_error", "crown_error", "crown_gradient_error"):
                if key in res.details:
                    out[method][key] = res.details[key][:160]
    return out["crown"], out["alpha-crown"]


class _Timer:
    """Wall time inside the wrapped methods, counted once across nested / recursive calls."""

    def __init__(self):
        self.depth, self.total, self.t0 = 0, 0.0, 0.0

    def wrap(self, cls, name: str):
        original = getattr(cls, name)

        def wrapped(*args, **kwargs):
            if self.depth == 0:
                self.t0 = time.perf_counter()
            self.depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.total += time.perf_counter() - self.t0

        setattr(cls, name, wrapped)
        return original


def _lirpa_fraction(net, x, norm, eps, method, iters) -> tuple[float, float, float]:
    """(total s, fraction inside auto_LiRPA, fraction in certattr's Bound ops called by it): wall time
    inside auto_LiRPA's entry points (BoundedModule construction, compute_bounds, init_slope) and inside
    certattr's own Bound classes' backward passes (``lirpa_compat``: BoundProduct, BoundConvAdjoint)."""
    from bounds.lirpa_compat import custom_ops, import_auto_lirpa

    al = import_auto_lirpa()
    kw = {"alpha_iters": iters} if method == "alpha-crown" else {}
    certified_bound(net, x, eps, norm, "saliency", method=method, **kw)  # warm caches (module build)
    inside, ours = _Timer(), _Timer()
    restore = [(al.BoundedModule, n, inside.wrap(al.BoundedModule, n))
               for n in ("__init__", "compute_bounds", "init_slope")]
    restore += [(cls, "bound_backward", ours.wrap(cls, "bound_backward")) for cls in custom_ops().values()]
    try:
        t0 = time.perf_counter()
        res = certified_bound(net, x, eps, norm, "saliency", method=method, **kw)
        total = time.perf_counter() - t0
    finally:
        for cls, name, original in restore:
            setattr(cls, name, original)
    failed = [k for k in ("alpha_forward_error", "alpha_gradient_error") if k in res.details]
    if failed:
        print(f"  note: {method} fell back to CROWN in the timed run: {failed}")
    return total, inside.total / total, ours.total / total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=ALPHA_ITERS)
    ap.add_argument("--n-random", type=int, default=16)
    ap.add_argument("--n-mlp", type=int, default=8)
    ap.add_argument("--n-cnn", type=int, default=4)
    ap.add_argument("--linf", type=float, nargs="+", default=[0.005, 0.02])
    ap.add_argument("--l2", type=float, nargs="+", default=[0.03, 0.3])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "alpha.txt"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines: list[str] = []

    def log(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    t_start = time.perf_counter()
    log(f"# bench_alpha: certified_bound crown vs alpha-crown (alpha_iters={args.iters}), saliency, domain [0,1]")
    log(f"# machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads; date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    xt, _ = load_dataset("mnist", "test")
    gen = torch.Generator().manual_seed(0)
    nets = [
        ("random mlp 16-32-32-10", _random_mlp(), torch.rand(args.n_random, 16, generator=gen), 3),
        ("mnist mlp 784-100-100-10", _trained("mlp", 20000, 2, 1e-3, log, hidden=(100, 100)), xt[: args.n_mlp], 10),
        ("mnist cnn-small", _trained("cnn-small", 20000, 2, 2e-3, log), xt[: args.n_cnn], 10),
    ]
    radii = [("inf", e) for e in args.linf] + [("2", e) for e in args.l2]
    log()
    head = (f"{'net':26s} {'norm':4s} {'eps':>6s} {'method':11s} {'width':>10s} {'med eucl':>10s} {'med cos':>8s} "
            f"{'top-k':>6s} {'label':>6s} {'s/sample':>9s}")
    log(head)
    summary = []
    for name, net, x, k in nets:
        for norm, eps in radii:
            crown, alpha = _run(net, x, norm, eps, k, args.iters)
            for method, r in (("crown", crown), ("alpha-crown", alpha)):
                log(f"{name:26s} {norm:4s} {eps:6.3f} {method:11s} {r['width']:10.4g} {r['eucl']:10.4g} "
                    f"{r['cos']:8.4f} {r['topk']:6.3f} {r['label']:6.3f} {r['s']:9.3f}")
                for key in ("alpha_forward_error", "alpha_gradient_error", "crown_error", "crown_gradient_error"):
                    if key in r:
                        log(f"    {key}: {r[key]}")
            ratio = (alpha["width"] / crown["width"], alpha["eucl"] / crown["eucl"], alpha["s"] / crown["s"])
            summary.append((name, norm, eps, ratio, alpha["cos"] - crown["cos"], alpha["topk"] - crown["topk"],
                            alpha["label"] - crown["label"]))
    log()
    log("ratios alpha-crown / crown (same process, same samples); differences alpha - crown")
    log(f"{'net':26s} {'norm':4s} {'eps':>6s} {'width':>7s} {'eucl':>7s} {'time':>7s} {'d cos':>8s} {'d top-k':>8s} "
        f"{'d label':>8s}")
    for name, norm, eps, (w, e, t), dc, dt, dl in summary:
        log(f"{name:26s} {norm:4s} {eps:6.3f} {w:7.4f} {e:7.4f} {t:7.2f} {dc:+8.4f} {dt:+8.3f} {dl:+8.3f}")
    log()
    name, net, x, _ = nets[2]
    log(f"fraction of certified_bound's time inside auto_LiRPA ({name}, {x.shape[0]} images, l_inf 0.02)")
    for method in ("crown", "alpha-crown"):
        total, inside, ours = _lirpa_fraction(net, x, "inf", 0.02, method, args.iters)
        log(f"  {method:11s}: {total:7.2f} s total, inside auto_LiRPA {100 * inside:5.1f}% "
            f"(of which certattr's Bound ops {100 * ours:5.1f}%)")
    log(f"\n# total wall time {time.perf_counter() - t_start:.0f} s")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
