"""Practical first-order bound on the worst-case attribution deviation (Wang & Kong, CVPR 2023).

First-order model g(x + delta) ~ g(x) + J delta with J = dg/dx (n x n; the input Hessian of f_y for
saliency, diag(grad f_y) + diag(x) H for gradient x input, the Jacobian of the IG map for IG):

* l2:   ||g(x') - g(x)|| <~ eps * sigma_max(J)         (sigma_max by batched Lanczos, ``bounds.linalg``)
* linf: ||g(x') - g(x)|| <~ max_{delta in box} ||J delta||, box = [-eps, eps]^n intersected with the
  domain: [l, u] = [max(-eps, lo - x), min(eps, hi - x)] = c + D_w [-1, 1]^n.  With G = [J c, J D_w]
  (n x (n+1)) this maximum is exactly ||G||_{inf->2} (a vertex (t, s) and its negation give the same
  value), bounded above by the min of: sqrt(n) eps sigma_max (full ball) and ||J c|| + sigma_max ||w||_2,
  the column norms ||J c|| + sum_j w_j ||J[:, j]||, and the SDP relaxation of ||G||^2_{inf->2}
  (cvxpy + SCS, or the smoothed dual with L-BFGS; both certified through an exact dual point).
  Every candidate is a valid upper bound of the LINEARISED problem.
* cosine: ``tangent_cosine(euclidean, ||g(x)||)``.
* label: linearised margins m_j(x) - eps ||grad m_j(x)||_q > 0 for all j != y (q the dual norm),
  computed on the REAL network.

This bound is **practical, not sound**: the Taylor remainder is ignored, and sigma_max from Lanczos is a
lower estimate (its residual is reported).  For a network with ReLUs (zero input-Hessian a.e.) J, g(x)
and the cosine come from the softplus surrogate (ReLU -> Softplus(beta), same weights): the bound is
about the surrogate's first-order model, and ``network`` says so.  Target and label check use the real
network.  All products J v / J^T v are batched over the samples; J is never materialised except for the
column norms / SDP.  Fast path (saliency and gradient x input of a plain nn.Sequential of Linear / Conv2d /
MaxPool2d / Flatten / elementwise activations, the zoo models): ``_SequentialHessian`` computes H v by
hand-written forward-over-reverse (one tangent pass, one transposed pass; the per-layer constants s'(z),
s''(z) r and the pooling indices computed once for the batch and indexed for sub-batches), about 3x
cheaper than double backprop; any other model or attribution uses double backprop on the attribution's
graph (built once with create_graph=True).  The linearised label check uses the same hand-written
backward on the real network when it is such a Sequential.  Samples that have converged are dropped from
the batch, so the model must be in eval mode (batch statistics would otherwise change with the batch).

Measured (benchmarks/bench_practical.py --threads 1; random-init ReLU cnn-small on MNIST through its
surrogate, batch 256, tol 1e-3, a shared, loaded 2-core CPU, so timings vary by about 1.5x between runs):
4.2-6.4 ms per sample, 165-251x faster than the naive per-sample exact Jacobian + SVD (0.8-1.3 s per
sample; the autograd-only path measured 109-131x on the same machine), sigma_max within 3e-6 of exact on
20 samples.  The cost is about 33 batched Hessian-vector products (~15 ms each at batch 256) per batch,
plus 10 backward passes for the label check and the Lanczos bookkeeping (~25%).  With 2 intra-op threads
on this oversubscribed machine the same call took 80 ms per sample: pass --threads 1.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from . import linalg
from .attribution import attribution as compute_attribution
from .checks import check_attribution, check_norm, resolve_target
from .checks import check_domain as _check_domain
from .checks import check_eps as _check_eps
from .checks import check_x as _check_x
from .jacobian_products import JacobianProducts, _fast_products, _flat_layers, _SequentialHessian
from .result import BoundResult, tangent_cosine

LINF_METHODS = ("auto", "sqrt_n", "columns", "sdp", "dual")


# ---------------------------------------------------------------------------------------------- checks


# ---------------------------------------------------------------------------------------------- surrogate


def _softplus_copy(model: nn.Module, beta: float) -> nn.Module:
    """Deep copy of ``model`` with every nn.ReLU module replaced by nn.Softplus(beta) (same weights);
    its parameters are frozen (only input derivatives are needed)."""
    surrogate = copy.deepcopy(model)

    def replace(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.Softplus(beta=beta))
            else:
                replace(child)

    replace(surrogate)
    for p in surrogate.parameters():
        p.requires_grad_(False)
    return surrogate


def _has_relu(model: nn.Module) -> bool:
    return any(isinstance(m, nn.ReLU) for m in model.modules())


# ---------------------------------------------------------------------------------------------- pieces


def _sigma_max(ops: JacobianProducts, *, tol: float, max_iter: int, seed: int) -> dict:
    """sigma_max(J) per sample by Lanczos (on J if symmetric, else on J^T J), with explicit residuals."""
    x = ops.x
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    # one start vector shared by all samples: a sample's result does not depend on the rest of the batch
    v0 = torch.randn(ops.n, generator=gen, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
    v0 = v0.expand(ops.batch, ops.n).clone()
    current = [ops]

    def restrict(rows: torch.Tensor):  # rows are relative to the operator in use now
        current[0] = current[0].subset(rows)
        return current[0].jv if ops.symmetric else current[0].gram

    if ops.symmetric:
        res = linalg.lanczos_top(ops.jv, v0, tol=tol, max_iter=max_iter, largest_magnitude=True, restrict=restrict)
        sigma = res.value.abs()
        operator = "J (symmetric input Hessian): sigma_max = max |Ritz value|"
    else:
        res = linalg.lanczos_top(ops.gram, v0, tol=tol, max_iter=max_iter, restrict=restrict)
        sigma = res.value.clamp_min(0).sqrt()
        operator = "J^T J: sigma_max = sqrt(top Ritz value)"
    current.clear()  # free the last sub-batch graph
    # explicit residual of the Ritz vector on J^T J: ||J^T J v - s^2 v|| / s^2
    s2 = sigma**2
    resid = (ops.gram(res.vector) - s2.unsqueeze(1) * res.vector).norm(dim=1) / s2.clamp_min(torch.finfo(s2.dtype).tiny)
    resid = torch.where(s2 > 0, resid, torch.zeros_like(resid))
    return {"sigma": sigma, "residual": resid, "residual_estimate": res.residual, "iterations": res.iterations,
            "converged": res.converged, "operator": operator, "vector": res.vector}


def _box(x: torch.Tensor, eps: float, domain) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre c and half widths w (B, n) of [-eps, eps]^n intersected with [lo - x, hi - x] (a box
    containing 0 even if x lies outside the domain: a superset of the feasible set)."""
    flat = x.detach().reshape(x.shape[0], -1)
    if domain is None:
        return torch.zeros_like(flat), torch.full_like(flat, eps)
    lo, hi = domain
    low = (lo - flat).clamp(min=-eps, max=0.0)
    up = (hi - flat).clamp(min=0.0, max=eps)
    return (low + up) / 2, (up - low) / 2


