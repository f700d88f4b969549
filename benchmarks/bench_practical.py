"""Benchmark: batched practical bound (Lanczos on Hessian-vector products) vs the naive exact Jacobian.

    python benchmarks/bench_practical.py [--batch 256] [--checkpoint DIR] [--threads N] [--device cpu|cuda]

Prints, in one run: per-sample time of ``practical_bound`` (l2, saliency) on MNIST cnn-small at batch
256; per-sample time of the naive path (torch.autograd.functional.jacobian of the saliency map for one
sample, then a full SVD) measured on ``--naive`` samples and extrapolated; the speed-up ratio; the
accuracy of sigma_max against the exact value on ``--check`` samples; peak memory; and the achieved
fraction of the machine's fp32 matmul peak (HVP FLOPs counted as ~4x forward FLOPs).
Default: a randomly initialised ReLU cnn-small (bounded through its softplus surrogate); no training.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import torch
from torch import nn


def _forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward pass per sample (2 x multiply-adds of Conv2d and Linear layers)."""
    total = [0.0]

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total[0] += 2.0 * output[0].numel() * k
        elif isinstance(module, nn.Linear):
            total[0] += 2.0 * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return total[0]


def _matmul_gflops(device: torch.device, size: int = 2048, reps: int = 5) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.mm(a, b)
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    _sync(device)
    return 2.0 * size**3 * reps / (time.perf_counter() - start) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _naive_sigma(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    """sigma_max of the exact Jacobian of the saliency map of ONE sample (x: (1, ...))."""
    from bounds.attribution import logit_gradient

    def saliency(z):
        z = z if z.requires_grad else z.requires_grad_(True)
        return logit_gradient(model, z, target, create_graph=True)

    J = torch.autograd.functional.jacobian(saliency, x)
    n = x.numel()
    return float(torch.linalg.svdvals(J.reshape(n, n).double())[0])


def _load(args, device):
    from certattr.models import build_model

    if args.checkpoint:
        from certattr.checkpoint import load

        model, origin = load(args.checkpoint, map_location=str(device)), f"checkpoint {args.checkpoint}"
    else:
        torch.manual_seed(args.seed)
        model, origin = build_model("cnn-small"), "cnn-small, RANDOM INIT (no training; pass --checkpoint)"
    model = model.to(device).eval()
    try:
        from certattr.data import load_dataset

        x, _ = load_dataset("mnist", "test")
        data = "MNIST test images"
    except (ImportError, OSError, ValueError) as exc:  # data files missing: uniform noise, say so
        gen = torch.Generator().manual_seed(args.seed)
        x, data = torch.rand(args.batch, 1, 28, 28, generator=gen), f"uniform noise ({exc.__class__.__name__})"
    return model, origin, x[: args.batch].to(device), data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--naive", type=int, default=3, help="samples timed on the naive path")
    parser.add_argument("--check", type=int, default=20, help="samples whose sigma_max is checked exactly")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--tol", type=float, default=1e-3, help="Lanczos relative residual tolerance")
    parser.add_argument("--beta", type=float, default=10.0)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sys.path.insert(0, ".")
    from bounds import practical_bound
    from bounds.practical import _has_relu, _softplus_copy

    model, origin, x, data = _load(args, device)
    print(f"model: {origin}; data: {data}; batch {x.shape[0]}; device {device}; torch threads "
          f"{torch.get_num_threads()}; eps {args.eps}; tol {args.tol}")
    peak_gflops = _matmul_gflops(device)
    practical_bound(model, x[:4], eps=args.eps, tol=args.tol, surrogate_beta=args.beta)  # warm-up

    rss0 = _peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    r = practical_bound(model, x, eps=args.eps, norm=2, attribution="saliency", tol=args.tol,
                        surrogate_beta=args.beta)
    _sync(device)
    fast = time.perf_counter() - start
    rss1 = _peak_rss_mb()
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    batch = x.shape[0]
    products = int(r.details["products"])
    row_products = int(r.details["row_products"])  # sum over products of the rows they covered
    fwd = _forward_flops(model, x)
    flops = row_products * 4.0 * fwd
    it = r.details["iterations"].float()
    print(f"practical_bound (l2, saliency, {r.network}): {fast:.3f} s for {batch} samples = "
          f"{1e3 * fast / batch:.2f} ms/sample; {products} batched J-products ({row_products / batch:.1f} "
          f"full-batch equivalents after dropping converged samples; Lanczos iterations mean "
          f"{it.mean():.1f}, max {int(it.max())}; residual max {float(r.details['residual'].max()):.1e})")
    print(f"  ~{flops / 1e9:.1f} GFLOP (4 x {fwd / 1e6:.2f} MFLOP forward per HVP) -> {flops / fast / 1e9:.1f} "
          f"GFLOP/s = {100 * flops / fast / 1e9 / peak_gflops:.1f}% of the measured fp32 matmul peak "
          f"{peak_gflops:.0f} GFLOP/s")
    mem = f"peak RSS {rss1:.0f} MiB (+{rss1 - rss0:.0f} MiB during the call)"
    if gpu_peak is not None:
        mem += f"; GPU peak allocated {gpu_peak:.0f} MiB"
    print("  memory: " + mem)

    net = _softplus_copy(model, args.beta) if _has_relu(model) else model
    n_check = min(max(args.check, args.naive), batch)
    exact, naive_times = [], []
    for i in range(n_check):
        _sync(device)
        t0 = time.perf_counter()
        exact.append(_naive_sigma(net, x[i:i + 1], r.target[i:i + 1]))
        _sync(device)
        naive_times.append(time.perf_counter() - t0)
    naive = sum(naive_times[: args.naive]) / max(1, min(args.naive, n_check))
    est = r.details["sigma_max"][:n_check].double().cpu()
    exact_t = torch.tensor(exact, dtype=torch.float64)
    rel = ((est - exact_t).abs() / exact_t).max()
    print(f"naive (autograd.functional.jacobian + full SVD, one sample at a time): {naive:.3f} s/sample "
          f"(mean of {min(args.naive, n_check)})")
    print(f"speed-up per sample: {naive / (fast / batch):.0f}x (target >= 300x)")
    print(f"sigma_max vs exact on {n_check} samples: max relative error {float(rel):.2e} (target <= 1e-2); "
          f"Lanczos estimates are lower estimates: max(est - exact)/exact = {float(((est - exact_t) / exact_t).max()):.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
