"""Benchmark: CROWN bounds for the upstream-gradient nodes of the gradient graph (issue 10, point (b)).

    python benchmarks/bench_upstream.py [--images 8] [--eps 0.005 0.02] [--nets mlp cnn cnn-random]
        [--modes off full intersect] [--threads 1] [--out benchmarks/results/upstream.txt]

``certified_bound(method="crown")`` (saliency of the predicted logit, l_inf, domain [0, 1], the first
``--images`` MNIST test images) in the same process under the three settings of ``bounds.crown.FULL_CROWN``:

* off (False, the default before this benchmark): GradNet's intermediate bounds are the interval pass's boxes;
* full (True): auto_LiRPA recomputes every intermediate bound of GradNet by CROWN, *replacing* the
  interval boxes (the final box is still intersected with the interval box in ``certified_box``);
* intersect ("intersect", now the default): the upstream-gradient nodes that CROWN can narrow
  (``crown.upstream_worth_crown``) by CROWN, only at the positions whose ReLU factor is unstable, and
  intersected with the interval boxes the moment they are computed (``crown._intersecting``); later
  spec passes reuse them.

Nets: ``mlp`` (784-100-100-10) and ``cnn`` (cnn-small), naturally trained, the cached checkpoints of
benchmarks/bench_complete_mnist.py; ``cnn-random``: cnn-small at its seeded default init (seed 0).
Per (net, eps, mode): mean box width (upper - lower over images and coordinates), median certified
Euclidean, seconds per image (one warm-up call per net and mode first: module construction excluded),
the fraction of coordinates where the box is wider / narrower than off's by more than 1e-9 relative,
and the mean ratio (sum of widths) of the upstream boxes CROWN ∩ interval / interval (intersect only).
Ratios are against off, measured in the same process.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bounds import certified_bound, crown
from certattr.data import load_dataset
from certattr.models import build_model

MODES = {"off": False, "full": True, "intersect": "intersect"}


def _nets(names, log) -> dict:
    out = {}
    if {"mlp", "cnn"} & set(names):
        from bench_complete_mnist import _model

        for name in ("mlp", "cnn"):
            if name in names:
                out[name] = _model(name, 0, log)
    if "cnn-random" in names:
        torch.manual_seed(0)
        out["cnn-random"] = build_model("cnn-small").eval()
        log("model cnn-random: zoo cnn-small, default init, seed 0")
    return out


def _run(model, x, eps, mode):
    saved, crown.FULL_CROWN = crown.FULL_CROWN, MODES[mode]
    try:
        t0 = time.perf_counter()
        r = certified_bound(model, x, eps, norm="inf", attribution="saliency", method="crown", domain=(0.0, 1.0))
        return r, time.perf_counter() - t0
    finally:
        crown.FULL_CROWN = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.005, 0.02])
    ap.add_argument("--nets", nargs="+", default=["mlp", "cnn", "cnn-random"])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "upstream.txt"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    modes = ["off"] + [m for m in args.modes if m != "off"]
    lines: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    log(f"# bench_upstream  {datetime.datetime.now().isoformat(timespec='seconds')}")
    log(f"# machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, threads {args.threads}, load average at start {os.getloadavg()}")
    log(f"# {args.images} MNIST test images, saliency of the predicted logit, l_inf, domain [0, 1], method crown")
    log("# columns: mean box width, median certified Euclidean, seconds per image, each with its ratio to off "
        "(same process); % of coordinates wider / narrower than off; upstream: sum of widths of the CROWN-"
        "bounded upstream nodes, CROWN ∩ interval / interval")
    x_te, _ = load_dataset("mnist", "test")
    x = x_te[: args.images]
    for net, model in _nets(args.nets, log).items():
        for mode in modes:  # warm-up: builds and caches the auto_LiRPA modules
            _run(model, x[:1], args.eps[0], mode)
        for eps in args.eps:
            res = {}
            for mode in modes:
                res[mode] = _run(model, x, eps, mode)
            base, t_base = res["off"]
            w_base = base.upper - base.lower
            log(f"\n{net}  eps {eps}")
            log(f"  {'mode':10s} {'width':>10s} {'x off':>7s} {'eucl med':>10s} {'x off':>7s} {'s/img':>7s} "
                f"{'x off':>6s} {'wider%':>7s} {'narrower%':>9s} {'upstream':>9s}  gradient")
            for mode in modes:
                r, t = res[mode]
                w = r.upper - r.lower
                tol = 1e-9 * w_base.abs().clamp_min(1e-12)
                wider = float((w > w_base + tol).double().mean()) * 100
                narrower = float((w < w_base - tol).double().mean()) * 100
                e, e0 = statistics.median(r.euclidean.tolist()), statistics.median(base.euclidean.tolist())
                up = r.details.get("upstream_width_ratio")
                log(f"  {mode:10s} {float(w.mean()):10.5f} {float(w.mean() / w_base.mean()):7.4f} {e:10.5f} "
                    f"{e / e0:7.4f} {t / len(x):7.3f} {t / t_base:6.2f} {wider:7.3f} {narrower:9.3f} "
                    f"{'-' if up is None else f'{up:9.4f}':>9s}  {r.details.get('gradient')}"
                    + (f" ERROR {r.details['crown_gradient_error'][:120]}" if "crown_gradient_error" in r.details
                       else ""))
    log(f"\n# load average at end {os.getloadavg()}")
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
