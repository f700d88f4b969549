"""``certattr train``: train a zoo model with any registered method through the one loop, then print a
final evaluation line (natural accuracy, PGD accuracy, IFIA top-k intersection and Kendall) and record
those numbers in the checkpoint's "metrics"."""
from __future__ import annotations

import argparse
import json
import math

from ..errors import CertattrError, check_eps
from ._common import add_device, add_seed, resolve_device


def _parse_hp(items: list[str]) -> dict:
    hp = {}
    for item in items or []:
        if "=" not in item:
            raise CertattrError(f"--hp expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            hp[key] = json.loads(value)
        except json.JSONDecodeError:
            hp[key] = value
    return hp


def register(sub: argparse._SubParsersAction) -> None:
    from ..train.losses import LOSSES

    p = sub.add_parser("train", help="train a model (natural or robust-attribution methods)",
                       description="Train a zoo model on a dataset and write a certattr checkpoint to --out. "
                                   "Each method's defaults come from its paper's config for the dataset; "
                                   "--eps, --lambda and --hp KEY=VALUE override them.")
    p.add_argument("--dataset", default="mnist", help="mnist | fashion-mnist | idx | cifar10 (default mnist)")
    p.add_argument("--data-root", default=None, help="folder for idx / cifar10 data sets")
    p.add_argument("--model", default="cnn-small", help="zoo model: mlp, cnn-small, lenet5, madry-cnn")
    p.add_argument("--activation", default="relu", choices=["relu", "softplus"])
    p.add_argument("--beta", type=float, default=10.0, help="softplus beta when --activation softplus")
    p.add_argument("--method", default="natural", help=f"training method: {', '.join(sorted(LOSSES))}")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eps", type=float, default=None,
                   help="perturbation radius of robust methods (and of the final evaluation)")
    p.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="regulariser weight of the method (TRADES/IG-SUM-NORM beta, the others' lambda)")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                   help="any other hyperparameter of the method (repeatable), e.g. --hp steps=10")
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    p.add_argument("--out", required=True, help="output directory for the checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from the last finished epoch in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--eval-n", type=int, default=100,
                   help="test images (correctly classified) for the attributional evaluation (default 100)")
    p.add_argument("--eval-pgd-n", type=int, default=1000,
                   help="test images for the PGD accuracy of the final evaluation (default 1000)")
    p.add_argument("--eval-steps", type=int, default=None,
                   help="PGD and IFIA steps of the final evaluation (default: the dataset's, "
                        "e.g. MNIST 40 / 100)")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    add_seed(p)
    add_device(p)
    p.set_defaults(func=run)


def resolve_hparams(method: str, dataset: str, hp: dict, eps: float | None, lam: float | None,
                    in_shape) -> tuple[dict, dict]:
    """(user overrides, full validated hyperparameters) of ``method`` on ``dataset``; CertattrError if bad."""
    from ..train.losses import default_hparams, validate_hparams, weight_key

    defaults = default_hparams(method, dataset)
    hp = dict(hp)
    if eps is not None and "eps" in defaults:
        hp["eps"] = eps
    if lam is not None:
        key = weight_key(method)
        if key is None:
            raise CertattrError(f"method {method!r} has no regulariser weight: --lambda does not apply")
        hp[key] = lam
    full = validate_hparams(method, {**defaults, **hp}, in_shape=in_shape)
    return hp, full


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import checkpoint
    from ..data import dataset_info, load_dataset
    from ..models import build_model
    from ..train import fit
    from ..train.evaluate import eval_defaults, evaluate, format_line
    from ..train.losses import get_loss

    get_loss(args.method)
    if args.eval_n < 0 or args.eval_pgd_n < 0 or (args.eval_steps is not None and args.eval_steps < 0):
        raise CertattrError("--eval-n, --eval-pgd-n and --eval-steps must be >= 0")
    info = dataset_info(args.dataset)
    hp, full = resolve_hparams(args.method, args.dataset, _parse_hp(args.hp), args.eps, args.lam,
                               info["in_shape"])
    if args.eps is not None and "eps" not in full:  # natural training: --eps only sets the evaluation radius
        check_eps(args.eps, name="--eps")
    device = resolve_device(args.device)
    x_train, y_train = load_dataset(args.dataset, "train", root=args.data_root)
    x_test, y_test = load_dataset(args.dataset, "test", root=args.data_root)
    if args.train_subset is not None:
        x_train, y_train = x_train[:args.train_subset], y_train[:args.train_subset]
    torch.manual_seed(args.seed)  # weight initialisation
    kwargs = {"in_shape": tuple(x_train.shape[1:]), "num_classes": info.get("num_classes", 10),
              "activation": args.activation}
    if args.activation == "softplus":
        kwargs["beta"] = args.beta
    model = build_model(args.model, **kwargs)
    summary = fit(model, (x_train, y_train), method=args.method, hparams=hp, dataset=args.dataset,
                  epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device,
                  out=args.out, resume=args.resume, test=(x_test, y_test), progress=not args.no_progress,
                  meta={"in_shape": list(x_train.shape[1:]), "normalisation": None})
    print(f"trained {args.model} ({args.method}) on {args.dataset}: test accuracy "
          f"{summary['test_accuracy']:.4f} in {summary['seconds']:.1f} s; checkpoint in {args.out}")
    if args.no_eval:
        return 0
    settings = eval_defaults(args.dataset)
    eps = full.get("eps", args.eps if args.eps is not None else settings["eps"])
    if args.eval_steps is not None:  # fewer steps: scale the step so the attacks can still cross the ball
        steps = max(args.eval_steps, 1)
        settings.update(pgd_steps=args.eval_steps, ifia_steps=args.eval_steps,
                        pgd_step_size=max(settings["pgd_step_size"], 2.5 * eps / steps),
                        ifia_step_size=max(settings["ifia_step_size"], 2.5 * eps / steps))
    if full.get("norm", "inf") == "2":  # the tables hold linf step sizes; l2 uses Madry's 2.5 eps / steps
        settings.update(pgd_step_size=2.5 * eps / max(settings["pgd_steps"], 1),
                        ifia_step_size=2.5 * eps / max(settings["ifia_steps"], 1))
    result = evaluate(model, x_test, y_test, eps=eps, norm=full.get("norm", "inf"), n_attr=args.eval_n,
                      n_pgd=args.eval_pgd_n, pgd_steps=settings["pgd_steps"],
                      pgd_step_size=settings["pgd_step_size"], ifia_steps=settings["ifia_steps"],
                      ifia_step_size=settings["ifia_step_size"], k=settings["k"], seed=args.seed,
                      domain=tuple(full.get("domain", (0.0, 1.0))))
    print(format_line(result))
    _record_metrics(checkpoint, model, args.out, result)
    return 0


def _record_metrics(checkpoint, model, out: str, result: dict) -> None:
    """Re-save the checkpoint's spec with the evaluation numbers in "metrics" (weights unchanged)."""
    spec = checkpoint.info(out)
    written_by_save = ("format", "format_version", "architecture", "created", "versions", "sha256")
    for key in (*written_by_save, "recorded_sha256", "path"):
        spec.pop(key, None)
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}
    metrics = dict(spec.get("metrics") or {})
    for key in ("natural_accuracy", "pgd_accuracy", "topk_intersection", "kendall"):
        metrics[key] = clean[key]
    metrics["evaluation"] = clean
    spec["metrics"] = metrics
    checkpoint.save(model, out, **spec)
