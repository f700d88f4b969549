"""Benchmark the robust-attribution trainers on MNIST (Chen et al. NeurIPS 2019, Table 1 style).

Protocol (sized for a 2-core CPU; every number of the budget is printed with the table):
1. a ReLU cnn-small is trained naturally on the first ``--pretrain`` MNIST training images (1 epoch);
2. every method fine-tunes a copy of it for ``--steps`` optimiser steps (batch ``--batch-size``, Adam
   ``--lr``) on the next images, with its MNIST defaults except eps (``--eps``, default 0.1: at the
   papers' 0.3 a 100-step fine-tune only destroys accuracy) and the reduced inner budget
   (``--inner-steps`` PGD steps of 2.5 eps / steps, IG ``--ig-steps`` / attack IG ``--attack-ig-steps``);
   "natural" fine-tunes with plain CE for the same steps;
3. each model is evaluated with certattr.train.evaluate: NA on ``--eval-na`` test images, AA = PGD
   accuracy (``--pgd-steps``) on ``--eval-pgd``, IN / CO = top-k intersection (k 100) and
   Kendall of IG maps (m ``--eval-ig-steps``) under IFIA top-k (``--ifia-steps``, same eps) on the first
   ``--eval-n`` correctly classified test images.

Writes a markdown table (method | NA | AA | IN | CO | seconds) to ``--out`` and stdout.
Literature (full budgets): natural < PGD-AT < IG-NORM <= IG-SUM-NORM on IN and CO.

    python benchmarks/bench_trainers.py                       # default budget (~10 min on one busy core)
    python benchmarks/bench_trainers.py --tiny                # smoke run (~1-2 min)
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch

from certattr.data import load_dataset
from certattr.models import build_model
from certattr.train import fit
from certattr.train.evaluate import evaluate
from certattr.train.losses import LOSSES, default_hparams

# every registered method, in registration order, except the certified trainers (cert-*): their eps / lambda
# schedule is in epochs (warm-up, ramp) and means nothing on this 100-step fine-tune; they have their own
# benchmark, benchmarks/bench_certtrain.py
METHODS = [m for m in LOSSES if not m.startswith("cert-")]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--model", default="cnn-small")
    p.add_argument("--pretrain", type=int, default=6000, help="natural pretraining images (1 epoch)")
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps per method")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--eps",
        type=float,
        default=0.1,
        help="train and evaluation radius (papers: 0.3; 0.1 fits the budget)",
    )
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--ig-steps", type=int, default=8)
    p.add_argument("--attack-ig-steps", type=int, default=4)
    p.add_argument("--eval-na", type=int, default=1000)
    p.add_argument("--eval-pgd", type=int, default=300)
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--eval-n", type=int, default=50)
    p.add_argument("--ifia-steps", type=int, default=20)
    p.add_argument("--eval-ig-steps", type=int, default=20)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="smoke-test budget")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "trainers.md"))
    args = p.parse_args(argv)
    if args.tiny:
        args.pretrain, args.steps, args.eval_na, args.eval_pgd, args.pgd_steps = 1000, 4, 300, 50, 5
        args.eval_n, args.ifia_steps, args.eval_ig_steps, args.inner_steps = 5, 5, 8, 2
    return args


def method_hparams(method: str, args) -> dict:
    allowed = default_hparams(method, "mnist")
    wanted = {
        "eps": args.eps,
        "steps": args.inner_steps,
        "step_size": 2.5 * args.eps / max(args.inner_steps, 1),
        "ig_steps": args.ig_steps,
        "attack_ig_steps": args.attack_ig_steps,
    }
    return {k: v for k, v in wanted.items() if k in allowed}


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in LOSSES]
    if unknown:
        print(f"unknown methods: {unknown}", file=sys.stderr)
        return 2
    x, y = load_dataset("mnist", "train")
    xt, yt = load_dataset("mnist", "test")
    xt, yt = xt[: args.eval_na], yt[: args.eval_na]
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    base = build_model(args.model)
    fit(
        base,
        (x[: args.pretrain], y[: args.pretrain]),
        epochs=1,
        batch_size=64,
        lr=1e-3,
        seed=args.seed,
        progress=False,
    )
    pretrain_s = time.perf_counter() - t0
    n_tune = args.steps * args.batch_size
    tune = (x[args.pretrain : args.pretrain + n_tune], y[args.pretrain : args.pretrain + n_tune])
    step = 2.5 * args.eps / max(args.pgd_steps, 1)
    ifia_step = 2.5 * args.eps / max(args.ifia_steps, 1)
    budget = (
        f"MNIST, {args.model} (ReLU); natural pretraining: 1 epoch on {args.pretrain} images "
        f"({pretrain_s:.0f} s); then per method {args.steps} steps x batch {args.batch_size} "
        f"(Adam lr {args.lr}) from that start, inner PGD {args.inner_steps} steps, IG m {args.ig_steps} / "
        f"attack m {args.attack_ig_steps}, eps {args.eps} linf.  Evaluation: NA on {args.eval_na} test "
        f"images; AA = PGD {args.pgd_steps} x {step:.3g} on {args.eval_pgd}; IN/CO = IFIA top-k (k 100, "
        f""
        f"{args.ifia_steps} x {ifia_step:.3g}, surrogate beta 10, {args.runs} run(s)) on IG maps (m "
        f"{args.eval_ig_steps}) of {args.eval_n} correctly classified test images.  "
        f"{args.threads} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}."
    )
    print(budget, flush=True)
    rows = []
    for method in methods:
        model = copy.deepcopy(base)
        hp = method_hparams(method, args)
        t = time.perf_counter()
        fit(
            model,
            tune,
            method=method,
            hparams=hp,
            dataset="mnist",
            epochs=1,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            progress=False,
        )
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        r = evaluate(
            model,
            xt,
            yt,
            eps=args.eps,
            n_attr=args.eval_n,
            n_pgd=args.eval_pgd,
            pgd_steps=args.pgd_steps,
            pgd_step_size=step,
            ifia_steps=args.ifia_steps,
            ifia_step_size=ifia_step,
            ig_steps=args.eval_ig_steps,
            attack_ig_steps=args.attack_ig_steps,
            runs=args.runs,
            seed=args.seed,
        )
        eval_s = time.perf_counter() - t
        rows.append(
            (
                method,
                r["natural_accuracy"],
                r["pgd_accuracy"],
                r["topk_intersection"],
                r["kendall"],
                r["n_attr"],
                train_s,
                eval_s,
            )
        )
        print(
            f"{method:12s} NA {r['natural_accuracy']:.4f}  AA {r['pgd_accuracy']:.4f}  "
            f"IN {r['topk_intersection']:.4f}  CO {r['kendall']:.4f}  "
            f"(train {train_s:.0f} s, eval {eval_s:.0f} s)",
            flush=True,
        )
    total = time.perf_counter() - t0
    lines = [
        "# Robust-attribution trainers on MNIST (certattr benchmarks/bench_trainers.py)",
        "",
        budget,
        "",
        f"Total wall time {total:.0f} s.  Command: `python benchmarks/bench_trainers.py "
        + " ".join(sys.argv[1:] if argv is None else argv)
        + "`",
        "",
        "| method | NA | AA (PGD) | IN (top-k) | CO (Kendall) | n attacked | train s | eval s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, na, aa, inter, co, n, ts, es in rows:
        lines.append(
            f"| {method} | {na:.4f} | {aa:.4f} | {inter:.4f} | {co:.4f} | {n} | {ts:.0f} | {es:.0f} |"
        )
    lines += [
        "",
        (
            "NA natural accuracy, AA accuracy under PGD, IN top-k intersection, CO Kendall's tau-b between "
            "the IG maps of x and of the IFIA top-k iterate (higher = more robust attributions).  Reduced "
            "budget: compare methods with each other, not with the papers' absolute numbers."
        ),
    ]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
