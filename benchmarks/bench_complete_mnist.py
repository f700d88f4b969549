"""Benchmark: phase branch-and-bound (``bounds.complete_bound``) on naturally trained MNIST nets (issue 10).

    python benchmarks/bench_complete_mnist.py [--nets mlp,cnn] [--norms inf,2] [--budgets 1,10,60]
        [--images 8] [--eps-inf 0.002,0.005] [--eps-2 0.03] [--cos-budget 2] [--tol 0.01] [--seed 0]
        [--rows benchmarks/results/complete_mnist_rows.jsonl] [--out benchmarks/results/complete_mnist.txt]
        [--fresh]

Models (trained here, seeded, cached as safetensors under ``certattr.data.cache_dir()/bench``):
``mlp`` = zoo mlp 784-100-100-10 (natural, 2 epochs, Adam lr 1e-3, batch 128), ``cnn`` = zoo
cnn-small (conv4x4-16 s2, conv4x4-32 s2, fc 100; natural, 1 epoch).  Samples: the first ``--images``
MNIST test images, saliency of the predicted logit, domain [0, 1], l_inf at ``--eps-inf`` and l2 at
``--eps-2``.  Per (net, norm, eps) the benchmark reports

* best attack: the largest Euclidean saliency deviation actually reached at a point of the ball: the
  max of ``certattr.attacks.deviation_attack`` (real net, label-preserving, 100 steps x 5 restarts) and
  complete_bound's ``lower`` at every budget (a witness point recomputed on the real net);
* before: ``certified_bound(method="crown")``; after: complete_bound ``upper`` at each budget (seconds
  per sample); median and worst ratio upper / best attack; how many gaps closed; the stop reasons;
* subd/s: subdomains bounded per second of branch-and-bound (attack excluded; median); lp%: the
  fraction of that time spent in leaf programs (HiGHS LP / Clarabel SOCP + Farkas check; the phase
  mode calls no auto_LiRPA: its CROWN is ``complete_mlp``'s own); unst: unstable ReLUs at the root
  (of all units);
* cosine: samples with a certified cosine >= 0.9, before (certified_bound.cosine) and after (max of
  before and complete_bound(objective="cosine").lower, ``--cos-budget`` seconds per sample).

Resumable: every finished measurement is appended at once as a JSON line to ``--rows`` (key: net,
norm, eps, what, image); a rerun skips the keys it finds (``--fresh`` starts over) and rewrites the
summary ``--out`` from all rows.  A larger budget is not rerun on an image whose smaller budget
stopped on "gap closed" or "exhausted" (the search is deterministic up to the deadline: more time
changes nothing); the row is copied and marked ``carried``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
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
from bounds.complete import complete_bound
from certattr.attacks.deviation import deviation_attack
from certattr.data import cache_dir, load_dataset
from certattr.models import build_model
from certattr.train.loop import fit

NETS = {"mlp": ("mlp", {"hidden": (100, 100)}, 2), "cnn": ("cnn-small", {}, 1)}


def _model(net: str, seed: int, log) -> torch.nn.Module:
    from safetensors.torch import load_file, save_file

    zoo, kw, epochs = NETS[net]
    path = pathlib.Path(cache_dir()) / "bench" / f"complete_mnist-{zoo}-natural-{epochs}ep-s{seed}.safetensors"
    torch.manual_seed(seed)
    model = build_model(zoo, **kw)
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        how = f"cached {path}"
    else:
        x_tr, y_tr = load_dataset("mnist", "train")
        t0 = time.perf_counter()
        fit(model, (x_tr, y_tr), method="natural", dataset="mnist", epochs=epochs, seed=seed, progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        how = f"trained here {time.perf_counter() - t0:.0f} s, cached at {path}"
    model.eval()
    x_te, y_te = load_dataset("mnist", "test")
    with torch.no_grad():
        acc = float((model(x_te).argmax(1) == y_te).float().mean())
    log(f"model {net}: zoo {zoo} {kw or ''}, natural, {epochs} epoch(s), Adam lr 1e-3, batch 128, seed {seed}; "
        f"test accuracy {acc:.4f} ({how})")
    return model


def _med(v):
    v = [a for a in v if not math.isnan(a)]
    return statistics.median(v) if v else float("nan")


class Rows:
    """Append-only JSON lines keyed by (net, norm, eps, what, image)."""

    def __init__(self, path: pathlib.Path, fresh: bool):
        self.path = path
        self.rows: dict = {}
        if fresh and path.exists():
            path.unlink()
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    self.rows[self.key(r)] = r

    @staticmethod
    def key(r: dict) -> tuple:
        return (r["net"], r["norm"], float(r["eps"]), r["what"], int(r["image"]))

    def get(self, net, norm, eps, what, image):
        return self.rows.get((net, norm, float(eps), what, int(image)))

    def add(self, r: dict) -> None:
        r = dict(r, ts=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        self.rows[self.key(r)] = r
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(r) + "\n")


def _bab_row(r, base: dict) -> dict:
    d = r.details["per_sample"][0] if r.details.get("per_sample") else {}
    return dict(
        base,
        lower=float(r.lower[0]),
        upper=float(r.upper[0]),
        stop=r.stop_reason[0],
        subdomains=int(r.subdomains[0]),
        lp_calls=int(r.lp_calls[0]),
        time=float(d.get("time", r.time)),
        attack_time=float(d.get("attack_time", 0.0)),
        lp_time=float(d.get("lp_time", 0.0)),
        empty_leaves=int(d.get("empty_leaves", 0)),
        open=int(d.get("open", 0)),
        unstable=int(d.get("unstable_at_root", 0)),
        units=int(d.get("units", 0)),
        label=bool(r.label_certified[0]),
    )


def run_config(model, net, norm, eps, x, args, rows: Rows, log) -> None:
    base = {"net": net, "norm": norm, "eps": eps}
    n = x.shape[0]
    if rows.get(net, norm, eps, "attack", n - 1) is None:
        t0 = time.perf_counter()
        att = deviation_attack(model, x, eps, norm=norm, objective="euclidean", seed=args.seed)
        dt = (time.perf_counter() - t0) / n
        for i in range(n):
            kept = bool(att.label_kept[i])
            rows.add(dict(base, what="attack", image=i, value=float(att.euclidean[i]) if kept else 0.0, time=dt))
    if rows.get(net, norm, eps, "crown", n - 1) is None:
        t0 = time.perf_counter()
        crown = certified_bound(model, x, eps, norm=norm, method="crown")
        dt = (time.perf_counter() - t0) / n
        for i in range(n):
            rows.add(dict(base, what="crown", image=i, upper=float(crown.euclidean[i]),
                          cosine=float(crown.cosine[i]), time=dt))
    prev = None
    for b in args.budgets:
        what = f"bab{b:g}"
        for i in range(n):
            if rows.get(net, norm, eps, what, i) is not None:
                continue
            old = rows.get(net, norm, eps, prev, i) if prev else None
            if old is not None and old["stop"] in ("gap closed", "exhausted"):
                rows.add(dict(old, what=what, carried=True))
                continue
            r = complete_bound(model, x[i : i + 1], eps, norm=norm, budget_s=b, tol=args.tol, seed=args.seed,
                               branching="phases", max_memory_mb=args.mem)
            row = _bab_row(r, dict(base, what=what, image=i, budget=b))
            rows.add(row)
            log(f"  {net} l{norm} eps {eps:g} {what} img {i}: lower {row['lower']:.4g} upper {row['upper']:.4g} "
                f"stop {row['stop']} subdomains {row['subdomains']} unstable {row['unstable']}/{row['units']} "
                f"{row['time']:.1f} s")
        prev = what
    for i in range(n):
        if rows.get(net, norm, eps, "cosine", i) is None:
            r = complete_bound(model, x[i : i + 1], eps, norm=norm, objective="cosine", budget_s=args.cos_budget,
                               tol=args.tol, seed=args.seed, branching="phases", max_memory_mb=args.mem)
            rows.add(_bab_row(r, dict(base, what="cosine", image=i, budget=args.cos_budget)))


def summarise(net, norm, eps, n, args, rows: Rows) -> list[str]:
    def get(what):
        return [rows.get(net, norm, eps, what, i) for i in range(n)]

    att, crown = get("attack"), get("crown")
    if any(r is None for r in att + crown):
        return [f"{net:>4} l{norm:<3} {eps:>6g}  (incomplete)"]
    best = [a["value"] for a in att]
    babs = [(f"B&B {b:g}s", get(f"bab{b:g}")) for b in args.budgets]
    for _, rs in babs:
        for i, r in enumerate(rs):
            if r is not None:
                best[i] = max(best[i], r["lower"])
    out = []
    ratio = [c["upper"] / best[i] if best[i] > 0 else float("inf") for i, c in enumerate(crown)]
    out.append(f"{net:>4} l{norm:<3} {eps:>6g} {'CROWN':>10} {_med([c['upper'] for c in crown]):>8.4g} "
               f"{_med(best):>8.4g} {_med(ratio):>7.2f} {max(ratio):>7.2f} {'-':>6} {'-':>7} {'-':>5} "
               f"{'-':>10} {_med([c['time'] for c in crown]):>6.2f}  -")
    for name, rs in babs:
        done = [(i, r) for i, r in enumerate(rs) if r is not None]
        if not done:
            continue
        rat = [r["upper"] / best[i] if best[i] > 0 else float("inf") for i, r in done]
        run = [r for _, r in done if not r.get("carried")]
        bab_t = [max(r["time"] - r["attack_time"], 1e-9) for r in run]
        rates = [r["subdomains"] / t for r, t in zip(run, bab_t)]
        lp = [r["lp_time"] / t for r, t in zip(run, bab_t)]
        stops: dict = {}
        for _, r in done:
            stops[r["stop"]] = stops.get(r["stop"], 0) + 1
        closed = stops.get("gap closed", 0)
        unst = [r["unstable"] for _, r in done]
        part = "" if len(done) == n else f" ({len(done)}/{n} images)"
        out.append(
            f"{net:>4} l{norm:<3} {eps:>6g} {name:>10} {_med([r['upper'] for _, r in done]):>8.4g} "
            f"{_med([best[i] for i, _ in done]):>8.4g} {_med(rat):>7.2f} {max(rat):>7.2f} {closed:>3}/{len(done):<2} "
            f"{_med(rates):>7.1f} {100 * _med(lp):>4.0f}% {f'{_med(unst):.0f}/{max(unst)}':>10} "
            f"{_med([r['time'] for _, r in done]):>6.1f}  "
            + ", ".join(f"{k} {v}" for k, v in sorted(stops.items())) + part
        )
    return out


def cosine_summary(net, norm, eps, n, rows: Rows) -> str:
    crown = [rows.get(net, norm, eps, "crown", i) for i in range(n)]
    cos = [rows.get(net, norm, eps, "cosine", i) for i in range(n)]
    if any(r is None for r in crown + cos):
        return f"{net:>4} l{norm:<3} {eps:>6g}  (incomplete)"
    before = [c["cosine"] for c in crown]
    after = [max(c["lower"], b) for c, b in zip(cos, before)]
    closed = sum(c["stop"] == "gap closed" for c in cos)
    return (f"{net:>4} l{norm:<3} {eps:>6g} {sum(v >= 0.9 for v in before):>3}/{n:<3} {sum(v >= 0.9 for v in after):>3}/{n:<3} "
            f"{_med(before):>10.4f} {_med([c['lower'] for c in cos]):>10.4f} {_med([c['upper'] for c in cos]):>10.4f} "
            f"{closed:>3}/{n:<3}")


def _csv(kind):
    return lambda s: [kind(v) for v in s.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", type=_csv(str), default=["mlp", "cnn"])
    ap.add_argument("--norms", type=_csv(str), default=["inf", "2"])
    ap.add_argument("--budgets", type=_csv(float), default=[1.0, 10.0, 60.0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--eps-inf", type=_csv(float), default=[0.002, 0.005])
    ap.add_argument("--eps-2", type=_csv(float), default=[0.03])
    ap.add_argument("--cos-budget", type=float, default=2.0)
    ap.add_argument("--tol", type=float, default=0.01)
    ap.add_argument("--mem", type=float, default=512.0, help="complete_bound max_memory_mb")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default=str(ROOT / "benchmarks" / "results" / "complete_mnist_rows.jsonl"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "complete_mnist.txt"))
    ap.add_argument("--fresh", action="store_true", help="discard the rows file and start over")
    ap.add_argument("--report-only", action="store_true", help="only rewrite --out from the rows file")
    args = ap.parse_args(argv)
    for net in args.nets:
        if net not in NETS:
            ap.error(f"unknown net {net!r}: choose from {', '.join(NETS)}")
    for norm in args.norms:
        if norm not in ("inf", "2"):
            ap.error(f"unknown norm {norm!r}: inf or 2")

    head: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)
        head.append(s)

    t_all = time.perf_counter()
    log("bench_complete_mnist: python benchmarks/bench_complete_mnist.py "
        + " ".join(argv if argv is not None else sys.argv[1:]))
    log(f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; machine "
        f"{platform.machine()} {os.cpu_count()} cores (shared), torch {torch.__version__}; complete_bound runs "
        f"single-threaded; load average {os.getloadavg()[0]:.1f} at start")
    rows = Rows(pathlib.Path(args.rows), args.fresh)
    x_te, _ = load_dataset("mnist", "test")
    x = x_te[: args.images].clone()
    configs = [(norm, eps) for norm in args.norms for eps in (args.eps_inf if norm == "inf" else args.eps_2)]
    log(f"samples: first {args.images} MNIST test images, saliency of the predicted logit, domain [0, 1]; "
        f"tol {args.tol:g}; budgets {args.budgets} s per sample; rows in {args.rows}")
    for net in [] if args.report_only else args.nets:
        model = _model(net, args.seed, log)
        for norm, eps in configs:
            run_config(model, net, norm, eps, x, args, rows, log)
            _write(args, rows, head, configs, t_all)
    _write(args, rows, head, configs, t_all)
    return 0


def _write(args, rows, head, configs, t_all) -> None:
    n = args.images
    hdr = (f"{'net':>4} {'norm':<4} {'eps':>6} {'bound':>10} {'med_up':>8} {'med_att':>8} {'up/att':>7} {'max':>7} "
           f"{'closed':>6} {'subd/s':>7} {'lp%':>5} {'unst/max':>10} {'med_s':>6}  stop reasons")
    table = [r for net in args.nets for norm, eps in configs for r in summarise(net, norm, eps, n, args, rows)]
    cos = [cosine_summary(net, norm, eps, n, rows) for net in args.nets for norm, eps in configs]
    stamps = sorted(r["ts"] for r in rows.rows.values() if "ts" in r)
    undated = sum("ts" not in r for r in rows.rows.values())
    head = head + [f"rows: {len(rows.rows)} in {args.rows}"
                   + (f", measured {stamps[0]} .. {stamps[-1]}" if stamps else "")
                   + (f", {undated} without a time stamp (measured 2026-12-02 02:03-02:45 UTC by the runs of "
                      "this script's first version of the rows format)" if undated else "")]
    lines = head + ["", "Euclidean saliency deviation: upper bound vs best reached deviation (medians over samples)",
                    hdr] + table
    lines += ["", f"certified cosine >= 0.9 (complete_bound objective='cosine', {args.cos_budget:g} s per sample):",
              (f"{'net':>4} {'norm':<4} {'eps':>6} {'before':>7} {'after':>7} {'med_cos_bef':>10} "
               f"{'med_cos_bab':>10} {'med_reach':>10} {'closed':>7}")] + cos
    lines += ["", "per sample (B&B rows):"]
    for net in args.nets:
        for norm, eps in configs:
            for b in args.budgets:
                for i in range(n):
                    r = rows.get(net, norm, eps, f"bab{b:g}", i)
                    c = rows.get(net, norm, eps, "crown", i)
                    if r is None:
                        continue
                    lines.append(
                        f"  {net} l{norm} eps {eps:g} B&B {b:g}s img {i}: lower {r['lower']:.4g} upper {r['upper']:.4g} "
                        f"crown {c['upper'] if c else float('nan'):.4g} stop {r['stop']} subdomains {r['subdomains']} "
                        f"open {r['open']} lp {r['lp_calls']} (empty {r['empty_leaves']}) unstable "
                        f"{r['unstable']}/{r['units']}{' carried' if r.get('carried') else ''}")
    lines += ["", LEGEND, f"wall time of this invocation {time.perf_counter() - t_all:.0f} s"]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


LEGEND = """columns: med_up: median upper bound; med_att: median best reached deviation (max of deviation_attack and
  every complete_bound lower); up/att, max: median and worst ratio upper / best attack; closed: gap <= tol
  relative; subd/s: subdomains per second of B&B (attack excluded, median; rows carried from a smaller budget
  excluded); lp%: share of that time in leaf programs (LP / SOCP + Farkas verification); unst/max: unstable
  ReLUs at the root, median / max (units: mlp 200, cnn 4804); med_s: seconds per sample; stop reasons:
  "gap closed", "exhausted" (nothing left to branch: the remaining gap is the float widening or a leaf whose
  program was "unsure"), "budget" (out of time: the upper bound is the largest open subdomain's bound),
  "memory" (open list at max_memory_mb).
  Neither complete_bound nor certified_bound uses the label constraint (both bound the whole ball).
  cosine: before = certified_bound(crown).cosine, after = max(before, complete_bound cosine lower);
  med_cos_bab: median complete_bound cosine lower alone; med_reach: median cosine reached at its witness."""


if __name__ == "__main__":
    raise SystemExit(main())
