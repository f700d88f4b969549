"""Benchmark: complete_bound(subdomain_bound="crown") vs "alpha-beta" (``bounds.complete_beta``).

Both modes run in the same process.

    python benchmarks/bench_complete_beta.py [--per-config 3] [--budget 10] [--hard] [--mnist]
        [--out benchmarks/results/complete_beta.txt]

Random ReLU MLPs: the configs of ``bench_complete.py`` (n -> h -> h -> 3, l_inf, seeded), each net bounded
by both modes back to back (the order alternates per net, so load drifts hit both), budget ``--budget`` s,
tol 0.01.  Per mode: samples closed, median / max time, subdomains bounded (sum), subdomains per second
(median, attack excluded), leaf programs (sum); and the per-sample time ratio alpha-beta / crown (median,
max).  ``--hard``: bench_complete's harder nets, gap at the budget.  ``--mnist``: the MLP rows of
``bench_complete_mnist.py`` (784-100-100-10, l_inf and l2, budgets 1 and 10 s, 8 images) once per mode,
its rows and summaries in temporary files (``complete_bound`` patched with the mode), summaries appended.
``--cnn-images N``: a spot check on the MNIST cnn-small (first N images, l_inf 0.002, l2 0.03).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_complete import CONFIGS, HARD, _hard_net, _net

from bounds.complete import complete_bound

MODES = ("crown", "alpha-beta")


def _run(net, x, eps, budget, mode, seed):
    t0 = time.perf_counter()
    r = complete_bound(net, x, eps, budget_s=budget, tol=0.01, seed=seed, subdomain_bound=mode)
    dt = time.perf_counter() - t0
    det = r.details["per_sample"][0]
    bab = max(det.get("time", dt) - det.get("attack_time", 0.0), 1e-9)
    lo, up = float(r.lower[0]), float(r.upper[0])
    return {
        "time": dt,
        "closed": r.stop_reason[0] == "gap closed",
        "subs": int(r.subdomains[0]),
        "rate": int(r.subdomains[0]) / bab,
        "lp": int(r.lp_calls[0]),
        "lower": lo,
        "upper": up,
        "gap": (up - lo) / up if up > 0 else 0.0,
        "stop": r.stop_reason[0],
    }


def random_mlps(args, log) -> None:
    log(
        f"random ReLU MLPs (bench_complete configs), {args.per_config} nets per config, "
        f"budget {args.budget:g} s"
    )
    log(
        f"{'n':>3} {'h':>3} {'eps':>6} {'mode':>10} {'closed':>6} {'med_s':>6} {'max_s':>6} {'subs':>7} "
        f"{'subd/s':>7} {'lp':>5} {'t_ab/t_crown med':>16} {'max':>6}"
    )
    tot = {m: {"closed": 0, "time": [], "subs": 0, "lp": 0, "rate": []} for m in MODES}
    all_ratios = []
    for ci, (n, h, eps) in enumerate(CONFIGS):
        res = {m: [] for m in MODES}
        for j in range(args.per_config):
            net, x = _net(n, h, 1000 * ci + j)
            order = MODES if j % 2 == 0 else MODES[::-1]
            for m in order:
                res[m].append(_run(net, x, eps, args.budget, m, j))
        ratios = [b["time"] / a["time"] for a, b in zip(res["crown"], res["alpha-beta"])]
        all_ratios += ratios
        for m in MODES:
            rs = res[m]
            t = tot[m]
            t["closed"] += sum(r["closed"] for r in rs)
            t["time"] += [r["time"] for r in rs]
            t["subs"] += sum(r["subs"] for r in rs)
            t["lp"] += sum(r["lp"] for r in rs)
            t["rate"] += [r["rate"] for r in rs]
            extra = f" {statistics.median(ratios):>16.2f} {max(ratios):>6.2f}" if m == "alpha-beta" else ""
            log(
                f"{n:>3} {h:>3} {eps:>6.3f} {m:>10} {sum(r['closed'] for r in rs):>3}/{len(rs):<2} "
                f"{statistics.median(r['time'] for r in rs):>6.2f} {max(r['time'] for r in rs):>6.2f} "
                f"{sum(r['subs'] for r in rs):>7} {statistics.median(r['rate'] for r in rs):>7.0f} "
                f"{sum(r['lp'] for r in rs):>5}{extra}"
            )
    for m in MODES:
        t = tot[m]
        log(
            f"total {m:>10}: closed {t['closed']}/{len(t['time'])}, time sum {sum(t['time']):.1f} s "
            f"(median {statistics.median(t['time']):.2f}, max {max(t['time']):.2f}), subdomains {t['subs']}, "
            f"subd/s median {statistics.median(t['rate']):.0f}, leaf programs {t['lp']}"
        )
    log(
        f"time ratio alpha-beta / crown per sample: median {statistics.median(all_ratios):.2f}, "
        f"min {min(all_ratios):.2f}, max {max(all_ratios):.2f}; total-time ratio "
        f"{sum(tot['alpha-beta']['time']) / sum(tot['crown']['time']):.2f}"
    )


def hard(args, log) -> None:
    log(f"harder nets (bench_complete --hard), budget {args.budget:g} s: relative gap, subdomains, subd/s")
    for n, hidden, eps in HARD:
        net, x = _hard_net(n, hidden)
        row = []
        for m in MODES:
            r = _run(net, x, eps, args.budget, m, 0)
            row.append(
                f"{m} lower {r['lower']:.4g} upper {r['upper']:.4g} gap {r['gap']:.1%} {r['stop']} "
                f"({r['subs']} subd, {r['rate']:.0f}/s, {r['time']:.1f} s)"
            )
        log(f"  {n}-{'-'.join(map(str, hidden))} eps {eps:g}: " + " | ".join(row))


def mnist(args, log) -> None:
    import bench_complete_mnist as bm

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_beta_"))
    for m in MODES:
        bm.complete_bound = functools.partial(complete_bound, subdomain_bound=m)
        out = tmp / f"mnist_{m}.txt"
        bm.main(
            [
                "--nets",
                "mlp",
                "--norms",
                "inf,2",
                "--budgets",
                "1,10",
                "--images",
                str(args.images),
                "--rows",
                str(tmp / f"rows_{m}.jsonl"),
                "--out",
                str(out),
                "--fresh",
            ]
        )
        log(f"bench_complete_mnist.py MLP rows, subdomain_bound={m!r}:")
        for line in out.read_text().splitlines():
            log("  " + line)


def cnn(args, log) -> None:
    """Spot check on bench_complete_mnist's cnn-small (4804 ReLUs): first ``--cnn-images`` test images,
    l_inf 0.002 and l2 0.03, ``--budget`` s, both modes back to back."""
    import bench_complete_mnist as bm

    from certattr.data import load_dataset

    model = bm._model("cnn", 0, lambda s: None)
    x_te, _ = load_dataset("mnist", "test")
    log(f"MNIST cnn-small (phase mode), budget {args.budget:g} s: upper, lower, subdomains, stop, wall time")
    for i in range(args.cnn_images):
        for norm, eps in (("inf", 0.002), ("2", 0.03)):
            row = []
            for m in MODES:
                t0 = time.perf_counter()
                r = complete_bound(
                    model,
                    x_te[i : i + 1],
                    eps,
                    norm=norm,
                    budget_s=args.budget,
                    branching="phases",
                    subdomain_bound=m,
                )
                row.append(
                    f"{m} upper {float(r.upper[0]):.4g} lower {float(r.lower[0]):.4g} "
                    f"{int(r.subdomains[0])} subd {r.stop_reason[0]} {time.perf_counter() - t0:.1f} s"
                )
            log(f"  img {i} l{norm} eps {eps:g}: " + " | ".join(row))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-config", type=int, default=3)
    ap.add_argument("--budget", type=float, default=10.0)
    ap.add_argument("--hard", action="store_true")
    ap.add_argument("--mnist", action="store_true")
    ap.add_argument("--skip-random", action="store_true")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--cnn-images", type=int, default=0, help="cnn-small spot check on this many images")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "complete_beta.txt"))
    args = ap.parse_args(argv)
    lines: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    log(f"bench_complete_beta: python benchmarks/bench_complete_beta.py {' '.join(argv or sys.argv[1:])}")
    log(
        f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; machine "
        f"{platform.machine()} {os.cpu_count()} cores (shared), torch {torch.__version__}; complete_bound "
        f"single-threaded; load average {load:.1f} at start"
    )
    if not args.skip_random:
        random_mlps(args, log)
    if args.hard:
        hard(args, log)
    if args.mnist:
        mnist(args, log)
    if args.cnn_images:
        cnn(args, log)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
