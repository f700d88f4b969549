"""Linear algebra for the practical bound: the top singular value of J and the inf->2 norm relaxations.

Everything works on *batches* of independent operators (one per sample): a matvec maps (B, n) -> (B, n).

* ``lanczos_top``: batched Lanczos with full re-orthogonalisation on a symmetric operator S
  (S = J for a symmetric J, e.g. the input Hessian of saliency; S = J^T J otherwise).  The Ritz value is
  a LOWER estimate of the extreme eigenvalue (Ritz values lie inside the spectrum); the residual
  ||S y - theta y|| bounds the distance of theta to the spectrum (Bauer-Fike), so stopping at
  residual <= tol |theta| makes theta within relative tol of an eigenvalue of S.
* ``power_iteration``: the plain batched power method on a PSD operator (a simple cross-check).
* ``column_norms`` / ``explicit_jacobian``: n vector-Jacobian products (rows of J, basis e_i).
* ``||J||_{inf->2} = max_{||s||_inf <= 1} ||J s||_2`` is NP-hard; valid upper bounds used here:
  - ``sqrt(n) sigma_max(J)``  (||s||_2 <= sqrt(n) ||s||_inf);
  - ``sum_j ||J[:, j]||_2``   (triangle inequality over s = sum_j s_j e_j);
  - the SDP relaxation ``max tr(A X) s.t. diag(X) <= 1, X PSD`` with A = J^T J, whose square root bounds
    ||J||_{inf->2} (X = s s^T is feasible) within a factor sqrt(pi/2) (Nesterov 1998).
    Its dual is ``min sum(d) s.t. Diag(d) - A PSD`` (d >= 0 then holds automatically since A is PSD),
    and for ANY y the point d = y + lambda_max(A - Diag(y)) 1 is dual feasible, so
    ``U(y) = sum(y) + n lambda_max(A - Diag(y))`` is a valid upper bound of the SDP value for every y
    (weak duality: tr(AX) <= tr(Diag(d) X) = sum_i d_i X_ii <= sum(d)).
    ``sdp_bound`` solves the primal with cvxpy + SCS and certifies SCS's (approximate) dual multipliers
    through U(y); ``dual_bound`` minimises a log-sum-exp smoothing of U with scipy L-BFGS-B and returns
    the exact U at the best point visited: both return valid upper bounds whatever the solver accuracy.
  The columns bound is itself a dual point: y_j = S c_j with c_j = ||J[:, j]||, S = sum_j c_j gives
  U(y) = S^2 (Cauchy-Schwarz), and y = 0 gives n sigma_max^2; the dual starts from the better one, so it
  is never worse than either.

Measured costs (this shared 2-core CPU under heavy load, one thread, float64, one sample each):
  sdp  (cvxpy 1.9 + SCS, eps 1e-5)   n = 10: ~0.05 s, n = 49: 0.6-2.4 s, n = 100: 4-20 s, n = 196: 10-45 s
  dual (L-BFGS-B, 3 temperatures)    n = 49: 0.4-1.4 s, n = 100: 0.5-1.8 s, n = 196: 1.4-3.9 s, n = 784: 83 s
  (about 300 exact eigen-decompositions per sample; the dual value matched SCS's certified value to
  within 1e-5 relative at n = 49..196 and improves on the best cheap dual point by about 18%)
  columns (n VJPs for the whole batch): cnn-small on MNIST (n = 784): 0.39 s per sample at batch 32,
  and there it is about 7x looser than sqrt(n) sigma_max (a dense Hessian), so "auto" skips it.
  Lanczos l2 bound for comparison: cnn-small, MNIST, batch 256: about 4-6 ms per sample.
``lanczos_top`` tests convergence every ``check_every`` (2) iterations (and wherever a breakdown is
possible), which halves the small eigen-decompositions for at most one extra product per sample, and
re-orthogonalises a second time only where DGKS asks for it.
"auto" therefore runs: sqrt_n always; explicit J (n VJPs), columns and the dual for n <= 256
(``DUAL_AUTO_MAX_N``, ``COLUMNS_AUTO_MAX_N``); SCS only for n <= 16 (``SDP_AUTO_MAX_N``: it gives the
same value as the dual and is slower).  ``linf_method="sdp"`` / ``"dual"`` / ``"columns"`` run at any n
when asked explicitly.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]

#: largest n for which ``linf_method="auto"`` runs the cvxpy/SCS SDP (the dual gives the same value faster)
SDP_AUTO_MAX_N = 16
#: largest n for which ``linf_method="auto"`` runs the smoothed dual (about 1-2 s per sample at n = 196..256)
DUAL_AUTO_MAX_N = 256
#: largest n for which ``linf_method="auto"`` computes the column norms (n products for the batch)
COLUMNS_AUTO_MAX_N = 256


@dataclass
class EigResult:
    """Per-sample result of an iterative extreme-eigenvalue solve (all tensors of shape (B,) or (B, n))."""

    value: torch.Tensor        # Ritz value (lower estimate of the extreme |eigenvalue|)
    vector: torch.Tensor       # unit Ritz vector, (B, n)
    residual: torch.Tensor     # ||S y - theta y|| / |theta| (estimate from the recurrence)
    iterations: torch.Tensor   # matvecs used until this sample converged (int64)
    converged: torch.Tensor    # bool


#: DGKS re-orthogonalisation threshold: repeat Gram-Schmidt when the norm dropped below this fraction
_DGKS = 1.0 / math.sqrt(2.0)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


@contextmanager
def _one_thread():
    """Run tiny CPU LAPACK calls on one thread: batched eigh of small matrices is up to 100x slower with
    several OpenMP threads on an oversubscribed machine (measured: 1.5 s vs 15 ms for 64 40x40)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _small_eigh(tri: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a batch of small symmetric (tridiagonal) float64 matrices, on the CPU
    (results stay on the CPU)."""
    with _one_thread():
        return torch.linalg.eigh(tri.cpu())


def lanczos_top(matvec: MatVec, v0: torch.Tensor, *, tol: float = 1e-4, max_iter: int = 100,
                largest_magnitude: bool = False,
                restrict: Callable[[torch.Tensor], MatVec] | None = None, shrink: float = 0.5,
                check_every: int = 2) -> EigResult:
    """Extreme eigenvalue of a batch of symmetric operators by Lanczos with full re-orthogonalisation.

    ``largest_magnitude=False``: the largest algebraic eigenvalue (use on PSD J^T J);
    ``True``: the eigenvalue of largest |.| (use on a symmetric J: sigma_max(J) = max |lambda(J)|).
    Sample b stops (its values are frozen) once ``beta_k |s_k| <= tol |theta|`` (Paige's residual
    estimate; with ``largest_magnitude`` for the Ritz values at both ends of the spectrum) or its Krylov
    space is invariant; the batch stops when every sample has stopped.
    ``restrict(rows)``, if given, returns the operator for a subset of the current rows; it is called
    when at most ``shrink`` of the current rows are still iterating, so finished samples stop costing
    matvecs (the result is the same as without it: samples never interact).
    ``check_every``: the Ritz values are computed (and the stopping test made) every ``check_every``
    iterations, at the last one, and at any iteration where beta_k is small enough for a breakdown; a
    per-sample schedule, so results still do not depend on the rest of the batch (1: every iteration).
    """
    batch, n = v0.shape
    dtype, device = v0.dtype, v0.device
    tiny = torch.finfo(dtype).eps
    max_iter = max(1, min(int(max_iter), n))
    q = _unit(v0)
    basis = torch.empty(batch, max_iter, n, dtype=dtype, device=device)
    tri = torch.zeros(batch, max_iter, max_iter, dtype=torch.float64)  # the Lanczos tridiagonals, on the CPU
    rows = torch.arange(batch)                      # global sample id of each current row
    live = torch.ones(batch, dtype=torch.bool)      # current rows still iterating
    out_val = torch.zeros(batch, dtype=torch.float64)
    out_res = torch.full((batch,), float("inf"), dtype=torch.float64)
    out_it = torch.full((batch,), max_iter, dtype=torch.int64)
    out_vec = q.clone()
    conv = torch.zeros(batch, dtype=torch.bool)
    beta_prev = None
    gersh = torch.zeros(batch, dtype=torch.float64)
    for k in range(max_iter):
        basis[:, k] = q
        w = matvec(q)
        alpha = (q * w).sum(1)
        w = w - alpha.unsqueeze(1) * q
        if beta_prev is not None:
            w = w - beta_prev.unsqueeze(1) * basis[:, k - 1]
        used = basis[:, : k + 1]
        # full re-orthogonalisation (classical Gram-Schmidt); a second pass only where the first one
        # removed more than 1 - 1/sqrt(2) of the norm (the DGKS criterion: "twice is enough", Parlett)
        before = w.norm(dim=1)
        w = w - torch.bmm(torch.bmm(used, w.unsqueeze(2)).transpose(1, 2), used).squeeze(1)
        beta = w.norm(dim=1)
        again = beta < _DGKS * before
        if bool(again.any()):
            sel = again.nonzero().squeeze(1)
            ws = w[sel]
            w[sel] = ws - torch.bmm(torch.bmm(used[sel], ws.unsqueeze(2)).transpose(1, 2), used[sel]).squeeze(1)
            beta = w.norm(dim=1)
        beta_prev = beta
        tri[:, k, k] = alpha.double().cpu()
        beta_cpu = beta.double().cpu()
        if k + 1 < max_iter:
            tri[:, k, k + 1] = beta_cpu
            tri[:, k + 1, k] = beta_cpu
        # Gershgorin bound on |theta| (>= the spectral radius of the tridiagonal), for the breakdown test
        row_sum = tri[:, k, k].abs() + beta_cpu + (tri[:, k, k - 1].abs() if k > 0 else 0.0)
        gersh = torch.maximum(gersh, row_sum)
        # Ritz values of the (k+1) x (k+1) leading blocks of the live rows that are due for a convergence
        # test: every ``check_every``-th iteration, the last one, and wherever the Krylov space may have
        # become invariant (a per-row decision, so a sample's result never depends on the batch)
        if check_every <= 1 or (k + 1) % check_every == 0 or k + 1 == max_iter:  # k + 1 == n is max_iter
            due = live
        else:
            due = live & (beta_cpu <= 100 * tiny * gersh)
        idx_live = due.nonzero().squeeze(1)
        if idx_live.numel() == 0:
            live_dev = live.to(device)
            q = torch.where(live_dev.unsqueeze(1), w / beta.clamp_min(torch.finfo(dtype).tiny).unsqueeze(1),
                            torch.zeros_like(w))
            beta_prev = beta
            continue
        evals, evecs = _small_eigh(tri[idx_live, : k + 1, : k + 1])
        pick = evals.abs().argmax(1) if largest_magnitude else evals.argmax(1)
        theta = evals.gather(1, pick.view(-1, 1)).squeeze(1)
        s = evecs.gather(2, pick.view(-1, 1, 1).expand(-1, k + 1, 1)).squeeze(2)  # (L, k+1)
        b_live = beta_cpu[idx_live]
        res_abs = b_live * s[:, -1].abs()
        scale = theta.abs().clamp_min(1e-300)
        if largest_magnitude:
            # both ends must be resolved: a converged Ritz value at one end says nothing about the other
            # end still growing (measured: 3% under-estimates on MNIST Hessians with lambda_min ~ -lambda_max)
            res_test = (b_live.unsqueeze(1) * evecs[:, -1, [0, -1]].abs()).amax(1)
        else:
            res_test = res_abs
        # invariant Krylov space (exact breakdown, or the whole space spanned): the Ritz value is exact
        invariant = (b_live <= 100 * tiny * scale) | (k + 1 == n)
        ok = (res_test <= tol * scale) | invariant
        done = ok | (k + 1 == max_iter)
        if bool(done.any()):
            loc = idx_live[done]                     # current-row indices
            glob = rows[loc]                         # sample ids
            loc_dev = loc.to(device)
            vec = torch.bmm(s[done].to(device=device, dtype=dtype).unsqueeze(1), basis[loc_dev, : k + 1])
            out_vec[glob.to(device)] = _unit(vec.squeeze(1))
            out_val[glob] = theta[done]
            out_res[glob] = (res_abs / scale)[done]
            out_it[glob] = k + 1
            conv[glob] = ok[done]
            live[loc] = False
        if not bool(live.any()):
            break
        # finished rows get a zero vector (their values are final; zero keeps the batch finite)
        live_dev = live.to(device)
        q = torch.where(live_dev.unsqueeze(1), w / beta.clamp_min(torch.finfo(dtype).tiny).unsqueeze(1),
                        torch.zeros_like(w))
        if restrict is not None and int(live.sum()) <= shrink * live.numel():
            keep = live.nonzero().squeeze(1)
            keep_dev = keep.to(device)
            matvec = restrict(keep_dev)
            rows, live, gersh = rows[keep], live[keep], gersh[keep]
            # copy only the filled part of the basis / tridiagonals (the buffers are sized for max_iter)
            new_basis = torch.empty(len(keep), max_iter, n, dtype=dtype, device=device)
            new_basis[:, : k + 1] = basis[keep_dev, : k + 1]
            new_tri = torch.zeros(len(keep), max_iter, max_iter, dtype=torch.float64)
            new_tri[:, : k + 2, : k + 2] = tri[keep, : k + 2, : k + 2]
            basis, tri, q, beta_prev = new_basis, new_tri, q[keep_dev], beta_prev[keep_dev]
    return EigResult(out_val.to(device=device, dtype=dtype), out_vec, out_res.to(device=device, dtype=dtype),
                     out_it.to(device), conv.to(device))


def power_iteration(matvec: MatVec, v0: torch.Tensor, *, tol: float = 1e-4, max_iter: int = 1000) -> EigResult:
    """Largest eigenvalue of a batch of PSD operators by the power method (Rayleigh quotient v^T S v).

    Stops a sample when ``||S v - theta v|| <= tol theta``; slower than Lanczos (rate lambda_2/lambda_1)."""
    v = _unit(v0)
    batch = v.shape[0]
    device = v.device
    frozen = torch.zeros(batch, dtype=torch.bool, device=device)
    out_val = torch.zeros(batch, dtype=v.dtype, device=device)
    out_res = torch.full((batch,), float("inf"), dtype=v.dtype, device=device)
    out_it = torch.full((batch,), max_iter, dtype=torch.int64, device=device)
    out_vec = v.clone()
    for k in range(int(max_iter)):
        w = matvec(v)
        theta = (v * w).sum(1)
        res = (w - theta.unsqueeze(1) * v).norm(dim=1) / theta.abs().clamp_min(torch.finfo(v.dtype).tiny)
        done_now = ~frozen & ((res <= tol) | (w.norm(dim=1) == 0) | (k + 1 == max_iter))
        out_val = torch.where(done_now, theta, out_val)
        out_res = torch.where(done_now, res, out_res)
        out_it = torch.where(done_now, torch.full_like(out_it, k + 1), out_it)
        out_vec = torch.where(done_now.unsqueeze(1), v, out_vec)
        frozen = frozen | done_now
        if bool(frozen.all()):
            break
        v = _unit(w)
    return EigResult(out_val, out_vec, out_res, out_it, out_res <= tol)


def explicit_jacobian(jtv: MatVec, batch: int, n: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """J (B, n, n) from n vector-Jacobian products: row i of J is (J^T e_i)^T, all samples at once."""
    rows = torch.empty(batch, n, n, dtype=dtype, device=device)
    basis = torch.zeros(batch, n, dtype=dtype, device=device)
    for i in range(n):
        basis.zero_()
        basis[:, i] = 1
        rows[:, i] = jtv(basis)
    return rows


def column_norms(jtv: MatVec, batch: int, n: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """||J[:, j]||_2 for every column j (B, n), accumulated over the n rows J^T e_i without storing J."""
    acc = torch.zeros(batch, n, dtype=dtype, device=device)
    basis = torch.zeros(batch, n, dtype=dtype, device=device)
    for i in range(n):
        basis.zero_()
        basis[:, i] = 1
        acc += jtv(basis) ** 2
    return acc.sqrt()


# ----------------------------------------------------------------------------------------------
# inf -> 2 relaxations on explicit Gram matrices A = J^T J (numpy float64, (B, n, n))


def _eigh_np(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy-in, numpy-out symmetric eigen-decomposition through torch on one thread (small matrices:
    multi-threaded LAPACK is much slower on a busy machine)."""
    with _one_thread():
        lam, vec = torch.linalg.eigh(torch.from_numpy(np.ascontiguousarray(mat)))
    return lam.numpy(), vec.numpy()


def dual_value(gram: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact valid SDP upper bound U(y) = sum(y) + n lambda_max(A - Diag(y)) for each sample (B,)."""
    n = gram.shape[-1]
    shifted = gram - _diag(y)
    with _one_thread():
        top = torch.linalg.eigvalsh(torch.from_numpy(np.ascontiguousarray(shifted))).numpy()[..., -1]
    return y.sum(-1) + n * top


def _diag(y: np.ndarray) -> np.ndarray:
    out = np.zeros(y.shape + (y.shape[-1],), dtype=y.dtype)
    idx = np.arange(y.shape[-1])
    out[..., idx, idx] = y
    return out


def _start_points(gram: np.ndarray) -> np.ndarray:
    """The best of three cheap dual points per sample: 0 (n sigma^2), S c (columns^2), diag(A) shift."""
    diag = np.clip(np.diagonal(gram, axis1=-2, axis2=-1), 0, None)
    cols = np.sqrt(diag)
    cands = [np.zeros_like(diag), cols.sum(-1, keepdims=True) * cols, diag.copy()]
    values = np.stack([dual_value(gram, c) for c in cands])          # (3, B)
    best = values.argmin(0)
    return np.stack([cands[best[b]][b] for b in range(gram.shape[0])])


def dual_bound(gram: np.ndarray, *, taus: tuple[float, ...] = (30.0, 1e3, 3e4), max_iter: int = 100,
               tol: float = 1e-10) -> tuple[np.ndarray, dict]:
    """Smoothed-dual certificate of the SDP value max tr(AX), diag X <= 1, X PSD, for a batch (B, n, n).

    Per sample, minimises F_tau(y) = sum(y) + (n / tau) log sum_i exp(tau lambda_i(A - Diag y)) (>= U(y))
    with scipy L-BFGS-B for an increasing temperature tau (A scaled to unit mean diagonal), warm-started
    from the best cheap dual point.  Returns the exact U(y) at the best point visited (a valid upper
    bound of the SDP value whatever the optimiser did) and solver info.  Samples are solved one by one
    (an L-BFGS run per sample keeps each result independent of the rest of the batch).
    """
    gram = np.asarray(gram, dtype=np.float64)
    gram = 0.5 * (gram + np.swapaxes(gram, -1, -2))
    batch = gram.shape[0]
    scale = np.maximum(np.diagonal(gram, axis1=-2, axis2=-1).mean(-1), 1e-300)  # (B,)
    mat = gram / scale[:, None, None]
    starts = _start_points(mat)
    start_value = dual_value(mat, starts)
    values = np.empty(batch)
    evaluations, status = [], []
    for b in range(batch):  # scipy's L-BFGS solves one problem at a time
        value, nfev, msg = _dual_one(mat[b], starts[b], taus, max_iter, tol)
        values[b] = value
        evaluations.append(nfev)
        status.append(msg)
    info = {"start_value": start_value * scale, "evaluations": evaluations, "status": status}
    return np.maximum(values, 0.0) * scale, info


def _dual_one(mat: np.ndarray, y0: np.ndarray, taus, max_iter: int, tol: float) -> tuple[float, int, str]:
    from scipy.optimize import minimize

    n = mat.shape[0]
    idx = np.arange(n)
    best_y = y0.copy()
    best = [float(dual_value(mat[None], y0[None])[0])]
    count = [0]

    def fun(y: np.ndarray, tau: float):
        shifted = mat.copy()
        shifted[idx, idx] -= y
        lam, vec = _eigh_np(shifted)
        count[0] += 1
        top = lam[-1]
        exact = y.sum() + n * top
        if exact < best[0]:
            best[0] = float(exact)
            best_y[:] = y
        z = np.exp(tau * (lam - top))
        zsum = z.sum()
        value = y.sum() + n * (top + np.log(zsum) / tau)
        grad = 1.0 - n * ((vec ** 2) @ (z / zsum))
        return value, grad

    msgs = []
    for tau in taus:
        res = minimize(fun, best_y.copy(), args=(tau,), jac=True, method="L-BFGS-B",
                       options={"maxiter": int(max_iter), "ftol": tol, "gtol": 1e-12})
        msgs.append(f"tau={tau:g}:{res.nit}")
    return best[0], count[0], " ".join(msgs)


def sdp_bound(gram: np.ndarray, *, solver_eps: float = 1e-5, max_iters: int = 20000) -> tuple[np.ndarray, dict]:
    """SDP value max tr(AX), diag(X) <= 1, X PSD by cvxpy + SCS, one problem per sample; the returned
    value is U(y) at SCS's dual multipliers y of diag(X) <= 1 (valid even when SCS is inaccurate), and
    never worse than the best cheap dual point."""
    import cvxpy as cp

    gram = np.asarray(gram, dtype=np.float64)
    gram = 0.5 * (gram + np.swapaxes(gram, -1, -2))
    batch, n, _ = gram.shape
    scale = np.maximum(np.diagonal(gram, axis1=-2, axis2=-1).mean(-1), 1e-300)
    mat = gram / scale[:, None, None]
    fallback = _start_points(mat)
    values = dual_value(mat, fallback)
    primal, statuses = np.full(batch, np.nan), []
    for b in range(batch):  # one SDP per sample: cvxpy has no batched solve
        X = cp.Variable((n, n), PSD=True)
        cons = [cp.diag(X) <= 1]
        prob = cp.Problem(cp.Maximize(cp.trace(mat[b] @ X)), cons)
        try:
            prob.solve(solver=cp.SCS, eps=solver_eps, max_iters=max_iters)
        except cp.error.SolverError as exc:  # keep the fallback dual point
            statuses.append(f"solver error: {exc}")
            continue
        statuses.append(str(prob.status))
        if cons[0].dual_value is not None:
            y = np.asarray(cons[0].dual_value, dtype=np.float64).reshape(1, n)
            values[b] = min(values[b], float(dual_value(mat[b:b + 1], y)[0]))
            primal[b] = float(prob.value) if prob.value is not None else np.nan
    return np.maximum(values, 0.0) * scale, {"status": statuses, "scs_primal": primal * scale}


def inf_to_2_from_gram(gram: np.ndarray, method: str) -> tuple[np.ndarray, dict]:
    """Upper bound on ||J||_{inf->2} = sqrt(SDP value) from A = J^T J by "sdp" or "dual"."""
    if method == "sdp":
        value, info = sdp_bound(gram)
    elif method == "dual":
        value, info = dual_bound(gram)
    else:
        raise ValueError(f"unknown SDP method {method!r}")
    return np.sqrt(value), info


def brute_force_inf_to_2(jac: np.ndarray) -> float:
    """Exact ||J||_{inf->2} = max over the 2^n sign vectors of ||J s||_2 (n <= 20; for tests)."""
    n = jac.shape[1]
    if n > 20:
        raise ValueError("brute force needs n <= 20")
    signs = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * 2.0 - 1.0
    return float(math.sqrt(((signs @ jac.T) ** 2).sum(1).max()))
