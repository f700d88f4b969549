"""``certattr train``: train a zoo model with any registered method through the one loop."""
from __future__ import annotations

import argparse
import json

from ._common import add_device, add_seed, resolve_device


def _parse_hp(items: list[str]) -> dict:
    hp = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--hp expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            hp[key] = json.loads(value)
        except json.JSONDecodeError:
            hp[key] = value
    return hp


def register(sub: argparse._SubParsersAction) -> None:
    from ..train.losses import LOSSES

    p = sub.add_parser("train", help="train a model (natural or robust-attribution methods)",
                       description="Train a zoo model on a dataset and write a certattr checkpoint to --out.")
    p.add_argument("--dataset", default="mnist", help="mnist | fashion-mnist | idx | cifar10 (default mnist)")
    p.add_argument("--data-root", default=None, help="folder for idx / cifar10 data sets")
    p.add_argument("--model", default="cnn-small", help="zoo model: mlp, cnn-small, lenet5, madry-cnn")
    p.add_argument("--activation", default="relu", choices=["relu", "softplus"])
    p.add_argument("--beta", type=float, default=10.0, help="softplus beta when --activation softplus")
    p.add_argument("--method", default="natural", help=f"training method: {', '.join(sorted(LOSSES))}")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eps", type=float, default=None, help="perturbation radius of robust methods")
    p.add_argument("--lambda", dest="lam", type=float, default=None, help="regulariser weight of robust methods")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                   help="any other hyperparameter of the method (repeatable)")
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    p.add_argument("--out", required=True, help="output directory for the checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from the last finished epoch in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_seed(p)
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import dataset_info, load_dataset
    from ..models import build_model
    from ..train import fit
    from ..train.losses import get_loss

    get_loss(args.method)
    device = resolve_device(args.device)
    hp = _parse_hp(args.hp)
    if args.eps is not None:
        hp["eps"] = args.eps
    if args.lam is not None:
        hp["lambda"] = args.lam
    x_train, y_train = load_dataset(args.dataset, "train", root=args.data_root)
    x_test, y_test = load_dataset(args.dataset, "test", root=args.data_root)
    if args.train_subset is not None:
        x_train, y_train = x_train[:args.train_subset], y_train[:args.train_subset]
    info = dataset_info(args.dataset)
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
    return 0
