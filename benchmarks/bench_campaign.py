"""Benchmark of certattr campaigns: throughput, local scaling, store overhead, 10M-attack projection.

1. Throughput: attacks per second of a campaign (IFIA top-k and deviation attacks, saliency, MNIST
   cnn-small, l_inf) with 1 local worker (in the driver; 1 thread, and the default cores threads) and
   with 2 worker processes (1 thread each); scaling ratio = throughput(2 workers) / throughput(1).
   On a shared machine torch's intra-op threads (OpenMP) can stall badly when another process takes a
   core: 1-thread workers are the robust setting there.
2. Store overhead: the 1-worker campaign's wall and CPU time against the same units computed by the
   same function in a plain loop without store or runner (target < 5 %; best of 2, alternated), and
   the time spent inside the store's one-transaction-per-unit writes.
3. Projection of a 10-million-attack campaign on a Ray cluster: measured core-seconds per attack (at
   the measured step count and scaled linearly to 100 steps, the papers' setting), projected
   core-hours and machine-hours on 16-core nodes, the driver's write capacity (rows per second, so how
   many workers one driver can feed), and the store size per million rows measured by inserting
   ``--rows`` synthetic rows in units of 50 rows.

    python benchmarks/bench_campaign.py            # default run, about 2 minutes on 2 CPU cores
    python benchmarks/bench_campaign.py --quick    # smoke run

The model is a randomly initialised cnn-small (attack cost does not depend on training).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from certattr import checkpoint
from certattr.campaign import Store, load_spec, run_campaign
from certattr.campaign.runner import cpu_cores, load_samples, prepare_checkpoints, threads_per_worker
from certattr.campaign.units import execute_unit, expand, total_rows
from certattr.models import build_model

SPEC = """
name = "bench"
seed = 0
batch_size = {batch}
checkpoints = ["net"]

[data]
dataset = "mnist"
n = {n}

[grid]
attributions = ["saliency"]
norms = ["inf"]
eps = [0.01, 0.03]

[[attacks]]
name = "ifia"
params = {{ kind = "topk", k = 100, steps = {steps}, step_size_rel = 0.25 }}

[[attacks]]
name = "deviation"
params = {{ objective = "euclidean", steps = {steps} }}
"""


def make_spec(folder: Path, n: int, batch: int, steps: int) -> Path:
    torch.manual_seed(0)
    checkpoint.save(build_model("cnn-small"), folder / "net", dataset="mnist")
    path = folder / "bench.toml"
    path.write_text(SPEC.format(n=n, batch=batch, steps=steps))
    return path


def direct_loop(spec_path: Path, max_units: int | None = None, threads: int = 1) -> tuple[float, float]:
    """The campaign's units computed by execute_unit in a loop, no store, no runner: (wall s, CPU s)."""
    spec = load_spec(spec_path)
    x_all, y_all = load_samples(spec)
    ckpts = prepare_checkpoints(spec, None, progress=False)
    units, _ = expand(spec, ckpts)
    model = checkpoint.load(next(iter(ckpts.values())))
    torch.set_num_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    for u in units[:max_units]:
        idx = torch.tensor([s - spec.start for s in u.samples])
        execute_unit(u, model, x_all[idx], y_all[idx])
    return time.perf_counter() - t0, time.process_time() - c0


