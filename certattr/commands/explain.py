"""``certattr explain``: attributions of a checkpoint on a few test images, and how much they move
under random noise of a given size (a quick look before a full certify / attack campaign)."""
from __future__ import annotations

import argparse

from ._common import add_device, add_seed, resolve_device


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="print attribution metrics on a few test images (and plot them)",
                       description="Compute attributions of CKPT on test images and compare them with the "
                                   "attributions of randomly perturbed copies (uniform noise in the linf ball).")
    p.add_argument("checkpoint", help="certattr checkpoint directory")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--n", type=int, default=8, help="number of test images (default 8)")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--attribution", default="saliency", help="saliency | grad_x_input | ig | smoothgrad")
    p.add_argument("--noise", type=float, default=0.05, help="linf size of the random perturbation")
    p.add_argument("--k", type=int, default=100, help="k of the top-k intersection")
    p.add_argument("--plot", default=None, help="write a PNG of images and attribution maps here")
    add_seed(p)
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..attributions import get_attribution
    from ..checkpoint import load
    from ..data import load_dataset
    from ..errors import CertattrError, check_eps
    from ..metrics import dissimilarities

    check_eps(args.noise, name="--noise")
    if args.n < 1:
        raise CertattrError(f"--n must be >= 1, got {args.n}")
    device = resolve_device(args.device)
    model = load(args.checkpoint, map_location=device)
    x, y = load_dataset(args.dataset, "test", root=args.data_root)
    x, y = x[args.start:args.start + args.n].to(device), y[args.start:args.start + args.n].to(device)
    attribute = get_attribution(args.attribution)
    with torch.no_grad():
        pred = model(x).argmax(1)
    g = attribute(model, x, target=pred).detach()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    noisy = (x + (torch.rand(x.shape, generator=gen, device=device) * 2 - 1) * args.noise).clamp(0, 1)
    g_noisy = attribute(model, noisy, target=pred).detach()
    d = dissimilarities(g, g_noisy, k=min(args.k, x[0, 0].numel()))
    print(f"# {args.attribution} of {args.checkpoint} on {args.dataset} test[{args.start}:{args.start + x.shape[0]}],"
          f" compared with uniform noise of linf size {args.noise} (seed {args.seed})")
    cols = ["idx", "label", "predict", "||g||", "euclidean", "cosine", f"top{args.k}", "kendall", "spearman", "com_shift"]
    print("\t".join(cols))
    norms = g.flatten(1).norm(dim=1)
    for i in range(x.shape[0]):
        print("\t".join([str(args.start + i), str(int(y[i])), str(int(pred[i])), f"{norms[i]:.4g}",
                         f"{d['euclidean'][i]:.4g}", f"{d['cosine'][i]:.4f}", f"{d['topk_intersection'][i]:.3f}",
                         f"{d['kendall'][i]:.4f}", f"{d['spearman'][i]:.4f}", f"{d['center_of_mass_shift'][i]:.3f}"]))
    print(f"# accuracy {float((pred == y).float().mean()):.3f}; mean cosine {float(d['cosine'].mean()):.4f};"
          f" mean top-{args.k} intersection {float(d['topk_intersection'].mean()):.3f}")
    if args.plot:
        _plot(x.cpu(), g.cpu(), g_noisy.cpu(), y.cpu(), pred.cpu(), args.plot, args.attribution)
        print(f"# plot written to {args.plot}")
    return 0


def _plot(x, g, g_noisy, y, pred, path, name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..attributions import attribution_map

    n = min(x.shape[0], 8)
    shape = x.shape[-2:]
    maps = attribution_map(g).reshape(-1, *shape)
    maps_noisy = attribution_map(g_noisy).reshape(-1, *shape)
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.2), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(x[i].permute(1, 2, 0).squeeze(-1), cmap="gray")
        axes[0, i].set_title(f"y={int(y[i])} pred={int(pred[i])}", fontsize=8)
        axes[1, i].imshow(maps[i], cmap="hot")
        axes[2, i].imshow(maps_noisy[i], cmap="hot")
        for row in range(3):
            axes[row, i].set_xticks([])
            axes[row, i].set_yticks([])
    axes[0, 0].set_ylabel("input", fontsize=9)
    axes[1, 0].set_ylabel(f"|{name}|", fontsize=9)
    axes[2, 0].set_ylabel("with noise", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
