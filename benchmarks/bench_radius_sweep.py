"""Benchmark: the radius sweep behind the demo's threat models (README "The main job").

    python benchmarks/bench_radius_sweep.py [--models DIR] [--n 32] [--steps 30] [--out FILE]

For the demo's two nets (cnn-small, ReLU and softplus beta = 10, one epoch of natural training; trained
here exactly as ``certattr demo`` does, or read from a demo output folder with ``--models DIR``), on the first
--n MNIST test images, saliency: at each ℓ∞ and ℓ2 radius, the fraction of the top-100 pixels that IFIA
top-k (``--steps`` steps, the real net's label kept) leaves in place (mean top-k intersection) and the
fraction of images whose label PGD (``--steps`` steps) does not flip.  A radius is useful for the demo when
attacks visibly move the attribution while the label mostly survives.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

RADII = {"inf": (0.01, 0.03, 0.05, 0.1), "2": (0.03, 0.3, 1.0, 2.0)}


def _models(folder: Path) -> dict:
    from certattr.campaign.zoo import train_zoo_model
    from certattr.checkpoint import load

    out = {}
    for net in ("relu", "softplus"):
        d = folder / net
        if not (d / "certattr.json").is_file():
            train_zoo_model("cnn-small", "mnist", d, recipe="quick", progress=False,
                            activation="relu" if net == "relu" else "softplus", beta=10.0)
        out[net] = load(d).eval()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="a `certattr demo` output folder (relu/, softplus/)")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the table here")
    args = ap.parse_args(argv)

    from certattr.attacks import ifia, pgd
    from certattr.data import load_dataset

    torch.manual_seed(args.seed)
    folder = Path(args.models) if args.models else Path(tempfile.mkdtemp(prefix="certattr-sweep-"))
    models = _models(folder)
    x, y = load_dataset("mnist", "test")
    x, y = x[: args.n], y[: args.n]
    head = (f"# radius sweep: {args.n} MNIST test images, saliency, IFIA top-k (k=100) and PGD, {args.steps} steps, "
            f"seed {args.seed}; torch {torch.__version__}; {time.strftime('%Y-%m-%d', time.gmtime())}")
    lines = [head, "net       norm  eps    top-100 kept (IFIA)  label kept (PGD)  seconds"]
    for net, model in models.items():
        for norm, radii in RADII.items():
            for eps in radii:
                t0 = time.perf_counter()
                step = 2.5 * eps / args.steps
                res = ifia(model, x, eps, norm, kind="topk", steps=args.steps, step_size=step, seed=args.seed)
                adv = pgd(model, x, y, eps=eps, norm=norm, steps=args.steps, step_size=step, seed=args.seed)
                with torch.no_grad():
                    kept = float((model(adv).argmax(dim=1) == y).float().mean())
                lines.append(f"{net:9s} {norm:5s} {eps:<6g} {float(res.topk_intersection.mean()):<20.3f} "
                             f"{kept:<17.3f} {time.perf_counter() - t0:.1f}")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
