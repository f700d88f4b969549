"""Benchmark certified attribution training (issue 12, SPEC 9.4): proof and reality side by side.

Protocol (every number of the budget is printed with the table):
1. every method trains the same architecture (``--model``, ReLU) from the same seed for ``--epochs``
   epochs on the first ``--train-n`` MNIST training images (batch ``--batch-size``, Adam ``--lr``)
   through the one training loop: natural; pgd-at and ig-norm at linf ``--adv-eps`` with the reduced
   inner budget of benchmarks/bench_trainers.py (``--inner-steps`` PGD steps of 2.5 eps / steps, IG m
   ``--ig-steps`` / attack m ``--attack-ig-steps``); cert-ibp / cert-crown-ibp at linf ``--cert-eps``
   with lambda ``--cert-lambda``, kappa ``--cert-kappa``, warm-up ``--warmup`` epochs and a smoothed
   ramp over ``--ramp`` epochs (then constant); ``--ibp-init`` / ``--grad-clip`` turn on the stability tricks
   (IBP initialisation, gradient clipping: off by default, see the "Stability tricks" ablation);
2. evaluation on the first ``--eval-n`` MNIST test images (all of them, target = the true label):
   clean accuracy (on ``--eval-acc`` images), PGD accuracy (``--pgd-steps`` steps, linf
   ``--pgd-eps``), and for every radius of ``--radii`` (linf 0.01, linf 0.05, l2 0.1 by default)
   ``bounds.certified_bound`` (method ``--cert-method``, saliency): certified label accuracy (label
   certified and correct), median certified Euclidean bound, median of that bound / ||g(x)||, fraction
   with certified cosine >= 0.9, fraction with certified top-k intersection >= 0.5 (k ``--k``); and the
   best of two deviation attacks (``certattr.attacks.deviation_attack``: Euclidean and cosine
   objectives, ``--attack-steps`` steps x ``--attack-restarts`` restarts) on the same samples: median
   attacked Euclidean deviation, fraction with attacked cosine >= 0.9, and the number of
   violations (attack beyond the certificate: must be 0).

Writes markdown to ``--out`` (and a JSON with every number next to it) and prints it.

    python benchmarks/bench_certtrain.py                         # default budget (see --help)
    python benchmarks/bench_certtrain.py --tiny                  # smoke run (~1-2 min)
    python benchmarks/bench_certtrain.py --device cuda --epochs 20 --warmup 1 --ramp 10   # GPU budget
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from certattr.data import load_dataset
from certattr.models import build_model
from certattr.train import fit
from certattr.train.evaluate import pgd_accuracy
from certattr.train.loop import accuracy

METHODS = ("natural", "pgd-at", "ig-norm", "cert-ibp", "cert-crown-ibp")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--model", default="mlp")
    p.add_argument("--hidden", default="256,256", help="MLP hidden widths")
    p.add_argument("--train-n", type=int, default=60000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--adv-eps", type=float, default=0.1, help="linf training eps of pgd-at and ig-norm")
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--ig-steps", type=int, default=8)
    p.add_argument("--attack-ig-steps", type=int, default=4)
    p.add_argument("--cert-eps", type=float, default=0.05, help="linf training eps of cert-*")
    p.add_argument("--cert-norm", default="inf")
    p.add_argument("--cert-lambda", type=float, default=1.0)
    p.add_argument("--cert-kappa", type=float, default=0.5)
    p.add_argument("--cert-attr-loss", default="euclidean")
    p.add_argument("--cert-adv-steps", type=int, default=0)
    p.add_argument("--warmup", type=float, default=0.2, help="cert-* warm-up epochs (clean CE)")
    p.add_argument("--ramp", type=float, default=1.5, help="cert-* ramp epochs")
    p.add_argument("--schedule", default="smoothed")
    p.add_argument("--ibp-init", action="store_true", help="cert-*: IBP initialisation (Shi et al. 2021)")
    p.add_argument("--grad-clip", type=float, default=0.0, help="cert-*: max global gradient norm (0: off)")
    p.add_argument("--eval-acc", type=int, default=10000)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--pgd-eps", type=float, default=0.1)
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--radii", default="inf:0.01,inf:0.05,2:0.1")
    p.add_argument("--cert-method", default="crown", help="bounds.certified_bound method (crown | ibp)")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--attack-steps", type=int, default=50, help="0: no attacks")
    p.add_argument("--attack-restarts", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="folder for the trained checkpoints (one per method)")
    p.add_argument("--tiny", action="store_true", help="smoke-test budget")
    p.add_argument("--render", default=None, help="only re-render the table of a saved JSON")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "certtrain.md"))
    args = p.parse_args(argv)
    if args.tiny:
        args.train_n, args.epochs, args.eval_acc, args.eval_n, args.pgd_steps = 2000, 1, 500, 20, 5
        args.attack_steps, args.attack_restarts, args.warmup, args.ramp = 10, 1, 0.1, 0.5
    return args


def method_hparams(method: str, args) -> dict:
    if method == "natural":
        return {}
    if method in ("pgd-at", "ig-norm"):
        hp = {"eps": args.adv_eps, "steps": args.inner_steps, "step_size": 2.5 * args.adv_eps / args.inner_steps}
        if method == "ig-norm":
            hp.update(ig_steps=args.ig_steps, attack_ig_steps=args.attack_ig_steps)
        return hp
    return {"eps": args.cert_eps, "norm": args.cert_norm, "lambda": args.cert_lambda, "kappa": args.cert_kappa,
            "warmup_epochs": args.warmup, "ramp_epochs": args.ramp, "schedule": args.schedule,
            "attr_loss": args.cert_attr_loss, "adv_steps": args.cert_adv_steps, "ibp_init": args.ibp_init,
            "grad_clip": args.grad_clip or None}


def certify_and_attack(model, x, y, norm: str, eps: float, args) -> dict:
    """bounds.certified_bound and the best of two deviation attacks on the same samples (target y)."""
    import bounds
    from certattr.attacks import deviation_attack

    t = time.perf_counter()
    r = bounds.certified_bound(model, x, eps, norm=norm, method=args.cert_method, target=y)
    cert_s = time.perf_counter() - t
    norm_g = r.attribution_at_x.flatten(1).norm(dim=1)
    correct = model(x).argmax(1) == y
    topk = r.topk_intersection(args.k)
    out = {
        "norm": norm, "eps": eps,
        "certified_label_accuracy": float((r.label_certified & correct).float().mean()),
        "median_euclidean": float(r.euclidean.median()),
        "median_ratio": float((r.euclidean / norm_g.clamp_min(1e-12)).median()),
        "frac_cos_0.9": float((r.cosine >= 0.9).float().mean()),
        "frac_topk_0.5": float((topk >= 0.5).float().mean()),
        "certify_s": cert_s,
    }
    if args.attack_steps == 0:
        return {**out, "attack_median_euclidean": float("nan"), "attack_frac_cos_0.9": float("nan"),
                "violations": -1, "attack_s": 0.0}
    t = time.perf_counter()
    attacks = [deviation_attack(model, x, eps, norm=norm, objective=obj, steps=args.attack_steps,
                                restarts=args.attack_restarts, seed=args.seed, target=y, k=args.k)
               for obj in ("euclidean", "cosine")]
    attack_s = time.perf_counter() - t
    euc = torch.stack([torch.nan_to_num(a.euclidean, nan=0.0) for a in attacks]).max(0).values
    cos = torch.stack([torch.nan_to_num(a.cosine, nan=1.0) for a in attacks]).min(0).values
    tol = 1e-4
    violations = int(((euc > r.euclidean * (1 + tol) + tol) | (cos < r.cosine - tol)).sum())
    return {**out, "attack_median_euclidean": float(euc.median()),
            "attack_frac_cos_0.9": float((cos >= 0.9).float().mean()), "violations": violations,
            "attack_s": attack_s}


def main(argv=None) -> int:
    args = parse(argv)
    if args.render:
        print(render_json(args.render))
        return 0
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    radii = []
    for item in args.radii.split(","):
        norm, eps = item.split(":")
        radii.append((norm, float(eps)))
    x, y = load_dataset("mnist", "train")
    xt, yt = load_dataset("mnist", "test")
    train = (x[: args.train_n], y[: args.train_n])
    device = torch.device(args.device)
    kwargs = {"hidden": tuple(int(h) for h in args.hidden.split(","))} if args.model == "mlp" else {}
    budget = (
        f"MNIST, {args.model}{' ' + str(kwargs['hidden']) if kwargs else ''} (ReLU), every method from the same "
        f"seed-{args.seed} initialisation: {args.epochs} epoch(s) on {args.train_n} training images, batch "
        f"{args.batch_size}, Adam lr {args.lr}.  pgd-at / ig-norm: linf eps {args.adv_eps}, inner PGD "
        f"{args.inner_steps} steps, IG m {args.ig_steps} / attack m {args.attack_ig_steps}.  cert-*: linf eps "
        f"{args.cert_eps} ({args.cert_norm}), lambda {args.cert_lambda}, kappa {args.cert_kappa}, attr loss "
        f"{args.cert_attr_loss}, adv_steps {args.cert_adv_steps}, ibp_init {args.ibp_init}, grad_clip "
        f"{args.grad_clip or 'off'}, warm-up {args.warmup} epoch(s), {args.schedule} "
        f"ramp over {args.ramp} epoch(s).  Evaluation: clean accuracy on {args.eval_acc} test images; PGD "
        f"accuracy (linf {args.pgd_eps}, {args.pgd_steps} steps) and certificates "
        f"(bounds.certified_bound method {args.cert_method}, saliency of the true label, k {args.k}) and "
        f"attacks (deviation_attack, euclidean + cosine objectives, {args.attack_steps} steps x "
        f"{args.attack_restarts} restarts) on the first {args.eval_n} test images.  {args.threads} thread(s), "
        f"device {args.device}, torch {torch.__version__}, {platform.processor() or platform.machine()}."
    )
    print(budget, flush=True)
    t0 = time.perf_counter()
    rows = []
    for method in methods:
        torch.manual_seed(args.seed)
        model = build_model(args.model, **kwargs)
        t = time.perf_counter()
        out = Path(args.save) / method if args.save else None
        summary = fit(model, train, method=method, hparams=method_hparams(method, args), dataset="mnist",
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device,
                      out=out, progress=False)
        train_s = time.perf_counter() - t
        model = model.cpu().eval()
        xe, ye = xt[: args.eval_n], yt[: args.eval_n]
        row = {"method": method, "hparams": summary["hparams"], "train_s": train_s,
               "grad_clipped_steps": summary.get("grad_clipped_steps"), "steps": summary["steps"],
               "final_train_loss": summary["train_loss"],
               "seconds_per_epoch": train_s / args.epochs,
               "clean_accuracy": accuracy(model, xt[: args.eval_acc], yt[: args.eval_acc]),
               "pgd_accuracy": pgd_accuracy(model, xe, ye, eps=args.pgd_eps, steps=args.pgd_steps, seed=args.seed),
               "radii": []}
        for norm, eps in radii:
            row["radii"].append(certify_and_attack(model, xe, ye, norm, eps, args))
        rows.append(row)
        print(json.dumps(row), flush=True)
    total = time.perf_counter() - t0
    text = render(rows, radii, budget, total, argv)
    out_md = Path(args.out)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text)
    out_md.with_suffix(".json").write_text(json.dumps(
        {"budget": budget, "rows": rows, "total_s": total, "argv": sys.argv[1:] if argv is None else argv}, indent=1))
    print()
    print(text)
    return 0


def render(rows: list[dict], radii, budget: str, total: float, argv) -> str:
    """One line per (method, radius); the method's own columns on its first line."""
    head = ["method", "clean acc", "PGD acc", "train s (s/epoch)", "radius", "cert label acc",
            "median cert Eucl (÷‖g‖)", "cert cos≥0.9", "cert top-k≥0.5", "attack median Eucl", "attack cos≥0.9",
            "violations"]
    lines = [
        "# Certified attribution training on MNIST (certattr benchmarks/bench_certtrain.py)",
        "",
        budget,
        "",
        f"Total wall time {total:.0f} s.  Command: `python benchmarks/bench_certtrain.py "
        + " ".join(sys.argv[1:] if argv is None else argv) + "`",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        for i, r in enumerate(row["radii"]):
            first = [row["method"], f"{row['clean_accuracy']:.4f}", f"{row['pgd_accuracy']:.3f}",
                     f"{row['train_s']:.0f} ({row['seconds_per_epoch']:.0f})"] if i == 0 else ["", "", "", ""]
            cells = first + [
                f"l{'∞' if r['norm'] == 'inf' else '2'} {r['eps']:g}",
                f"{r['certified_label_accuracy']:.3f}",
                f"{r['median_euclidean']:.3g} ({r['median_ratio']:.3g})",
                f"{r['frac_cos_0.9']:.3f}", f"{r['frac_topk_0.5']:.3f}",
                f"{r['attack_median_euclidean']:.3g}", f"{r['attack_frac_cos_0.9']:.3f}", str(r["violations"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        ("cert label acc: label certified on the whole ball and correct.  median cert Eucl: median over the samples "
        "of the certified bound on ||g(x') - g(x)||_2 (in brackets: divided by ||g(x)||; <= 0.436 certifies "
        "cosine >= 0.9 by the tangent bound).  cert cos≥0.9 / top-k≥0.5: fraction of the samples whose certified "
        "cosine / certified top-k intersection reaches the threshold.  attack: the best of the Euclidean- and "
        "cosine-objective deviation attacks (label-preserving points only): median Euclidean deviation and the "
        "fraction whose worst attacked cosine stays >= 0.9 (an upper bound on what any certificate can reach).  "
        "violations: samples where an attack beats the certificate (must be 0)."),
    ]
    return "\n".join(lines) + "\n"


def render_json(path: str) -> str:
    """Re-render a saved JSON (``--render FILE``)."""
    data = json.loads(Path(path).read_text())
    rows = data["rows"]
    radii = [(r["norm"], r["eps"]) for r in rows[0]["radii"]] if rows else []
    return render(rows, radii, data["budget"], data.get("total_s", float("nan")), data.get("argv", []))


if __name__ == "__main__":
    sys.exit(main())