def _linf_bounds(ops: JacobianProducts, sigma: torch.Tensor, eps: float, domain, method: str) -> dict:
    """Candidate upper bounds of max_{delta in box} ||J delta|| (each a (B,) tensor), by name."""
    n = ops.n
    centre, half = _box(ops.x, eps, domain)
    has_centre = bool((centre != 0).any())
    jc = ops.jv(centre) if has_centre else torch.zeros_like(centre)
    jc_norm = jc.norm(dim=1)
    out: dict[str, torch.Tensor] = {}
    sqrt_full = eps * math.sqrt(n) * sigma
    out["sqrt_n"] = torch.minimum(sqrt_full, jc_norm + sigma * half.norm(dim=1)) if has_centre else sqrt_full
    want_cols = method == "columns" or (method == "auto" and n <= linalg.COLUMNS_AUTO_MAX_N)
    want_dual = method == "dual" or (method == "auto" and n <= linalg.DUAL_AUTO_MAX_N)
    want_sdp = method == "sdp" or (method == "auto" and n <= linalg.SDP_AUTO_MAX_N)
    info: dict[str, object] = {}
    if want_dual or want_sdp:
        jac = linalg.explicit_jacobian(ops.jtv, ops.batch, n, dtype=ops.x.dtype, device=ops.x.device)
        colnorm = jac.norm(dim=1)
        # G = [J c, J D_w]: the linearised worst case over the box is ||G||_{inf->2}
        G = torch.cat([jc.unsqueeze(2), jac * half.unsqueeze(1)], dim=2).double().cpu().numpy()
        gram = np.einsum("bij,bik->bjk", G, G)
        out["columns"] = jc_norm + (half * colnorm).sum(1)  # free once J is explicit
        for name in ("sdp", "dual"):
            if (name == "sdp" and want_sdp) or (name == "dual" and want_dual):
                value, extra = linalg.inf_to_2_from_gram(gram, name)
                out[name] = torch.as_tensor(value, dtype=sigma.dtype, device=sigma.device)
                info[name] = extra
    elif want_cols:
        colnorm = linalg.column_norms(ops.jtv, ops.batch, n, dtype=ops.x.dtype, device=ops.x.device)
        out["columns"] = jc_norm + (half * colnorm).sum(1)
    return {"candidates": out, "solver_info": info, "Jc_norm": jc_norm, "box_centred": has_centre}