def timed_campaign(spec_path: Path, store: Path, workers: int, threads: int | None = None
                   ) -> tuple[float, float, float]:
    """(wall seconds of run_campaign, its CPU seconds in this process, seconds inside Store.write_unit)."""
    spent = [0.0]
    original = Store.write_unit

    def timed(self, rows):
        t = time.perf_counter()
        try:
            return original(self, rows)
        finally:
            spent[0] += time.perf_counter() - t

    Store.write_unit = timed
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        summary = run_campaign(load_spec(spec_path), store, workers=workers, threads=threads, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        Store.write_unit = original
    assert summary.complete, summary
    return wall, cpu, spent[0]


def _noop(_index: int) -> int:
    import certattr.campaign.units  # noqa: F401  (what a worker imports before its first unit)

    return os.getpid()


def pool_startup(workers: int) -> float:
    """Seconds to start ``workers`` spawn processes that import certattr (the pool's fixed cost)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(_noop, range(workers)))
    return time.perf_counter() - t0


def store_size(folder: Path, rows: int, unit: int = 50) -> dict:
    """Insert ``rows`` synthetic rows (realistic values) and measure the file size and write rate."""
    rng = np.random.default_rng(0)
    path = folder / "size.sqlite"
    t0 = time.perf_counter()
    with Store(path) as st:
        for start in range(0, rows, unit):
            block = []
            for i in range(start, min(start + unit, rows)):
                method = ("ifia-topk", "deviation-euclidean", "pgd", "certified")[i % 4]
                block.append({
                    "ckpt": f"{i // 100_000:064x}", "attribution": "saliency", "norm": "inf", "eps": float((i // 4000) % 5) * 0.01,
                    "method": method, "restart": (i // 20000) % 5, "sample": (i // 4) % 1000,
                    "family": "bound" if method == "certified" else "attack", "kind": method.split("-")[0],
                    "euclidean": float(rng.random()), "cosine": float(rng.random()),
                    "topk_intersection": float(rng.random()), "kendall": float(rng.random()),
                    "spearman": float(rng.random()), "center_of_mass_shift": float(rng.random() * 3),
                    "label_kept": True, "correct": True, "time": float(rng.random()),
                    "unit_info": {"network": "softplus-surrogate(beta=10)"},
                })
            st.write_unit(block)  # keys are unique: (ckpt, eps, restart, sample, method) from i
        count = st.count()
        st.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    seconds = time.perf_counter() - t0
    size = path.stat().st_size
    return {"rows": count, "bytes": size, "mb_per_million": size / count * 1e6 / 2**20,
            "rows_per_s": count / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--n", type=int, default=128, help="images (default 128)")
    ap.add_argument("--steps", type=int, default=20, help="attack steps (default 20)")
    ap.add_argument("--batch", type=int, default=16, help="samples per unit (default 16)")
    ap.add_argument("--rows", type=int, default=200_000, help="synthetic rows for the store size (default 200k)")
    ap.add_argument("--target", type=float, default=1e7, help="attacks in the projected campaign (default 1e7)")
    ap.add_argument("--node-cores", type=int, default=16, help="cores per cluster machine (default 16)")
    ap.add_argument("--intra-op", action="store_true",
                    help="also time 1 worker with cores // 1 torch threads (slow and erratic on a busy machine)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.steps, args.batch, args.rows = 16, 5, 8, 20_000
    cores = cpu_cores()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec_path = make_spec(folder, args.n, args.batch, args.steps)
        spec = load_spec(spec_path)
        attacks = total_rows(spec)
        load_samples(spec)  # warm the dataset cache
        print(f"campaign: {attacks} attack runs ({args.n} images x 2 eps x IFIA + deviation, {args.steps} steps, "
              f"{args.batch} samples/unit), {cores} cores")

        direct_loop(spec_path, max_units=2)  # warm-up: lazy imports, first-call costs
        # store overhead: plain loop vs campaign, both 1 thread in this process, alternated, best of 2
        direct, direct_cpu, wall1, cpu1, write1 = [], [], [], [], []
        for rep in range(2):
            w, c = direct_loop(spec_path)
            direct.append(w)
            direct_cpu.append(c)
            w, c, wr = timed_campaign(spec_path, folder / f"w1-{rep}.sqlite", 1, threads=1)
            wall1.append(w)
            cpu1.append(c)
            write1.append(wr)
        setup, _c, _w = timed_campaign(spec_path, folder / "w1-0.sqlite", 1, threads=1)  # all done: fixed cost
        wall1t = None
        if args.intra_op:  # 1 worker with cores // 1 intra-op threads
            wall1t, _c, _w = timed_campaign(spec_path, folder / "w1-threads.sqlite", 1)
        wall2, _cpu2, _write2 = timed_campaign(spec_path, folder / "w2.sqlite", 2)
        startup = pool_startup(2)
        best1 = min(wall1)
        thr1, thr2 = attacks / best1, attacks / wall2
        thr2_steady = attacks / max(wall2 - startup, 1e-9)
        print("\n1. throughput")
        print(f"   1 worker  (in the driver, 1 thread):      {best1:7.1f} s  {thr1:7.2f} attacks/s")
        if wall1t is not None:
            print(f"   1 worker  (in the driver, {threads_per_worker(1)} threads):     {wall1t:7.1f} s  "
                  f"{attacks / wall1t:7.2f} attacks/s")
        print(f"   2 workers (processes, {threads_per_worker(2)} thread each): {wall2:7.1f} s  {thr2:7.2f} attacks/s "
              f"(of which {startup:.1f} s worker start-up; {thr2_steady:.2f} attacks/s without it)")
        print(f"   scaling ratio 2 workers vs 1: {thr2 / thr1:.2f}x ({thr2_steady / thr1:.2f}x without start-up)")
        with Store(folder / "w2.sqlite", readonly=True) as st:
            busy = float(st.conn.execute("SELECT SUM(time) FROM results").fetchone()[0])
        print(f"   effective parallelism of the 2 workers: {busy / max(wall2 - startup, 1e-9):.2f} units busy at "
              f"once (sum of unit times {busy:.1f} s / {wall2 - startup:.1f} s); load average now "
              f"{os.getloadavg()[0]:.1f} on {cores} cores")

        d, dc, c1 = min(direct), min(direct_cpu), min(cpu1)
        print("\n2. store overhead (1 worker, 1 thread, best of 2)")
        print(f"   same units, plain loop, no store: {d:7.2f} s wall, {dc:7.2f} s CPU")
        print(f"   campaign with store and runner:   {best1:7.2f} s wall, {c1:7.2f} s CPU -> overhead "
              f"{100 * (best1 - d) / d:+.1f} % wall, {100 * (c1 - dc) / dc:+.1f} % CPU (target < 5 %; includes "
              "spec, data slice, checkpoint hashing)")
        print(f"   time inside the store's unit writes: {min(write1):.3f} s = {100 * min(write1) / best1:.2f} % "
              "of the campaign")
        print(f"   fixed cost per invocation (a rerun with every unit done: spec, data slice, hashing, resume "
              f"scan): {setup:.2f} s")

        size = store_size(folder, args.rows)
        core_s = c1 / attacks  # CPU seconds per attack at 1 thread: robust to a shared machine
        core_s100 = core_s * 100 / args.steps
        print(f"\n3. projection: a campaign of {args.target:.0e} attacks on a Ray cluster")
        print(f"   measured cost: {core_s:.3f} CPU core-s per attack ({args.steps} steps, batch {args.batch}); "
              f"{core_s100:.3f} core-s at 100 steps (linear)")
        for label, cs in ((f"{args.steps} steps", core_s), ("100 steps", core_s100)):
            core_h = args.target * cs / 3600
            print(f"   {label:>9}: {core_h:10.0f} core-hours = {core_h / args.node_cores:8.0f} machine-hours on "
                  f"{args.node_cores}-core nodes ({core_h / args.node_cores / 100:.1f} h on 100 nodes)")
        print(f"   store: {size['rows']} synthetic rows -> {size['bytes'] / 2**20:.1f} MiB = "
              f"{size['mb_per_million']:.0f} MiB per million rows "
              f"({size['mb_per_million'] * args.target / 1e6 / 1024:.1f} GiB for {args.target:.0e} rows)")
        rate = size["rows_per_s"]
        print(f"   driver write capacity: {rate:,.0f} rows/s in 50-row units; one driver feeds "
              f"{rate * core_s100:,.0f} busy cores at 100 steps/attack "
              f"({args.target / rate / 60:.1f} min of writing for the whole campaign)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
