"""The float contract of a certificate: rounding-error bounds, outward margins, TF32 off (SPEC 9.1).

A certificate bounds g(x') *as torch evaluates it* in the model's dtype (float32 normally), for every
x' of the ball.  The bound propagation itself runs in float64 on the exact real-arithmetic function
(the model's formula with its float parameters); this module bounds how far torch's float evaluation
can be from that function, so every decision (ReLU phase, max-pool winner, label) and the final box
can be widened outward by a proven amount.

Error model (Higham, *Accuracy and Stability of Numerical Algorithms*, 2002, ch. 2-3): every float
operation returns (exact)(1 + delta) + eta with |delta| <= u (unit roundoff, 2^-24 for float32) and
|eta| <= eta_min (2^-150, underflow).  An inner product of k terms, in ANY summation order (so for
every BLAS / oneDNN / cuDNN-GEMM blocking), then errs by at most gamma_k (sum |w_j| |h_j|) + k eta_min
with gamma_k = k u / (1 - k u).  By induction over the layers (with E the forward error, H a bound on
|exact value|):

* affine  z = W h + b:  |z^ - z| <= |W| E_h + gamma_{k+8} (|W| (H_h + E_h) + |b|_parts) + (k+8) eta
  (k the fan-in; +8 covers a folded BatchNorm's separate scale/shift ops and the bias add;
  |b|_parts = |b| |scale| + |mean scale| + |beta| before folding cancels them);
* activation a (Lipschitz L_a):  E_out <= L_a E_in + 4 u |a| + delta_thr  (4 ulp for torch's
  elementwise functions; delta_thr = log1p(exp(-threshold)) / beta is the jump of torch's
  thresholded softplus, which we bound as the smooth softplus: this models any threshold soundly);
* max-pool: max is 1-Lipschitz in the sup norm and exact in floats: E_out = max_window E_in.

The backward pass (the attribution) in the same way, with M an upper bound on |exact upstream
gradient| and F its float error:  W^T v:  F <- |W|^T F + gamma_{m+8} |W|^T (M + F);  smooth factor
d = a'(z):  F <- (D + dD) F + dD M + u (D + dD)(M + F) with dD = L_{a'} E_z + 12 u + (1 - sigmoid(thr))
(the derivatives are at most 1, so their evaluation error is absolute);  ReLU factor and max-pool
routing: the factor box is computed from bounds widened by the forward error, so it contains the
factor that the float evaluation picks (F <- D F, exact products by 0/1; the max-pool scatter-add sums
at most k*k terms: + gamma_{kk+2} fold(M + F)).  Second-order terms (products of two errors) are
absorbed by the factor 2 of ``MARGIN_FACTOR``; our own float64 rounding is covered by using
u = u_model + depth * 2^-53 in every formula (a float64 bound propagation through depth layers errs by
at most that relative amount times the same magnitudes).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from .gradgraph import Act, Affine, Chain, MaxPool

MARGIN_FACTOR = 2.0
COMPUTE_DTYPE = torch.float64
_ELEMENTWISE_ULPS = 4.0
# a'(z^) as autograd forms it from the forward value (s (1 - s), 1 - t^2, e/(e + 1)): the 4-ulp error of
# s or t, times |a''| / |1 - 2s| <= 2, plus two roundings: 12 u (absolute: every a' here is <= 1)
_DERIVATIVE_ULPS = 12.0
# second derivatives' maxima: |sigmoid''| <= 0.0962, |tanh''| <= 0.7699, |softplus_beta''| <= beta / 4
_SECOND_DERIVATIVE = {"relu": 0.0, "sigmoid": 0.0963, "tanh": 0.77}


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2 for round-to-nearest (2^-24 for float32, 2^-53 for float64)."""
    return torch.finfo(dtype).eps / 2


def underflow_unit(dtype: torch.dtype) -> float:
    """Largest absolute rounding error of one operation in the subnormal range (half the smallest
    subnormal): 2^-150 for float32."""
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2


def check_model_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"certified bounds support float32 and float64 models, got parameters of dtype {dtype}: "
            "cast the model with .float() (its rounding errors are otherwise not modelled)"
        )


def gamma(k: float, u: float) -> float:
    """gamma_k = k u / (1 - k u): the relative error bound of a k-term inner product (Higham, Lemma 3.1)."""
    ku = k * u
    if ku >= 0.5:
        return math.inf
    return ku / (1.0 - ku)


def effective_unit(model_dtype: torch.dtype, chain: Chain) -> float:
    """u of the model's evaluation plus our own float64 propagation error (depth x 2^-53)."""
    return unit_roundoff(model_dtype) + (len(chain.ops) + 2) * unit_roundoff(COMPUTE_DTYPE)


