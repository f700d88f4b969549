"""``certattr attack``: run one attack on test images of a checkpoint and write one TSV line per sample.

Attribution attacks (ifia-*, deviation-*) are run w.r.t. the model's prediction on the clean image
(SPEC 1); their metrics compare g(x) and g(x_adv) on the real network.  ``pgd`` attacks the true label.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

from ._common import add_device, add_seed, resolve_device
from ._common import tsv_field as _fmt

ATTACKS = ("ifia-topk", "ifia-mass-center", "ifia-random", "deviation-l2", "deviation-cos", "pgd")
ATTRIBUTION_COLUMNS = ["idx", "label", "predict", "correct", "attack", "norm", "eps", "label_kept", "euclidean",
                       "cosine", "topk_intersection", "kendall", "spearman", "center_of_mass_shift", "time"]
PGD_COLUMNS = ["idx", "label", "predict", "correct", "attack", "norm", "eps", "adv_predict", "success", "time"]
METRICS = ATTRIBUTION_COLUMNS[8:14]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attack", help="attack the attributions (or predictions) of a checkpoint",
                       description="Run an attack on test images of CKPT and write one TSV line per sample.")
    p.add_argument("checkpoint", metavar="CKPT", help="certattr checkpoint directory")
    p.add_argument("--dataset", default="mnist", help="dataset name (default mnist)")
    p.add_argument("--data-root", default=None, help="folder of the dataset files (idx, cifar10)")
    p.add_argument("--n", type=int, default=200, help="number of test images (default 200)")
    p.add_argument("--start", type=int, default=0, help="index of the first test image (default 0)")
    p.add_argument("--attack", required=True, choices=ATTACKS)
    p.add_argument("--norm", default="inf", help="inf or 2 (default inf)")
    p.add_argument("--eps", type=float, required=True, help="radius of the threat model")
    p.add_argument("--attribution", default="saliency", help="saliency | grad_x_input | ig (default saliency)")
    p.add_argument("--steps", type=int, default=None, help="steps (default: ifia 100, deviation 100, pgd 40)")
    p.add_argument("--step-size", type=float, default=None,
                   help="step size (default: ifia 0.01, pgd 0.01, deviation 10*eps/steps with cosine decay)")
    p.add_argument("--restarts", type=int, default=None, help="restarts (default: ifia 1, deviation 5, pgd 1)")
    p.add_argument("--k", type=int, default=None,
                   help="k of the top-k intersection (default 100 on MNIST-sized maps, about 12.8%% of the map entries on smaller inputs)")
    p.add_argument("--surrogate-beta", type=float, default=10.0, help="softplus beta of the IFIA surrogate")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", required=True, help="TSV file to write")
    p.add_argument("--save-adv", default=None, metavar="FILE.npz", help="also save x_adv (numpy .npz)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_seed(p)
    add_device(p)
    p.set_defaults(func=run)


def _attack_batch(args, model, xb, yb):
    """Run the chosen attack on one batch -> (x_adv, AttackResult or None for pgd)."""
    from ..attacks import deviation_attack, ifia, pgd

    name = args.attack
    if name == "pgd":
        return pgd(model, xb, yb, eps=args.eps, norm=args.norm, steps=args.steps or 40,
                   step_size=args.step_size or 0.01, restarts=args.restarts or 1, seed=args.seed), None
    if name.startswith("ifia-"):
        kind = {"ifia-topk": "topk", "ifia-mass-center": "mass_center", "ifia-random": "random"}[name]
        res = ifia(model, xb, eps=args.eps, norm=args.norm, kind=kind, attribution=args.attribution, k=args.k,
                   steps=args.steps if args.steps is not None else 100, step_size=args.step_size or 0.01,
                   surrogate_beta=args.surrogate_beta, restarts=args.restarts or 1, seed=args.seed)
    else:
        objective = "euclidean" if name == "deviation-l2" else "cosine"
        res = deviation_attack(model, xb, eps=args.eps, norm=args.norm, objective=objective,
                               attribution=args.attribution, steps=args.steps if args.steps is not None else 100,
                               step_size=args.step_size, restarts=args.restarts if args.restarts is not None else 5,
                               seed=args.seed, k=args.k)
    return res.x_adv, res


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from .. import __version__
    from ..checkpoint import info, load
    from ..data import load_dataset
    from ..errors import CertattrError, check_eps, check_norm

    args.eps = check_eps(args.eps, name="--eps")
    args.norm = check_norm(args.norm)
    for flag in ("n", "batch_size"):
        if getattr(args, flag) < 1:
            raise CertattrError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.start < 0:
        raise CertattrError(f"--start must be >= 0, got {args.start}")
    device = resolve_device(args.device)
    meta = info(args.checkpoint)
    model = load(args.checkpoint, map_location=device)
    x, y = load_dataset(args.dataset, "test", root=args.data_root)
    if args.start >= x.shape[0]:
        raise CertattrError(f"--start {args.start} is past the end of the {args.dataset} test split ({x.shape[0]})")
    x, y = x[args.start:args.start + args.n], y[args.start:args.start + args.n]
    n = x.shape[0]
    if args.k is None:  # top-k from the input size: 100 on MNIST, fewer on small tabular inputs
        from ..attributions import attribution_map
        from ..metrics import default_k

        args.k = default_k(attribution_map(x[:1]).shape[1])
    is_pgd = args.attack == "pgd"
    columns = PGD_COLUMNS if is_pgd else ATTRIBUTION_COLUMNS
    adv_all = [] if args.save_adv else None
    totals = {"n": 0, "correct": 0, "kept": 0, "success": 0}
    sums = {m: [0.0, 0] for m in METRICS}  # nan-skipping sum and count per metric
    started = time.perf_counter()
    with open(args.out, "w", encoding="utf-8") as out:
        out.write(f"# certattr {__version__} attack (torch {torch.__version__}, python {platform.python_version()})\n")
        out.write(f"# checkpoint {args.checkpoint} sha256 {meta.get('sha256')}\n")
        out.write(f"# dataset {args.dataset} test[{args.start}:{args.start + n}] attack {args.attack} "
                  f"norm {args.norm} eps {args.eps:g} attribution {args.attribution} seed {args.seed} "
                  f"steps {args.steps} step_size {args.step_size} restarts {args.restarts} k {args.k}\n")
        out.write("\t".join(columns) + "\n")
        out.flush()
        bar = tqdm(total=n, desc=f"attack {args.attack}", unit="img", file=sys.stderr, disable=args.no_progress)
        for lo in range(0, n, args.batch_size):
            t0 = time.perf_counter()
            xb = x[lo:lo + args.batch_size].to(device)
            yb = y[lo:lo + args.batch_size].to(device)
            with torch.no_grad():
                pred = model(xb).argmax(dim=1)
            x_adv, res = _attack_batch(args, model, xb, yb)
            per_sample = (time.perf_counter() - t0) / xb.shape[0]
            rows = []
            if is_pgd:
                with torch.no_grad():
                    adv_pred = model(x_adv).argmax(dim=1)
                for i in range(xb.shape[0]):
                    success = bool(pred[i] == yb[i]) and bool(adv_pred[i] != yb[i])
                    totals["success"] += success
                    rows.append([args.start + lo + i, int(yb[i]), int(pred[i]), bool(pred[i] == yb[i]), args.attack,
                                 args.norm, args.eps, int(adv_pred[i]), success, per_sample])
            else:
                values = {m: getattr(res, m).detach().cpu().tolist() for m in METRICS}
                kept = res.label_kept.cpu().tolist()
                for i in range(xb.shape[0]):
                    totals["kept"] += bool(kept[i])
                    for m in METRICS:
                        if values[m][i] == values[m][i]:  # not nan
                            sums[m][0] += values[m][i]
                            sums[m][1] += 1
                    rows.append([args.start + lo + i, int(yb[i]), int(pred[i]), bool(pred[i] == yb[i]), args.attack,
                                 args.norm, args.eps, bool(kept[i]), *[values[m][i] for m in METRICS], per_sample])
            totals["n"] += xb.shape[0]
            totals["correct"] += int((pred == yb).sum())
            out.write("".join("\t".join(_fmt(v) for v in row) + "\n" for row in rows))
            out.flush()
            if adv_all is not None:
                adv_all.append(x_adv.detach().cpu().numpy())
            bar.update(xb.shape[0])
        bar.close()
    if adv_all is not None:
        np.savez(args.save_adv, x_adv=np.concatenate(adv_all), idx=np.arange(args.start, args.start + n),
                 label=y.numpy())
    elapsed = time.perf_counter() - started
    count = max(totals["n"], 1)
    summary = f"{args.attack}: {totals['n']} images, clean accuracy {totals['correct'] / count:.3f}"
    if is_pgd:
        summary += f", adversarial accuracy {(totals['correct'] - totals['success']) / count:.3f}"
    else:
        means = ", ".join(f"{m} {s / max(c, 1):.4g}" for m, (s, c) in sums.items())
        summary += f", label kept {totals['kept'] / count:.3f}; mean {means}"
    print(f"{summary} ({elapsed:.1f} s) -> {args.out}", file=sys.stderr)
    return 0