def _label_certified(model: nn.Module, x: torch.Tensor, target: torch.Tensor, eps: float, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Linearised margin test on the real network: min_j m_j - eps ||grad m_j||_q, m_j = f_y - f_j."""
    layers = _flat_layers(model)
    if layers is not None:  # the hand-written backward: C transposed passes, no autograd graph
        seq = _SequentialHessian(layers, x.detach(), target, curvature=False)
        logits = seq.logits
        num_classes = logits.shape[1]
        fy = logits.gather(1, target.view(-1, 1)).squeeze(1)
        worst = torch.full((x.shape[0],), float("inf"), dtype=logits.dtype, device=x.device)
        q = 1 if norm == "inf" else 2
        onehot_y = torch.zeros_like(logits).scatter_(1, target.view(-1, 1), 1.0)
        for j in range(num_classes):
            r = onehot_y.clone()
            r[:, j] -= 1.0
            grad = seq.backprop(r)
            lin = (fy - logits[:, j]) - eps * grad.reshape(x.shape[0], -1).norm(p=q, dim=1)
            worst = torch.where(target == j, worst, torch.minimum(worst, lin))
        if num_classes == 1:
            worst = torch.full_like(worst, float("inf"))
        return worst > 0, worst
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xg)
        num_classes = logits.shape[1]
        fy = logits.gather(1, target.view(-1, 1)).squeeze(1)
        worst = torch.full((x.shape[0],), float("inf"), dtype=logits.dtype, device=x.device)
        q = 1 if norm == "inf" else 2
        for j in range(num_classes):  # C backward passes, each for the whole batch
            margin = fy - logits[:, j]
            (grad,) = torch.autograd.grad(margin.sum(), xg, retain_graph=j < num_classes - 1)
            lin = margin.detach() - eps * grad.reshape(x.shape[0], -1).norm(p=q, dim=1)
            worst = torch.where(target == j, worst, torch.minimum(worst, lin))
    if num_classes == 1:
        worst = torch.full_like(worst, float("inf"))
    return worst > 0, worst


# ---------------------------------------------------------------------------------------------- public


def practical_bound(
    model: nn.Module,
    x: torch.Tensor,
    eps: float,
    norm: int | str = 2,
    attribution: str = "saliency",
    target: torch.Tensor | int | Sequence[int] | None = None,
    surrogate_beta: float = 10.0,
    domain: tuple[float, float] | None = (0.0, 1.0),
    ig_steps: int = 50,
    tol: float = 1e-4,
    max_iter: int = 100,
    linf_method: str = "auto",
    seed: int = 0,
) -> BoundResult:
    """First-order (practical, NOT sound) bound on ||g(x') - g(x)||_2 over B_p(x, eps), per sample.

    l2: eps sigma_max(J);  linf: min of the affordable relaxations of ||J||_{inf->2} over the box
    (``linf_method``: "auto" | "sqrt_n" | "columns" | "sdp" | "dual"; a named method is reported together
    with the free sqrt(n) bound, taking the min).  J = dg/dx of the softplus surrogate when the model has
    ReLUs.  Wang & Kong, "A Practical Upper Bound for the Worst-Case Attribution Deviations", CVPR 2023.
    """
    start = time.perf_counter()
    x = _check_x(x)
    eps = _check_eps(eps)
    norm = check_norm(norm)
    name = check_attribution(attribution)
    if linf_method not in LINF_METHODS:
        raise ValueError(f"unknown linf_method {linf_method!r}; choose from {', '.join(LINF_METHODS)}")
    domain = _check_domain(domain)
    if not (isinstance(surrogate_beta, (int, float)) and math.isfinite(surrogate_beta) and surrogate_beta > 0):
        raise ValueError(f"surrogate_beta must be a finite number > 0, got {surrogate_beta!r}")
    if int(ig_steps) < 1 or int(max_iter) < 1 or not tol > 0:
        raise ValueError("ig_steps and max_iter must be >= 1 and tol > 0")

    x = x.detach()
    target, _ = resolve_target(model, x, target)
    relu = _has_relu(model)
    net = _softplus_copy(model, float(surrogate_beta)) if relu else model
    network = f"softplus-surrogate(beta={float(surrogate_beta):g})" if relu else "real"
    label_ok, lin_margin = _label_certified(model, x, target, eps, norm)
    batch = x.shape[0]
    details: dict = {"network": network, "linearised_margin": lin_margin, "domain": domain,
                     "note": "practical first-order bound: NOT sound for finite eps (Taylor remainder ignored)"}

    layers = _flat_layers(net) if name in ("saliency", "grad_x_input") else None

    full: list = []  # the fast-path operator of the whole batch, built once; sub-batches index it

    def build(rows: torch.Tensor | None) -> tuple:
        xs = (x if rows is None else x[rows]).clone().requires_grad_(True)
        ts = target if rows is None else target[rows]
        if layers is not None:
            if not full:
                full.append(_SequentialHessian(layers, x, target))
            return _fast_products(full[0] if rows is None else full[0].subset(rows), xs, name)
        return compute_attribution(net, xs, ts, name, steps=int(ig_steps), create_graph=True), xs

    with torch.enable_grad():
        ops = JacobianProducts(build, symmetric=(name == "saliency"))
        g_norm = ops.g.detach().reshape(batch, -1).norm(dim=1)
        details["g_norm"] = g_norm
        if eps == 0.0:
            zero = torch.zeros(batch, dtype=x.dtype, device=x.device)
            details["note"] += "; eps = 0: the ball is {x}, deviation exactly 0"
            return BoundResult("practical", norm, eps, name, zero, torch.ones_like(zero), label_ok, target,
                               time.perf_counter() - start, method=_method(norm, linf_method), network=network,
                               details=details)
        sig = _sigma_max(ops, tol=float(tol), max_iter=int(max_iter), seed=seed)
        sigma = sig["sigma"]
        details.update({
            "sigma_max": sigma,
            "sigma_max_note": "Lanczos Ritz value: a LOWER estimate of sigma_max(J); see residual",
            "residual": sig["residual"], "residual_estimate": sig["residual_estimate"],
            "iterations": sig["iterations"], "converged": sig["converged"], "lanczos_operator": sig["operator"],
        })
        if norm == "2":
            euclid = eps * sigma
        else:
            lin = _linf_bounds(ops, sigma, eps, domain, linf_method)
            cands = lin["candidates"]
            names = list(cands)
            stacked = torch.stack([cands[k] for k in names])
            euclid, best = stacked.min(0)
            details.update({"linf": cands, "linf_methods": names, "linf_best": [names[i] for i in best.tolist()],
                            "linf_solver": lin["solver_info"], "Jc_norm": lin["Jc_norm"],
                            "box_centred": lin["box_centred"]})
        details["products"] = ops.counter["products"]
        details["row_products"] = ops.counter["row_products"]
    euclid = euclid.detach()
    cosine = tangent_cosine(euclid, g_norm)
    return BoundResult("practical", norm, eps, name, euclid, cosine, label_ok, target, time.perf_counter() - start,
                       method=_method(norm, linf_method), network=network, details=details)


def _method(norm: str, linf_method: str) -> str:
    return "first-order/lanczos" if norm == "2" else f"first-order/linf-{linf_method}"