# ----------------------------------------------------------------------------------------------
# TF32 off
# ----------------------------------------------------------------------------------------------
def _read(obj, attr: str):
    """A TF32 flag, or None where torch refuses to read it (torch 2.9+ raises once the legacy
    ``allow_tf32`` and the new ``fp32_precision`` APIs were mixed)."""
    try:
        return getattr(obj, attr)
    except (RuntimeError, AttributeError):
        return None


def _precision_objects() -> list:
    cudnn = torch.backends.cudnn
    objs = [torch.backends.cuda.matmul, cudnn, getattr(cudnn, "conv", None)]
    return [o for o in objs if o is not None and _read(o, "fp32_precision") is not None]


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Run the block with TF32 disabled for CUDA matmuls and cuDNN convolutions (Ampere and later run
    float32 in TF32, ~1e-3 relative, by default).  The caller's settings are restored afterwards, in
    whichever API (legacy ``allow_tf32`` or torch 2.9's ``fp32_precision``) they were made."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    legacy = (_read(matmul, "allow_tf32"), _read(cudnn, "allow_tf32"))
    new = {o: o.fp32_precision for o in _precision_objects()}
    try:
        matmul.allow_tf32 = False
        cudnn.allow_tf32 = False
        yield
    finally:
        if legacy[0] is not None:
            matmul.allow_tf32 = legacy[0]
        if legacy[1] is not None:
            cudnn.allow_tf32 = legacy[1]
        for obj, value in new.items():
            if _read(obj, "fp32_precision") != value:
                obj.fp32_precision = value


def tf32_off(fn: Callable) -> Callable:
    """Decorator: run ``fn`` inside ``no_tf32()`` (every certificate-computing entry point)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with no_tf32():
            return fn(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------------------------
# cache keys on the weights' content
# ----------------------------------------------------------------------------------------------
def content_fingerprint(tensors) -> str:
    """sha1 over dtype, shape and bytes of every tensor: changes whenever any weight changes, however
    it was written (``.data.copy_``, in-place SGD, a loader)."""
    h = hashlib.sha1()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def chain_fingerprint(chain: Chain) -> str:
    """Content fingerprint of the folded weights and the op structure; hashed once per parsed chain (a
    chain's ops are copies made by ``parse_chain``, so they do not change after it)."""
    cached = getattr(chain, "_fingerprint", None)
    if cached is None:
        tensors = []
        for op in chain.ops:
            if isinstance(op, Affine):
                tensors += [op.weight, op.bias]
        cached = content_fingerprint(tensors) + repr([_op_signature(op) for op in chain.ops])
        chain._fingerprint = cached
    return cached


def _op_signature(op) -> tuple:
    if isinstance(op, Affine):
        return ("affine", op.kind, op.in_shape, op.out_shape, op.stride, op.padding, op.dilation)
    if isinstance(op, Act):
        return ("act", op.name, op.beta, op.threshold, op.shape)
    if isinstance(op, MaxPool):
        return ("maxpool", op.kernel, op.stride, op.padding, op.dilation, op.in_shape)
    return ("reshape", op.in_shape, op.out_shape)


# ----------------------------------------------------------------------------------------------
# forward and backward rounding-error bounds
# ----------------------------------------------------------------------------------------------
def _mag(box) -> torch.Tensor:
    return torch.maximum(box[0].abs(), box[1].abs())


def _abs_affine(op: Affine, h: torch.Tensor) -> torch.Tensor:
    """|W| h (h >= 0)."""
    w = op.weight.abs()
    if op.kind == "linear":
        return F.linear(h, w)
    return F.conv2d(h, w, None, op.stride, op.padding, op.dilation)


def _abs_affine_t(op: Affine, v: torch.Tensor) -> torch.Tensor:
    """|W|^T v (v >= 0)."""
    return op.backward(v, op.weight.abs())


def fan_in(op: Affine) -> int:
    return int(op.weight[0].numel())


def fan_out(op: Affine) -> int:
    """Terms summed per entry of W^T v: out_features, or C_out kh kw for a transposed convolution."""
    if op.kind == "linear":
        return int(op.weight.shape[0])
    return int(op.weight.shape[0] * op.weight.shape[2] * op.weight.shape[3])


def softplus_jumps(op: Act) -> tuple[float, float]:
    """(value jump, derivative jump) of torch's softplus at beta z = threshold vs the smooth softplus:
    |softplus_thr - softplus| <= log1p(exp(-thr)) / beta, |softplus_thr' - sigmoid(beta z)| <= sigmoid(-thr)."""
    if op.name != "softplus" or math.isinf(op.threshold):
        return 0.0, 0.0
    thr = op.threshold
    value = math.log1p(math.exp(-thr)) / op.beta if thr > -700 else math.inf
    return value, 1.0 / (1.0 + math.exp(thr)) if thr < 700 else 0.0


def forward_errors(chain: Chain, bounds: list, input_error: torch.Tensor, u: float, eta: float) -> list:
    """E[i] >= |value at the input of op i as the model evaluates it - exact value| (E[-1]: logits).

    ``bounds[i]``: sound bounds on the exact input of op i (and bounds[-1] on the logits)."""
    errs = []
    e = input_error
    for i, op in enumerate(chain.ops):
        errs.append(e)
        if isinstance(op, Affine):
            k = fan_in(op) + 8
            h = _mag(bounds[i]) + e
            bmag = op.bias_magnitude if getattr(op, "bias_magnitude", None) is not None else (
                op.bias.abs() if op.bias is not None else None
            )
            rounding = _abs_affine(op, h)
            if bmag is not None:
                rounding = rounding + (bmag if op.kind == "linear" else bmag.view(-1, 1, 1))
            e = _abs_affine(op, e) + gamma(k, u) * rounding + k * eta
        elif isinstance(op, Act):
            out_mag = _mag(bounds[i + 1]) + e if op.name in ("relu", "softplus") else torch.ones_like(e)
            lip = 0.25 if op.name == "sigmoid" else 1.0
            if op.name == "relu":
                e = e.clone()  # max(z, 0) is exact and 1-Lipschitz
            else:
                e = lip * e + _ELEMENTWISE_ULPS * u * out_mag + softplus_jumps(op)[0] + eta
        elif isinstance(op, MaxPool):
            e = op.forward(e)
        else:
            e = e.reshape(e.shape[0], *op.out_shape)
    errs.append(e)
    return errs


def widen(box, err: torch.Tensor, factor: float = MARGIN_FACTOR):
    """[lo - factor err, hi + factor err]."""
    return box[0] - factor * err, box[1] + factor * err


def backward_error(
    chain: Chain, factors: list, fwd_errors: list, rows: int, u: float, eta: float, dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, F) at the input: M >= |exact d f_y / dx| and F >= |float evaluation - exact| for every factor
    value in ``factors`` (boxes of every derivative factor / routing, from widened bounds)."""
    classes = chain.num_classes
    m = torch.ones(rows, classes, dtype=dtype, device=device)  # |e_y| <= 1 (any y)
    f = torch.zeros_like(m)
    for i in range(len(chain.ops) - 1, -1, -1):
        op = chain.ops[i]
        if isinstance(op, Affine):
            k = fan_out(op) + 8
            f = _abs_affine_t(op, f) + gamma(k, u) * _abs_affine_t(op, m + f) + k * eta
            m = _abs_affine_t(op, m)
        elif isinstance(op, Act):
            dmax = _mag(factors[i])
            if op.name == "relu":
                f = dmax * f
            else:
                lip2 = op.beta / 4 if op.name == "softplus" else _SECOND_DERIVATIVE[op.name]
                dd = lip2 * fwd_errors[i] + _DERIVATIVE_ULPS * u + softplus_jumps(op)[1] + eta
                f = (dmax + dd) * f + dd * m + u * (dmax + dd) * (m + f) + eta
            m = dmax * m
        elif isinstance(op, MaxPool):
            route = factors[i][1]
            k = op.window + 2
            f = op.fold(route * f.unsqueeze(2)) + gamma(k, u) * op.fold(route * (m + f).unsqueeze(2)) + k * eta
            m = op.fold(route * m.unsqueeze(2))
        else:
            m = m.reshape(rows, *op.in_shape)
            f = f.reshape(rows, *op.in_shape)
    return m, f


def round_outward(lower: torch.Tensor, upper: torch.Tensor, dtype: torch.dtype):
    """Cast a box to ``dtype`` without shrinking it (next float outward where the cast rounded inward)."""
    lo, hi = lower.to(dtype), upper.to(dtype)
    inf = torch.tensor(math.inf, dtype=dtype, device=lo.device)
    lo = torch.where(lo.to(lower.dtype) > lower, torch.nextafter(lo, -inf), lo)
    hi = torch.where(hi.to(upper.dtype) < upper, torch.nextafter(hi, inf), hi)
    return lo, hi


def round_up(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return round_outward(value, value, dtype)[1]


def round_down(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return round_outward(value, value, dtype)[0]
