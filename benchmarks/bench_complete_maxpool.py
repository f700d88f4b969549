"""complete_bound on a small max-pool CNN: phase branching (routing as ReLU phases, bounds/complete_maxpool.py)
against input branching (the only mode before) in the same process.

Net: 1x8x8 input, Conv2d(1, 3, 3) -> ReLU -> MaxPool2d(2) -> Flatten -> Linear(27, 16) -> ReLU -> Linear(16, 10),
torch default init (seeded), weights x2 so phases and routing flip inside the ball; l_inf, saliency, euclidean.
Prints per radius and mode: gap closed (fraction), median upper / lower, subdomains per second; the ratio
rows compare phases to input branching.  Output: benchmarks/results/complete_maxpool.txt.

    python benchmarks/bench_complete_maxpool.py [--n 4] [--budget 5] [--eps 0.01 0.03]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
from pathlib import Path

import torch
from torch import nn

from bounds import complete_bound


def build(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 16), nn.ReLU(),
                        nn.Linear(16, 10)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.0)
    return net


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--budget", type=float, default=5.0)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.03])
    args = ap.parse_args()
    net = build()
    x = torch.rand(args.n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    head = (f"# {datetime.date.today()} {platform.node()} {platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; n={args.n}, budget {args.budget} s/sample")
    lines = [head]
    for eps in args.eps:
        stats = {}
        for mode in ("phases", "input"):
            r = complete_bound(net, x, eps, budget_s=args.budget, tol=0.01, branching=mode, seed=0)
            closed = sum(s == "gap closed" for s in r.stop_reason) / args.n
            ratio = statistics.median((r.upper / r.lower.clamp_min(1e-12)).tolist())
            per_s = float(r.subdomains.sum()) / max(r.time, 1e-9)
            stats[mode] = (closed, ratio, per_s)
            lines.append(f"eps {eps:<6} {mode:<7} gap closed {closed:.2f}  median upper/lower {ratio:8.4f}  "
                         f"subdomains/s {per_s:8.1f}  stops {r.stop_reason}")
        p, i = stats["phases"], stats["input"]
        lines.append(f"eps {eps:<6} phases vs input: median upper/lower {p[1]:.4f} vs {i[1]:.4f} "
                     f"(x{i[1] / p[1]:.2f} tighter ratio), gap closed {p[0]:.2f} vs {i[0]:.2f}")
        print("\n".join(lines[-3:]), flush=True)
    out = Path(__file__).parent / "results" / "complete_maxpool.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
