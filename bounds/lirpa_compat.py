"""Import auto_LiRPA (Xu et al., NeurIPS 2020) on current torch / numpy, patching 0.3 where needed.

auto_LiRPA 0.3 (the newest release on PyPI, 2022) was written for torch < 1.13.  On torch 2.x it
misses four things that this module restores *before* importing it, each only when missing:

* ``torch.onnx.symbolic_helper._set_opset_version``: sets the opset on the TorchScript exporter's
  ``GLOBALS`` object (``torch.onnx._internal.torchscript_exporter._globals`` in torch 2.9+);
* ``torch._C.Node.__getitem__``: attribute access by name, dispatched on ``Node.kindOf(name)``;
* ``BoundedModule._named_members(..., remove_duplicate=)``: torch 2 passes that keyword;
* ``numpy.lib.arraysetops``: removed in numpy 2; auto_LiRPA imports it but never uses it.

It also adds the linear relaxation that 0.3 lacks for ``Softplus`` (ONNX ``Softplus``, beta = 1;
torch exports ``nn.Softplus(beta)`` as ``Div(Softplus(Mul(x, beta)), beta)``): softplus is
convex, so on [l, u] the chord lies above it and the tangent at the midpoint below it.

For speed it also computes 0.3's tanh/sigmoid tangent tables once per process (0.3 recomputes them,
5-15 s, for every Tanh/Sigmoid node), and runs its float64 CPU transposed convolutions in chunks of
rows (the same values, a bounded column buffer: ``_chunked_conv_transpose``).  A newer auto_LiRPA (>= 0.4, installed from git) is imported
as it is.  Tested on torch 2.2 - 2.13.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types
from typing import Any

import torch

_PATCHED_VERSION = "0.3"
_state: dict[str, Any] = {}


def _installed_version() -> str | None:
    for dist in ("auto_LiRPA", "auto-lirpa", "auto_lirpa"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _needs_patches(version: str | None) -> bool:
    if version is None:  # a source checkout without metadata: decide by the package's own version later
        return True
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 2:
        parts.append(0)
    return tuple(parts) < (0, 4)


def _patch_torch_and_numpy() -> None:
    # the module itself (torch.onnx's attribute of that name is not always the same object)
    symbolic_helper = importlib.import_module("torch.onnx.symbolic_helper")

    if not hasattr(symbolic_helper, "_set_opset_version"):
        try:
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
        except ImportError:  # torch < 2.9
            from torch.onnx._globals import GLOBALS  # type: ignore[no-redef]

        def _set_opset_version(opset_version: int) -> None:
            GLOBALS.export_onnx_opset_version = int(opset_version)

        symbolic_helper._set_opset_version = _set_opset_version

    node_cls = torch._C.Node
    if not hasattr(node_cls, "__getitem__"):

        def _node_getitem(node, name: str):
            # kindOf returns the accessor's name: "f", "fs", "i", "is", "s", "ss", "t", "ts", "g", ...
            return getattr(node, node.kindOf(name))(name)

        node_cls.__getitem__ = _node_getitem

    try:
        importlib.import_module("numpy.lib.arraysetops")
    except ImportError:
        import numpy

        stub = types.ModuleType("numpy.lib.arraysetops")
        stub.isin = numpy.isin
        sys.modules["numpy.lib.arraysetops"] = stub


def _patch_bounded_module(auto_lirpa) -> None:
    cls = auto_lirpa.BoundedModule
    original = cls._named_members
    if getattr(original, "_certattr_patched", False):
        return

    def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
        return original(self, get_members_fn, prefix=prefix, recurse=recurse)

    _named_members._certattr_patched = True
    cls._named_members = _named_members
    cls.check_IBP_intermediate = _check_ibp_intermediate


def _check_ibp_intermediate(self, node) -> bool:
    """auto_LiRPA 0.3's ``check_IBP_intermediate`` with its soundness bug fixed.

    It walks from ``node`` back through ``ibp_intermediate`` operators to a node with known bounds and
    propagates intervals forward, but 0.3 stores each result on that *base* node
    (``node.interval = self.IBP_general(n)``), overwriting the base's interval with a later node's: a
    second chain from the same base then starts from the wrong interval (found by certattr's fuzz
    suite: CROWN boxes on the gradient graph of a sigmoid -> tanh net missed sampled points by 0.06).
    Here each result goes to its own node, and the base starts from its known (lower, upper)."""
    nodes = []
    while not hasattr(node, "lower") or not hasattr(node, "upper"):
        if type(node) not in self.ibp_intermediate:
            return False
        nodes.append(node)
        node = node.inputs[0]
    if not hasattr(node, "interval"):
        node.interval = (node.lower, node.upper)
    for n in reversed(nodes):
        n.interval = self.IBP_general(n)
        n.lower, n.upper = n.interval
    return True


# float64 transposed convolutions on CPU (torch's slow_conv_transpose2d) zero a column buffer of
# (batch, C_out kh kw, H W) doubles: at most this many bytes of it per call
_COLUMN_BYTES = 32 << 20


def _chunked_conv_transpose(auto_lirpa) -> None:
    """auto_LiRPA's BoundConv turns matrix-mode coefficients (spec x batch rows) into the previous
    layer's with one ``F.conv_transpose2d`` over all rows.  In float64 on CPU torch runs it as
    slow_conv_transpose2d, which first allocates and zeroes a column buffer for every row at once
    (cnn-small: 3200 x 256 x 49 doubles, 321 MB, page-faulted on every call).  Here the rows go through
    in chunks whose buffer stays under ``_COLUMN_BYTES`` (kept in the heap, ``heap.retained_heap``):
    every row is computed alone in either case (a per-sample gemm and col2im), so the values are the
    same bytes (checked in tests/test_speed_paths.py); other dtypes and devices are left alone."""
    from auto_LiRPA.operators import convolution

    if getattr(convolution, "_certattr_chunked", False):
        return
    functional = torch.nn.functional
    proxy = types.SimpleNamespace(**{k: getattr(functional, k) for k in dir(functional) if not k.startswith("__")})

    def conv_transpose2d(inp, weight, *args, **kwargs):
        if inp.dtype != torch.float64 or inp.device.type != "cpu" or inp.dim() != 4 or inp.shape[0] < 2:
            return functional.conv_transpose2d(inp, weight, *args, **kwargs)
        per_row = 8 * int(weight[0].numel()) * int(inp.shape[2] * inp.shape[3])  # C_out/groups x kh x kw x H W
        rows = max(1, _COLUMN_BYTES // max(1, per_row))
        if rows >= inp.shape[0]:
            return functional.conv_transpose2d(inp, weight, *args, **kwargs)
        first = functional.conv_transpose2d(inp[:rows], weight, *args, **kwargs)
        out = first.new_empty(inp.shape[0], *first.shape[1:])  # chunks written in place: one output alive
        out[:rows] = first
        del first
        for i in range(rows, inp.shape[0], rows):
            out[i : i + rows] = functional.conv_transpose2d(inp[i : i + rows], weight, *args, **kwargs)
        return out

    proxy.conv_transpose2d = conv_transpose2d
    convolution.F = proxy
    convolution._certattr_chunked = True


def _softplus_relaxation(auto_lirpa) -> None:
    """Linear bounds for softplus(x) = log(1 + e^x) on [l, u] (convex): upper = chord through
    (l, f(l)), (u, f(u)); lower = tangent at the midpoint m: f(m) + sigmoid(m) (x - m)."""
    from auto_LiRPA.operators import activation

    cls = activation.BoundSoftplus
    if getattr(cls, "_certattr_relaxation", False):
        return

    def bound_relax(self, x):
        lower, upper = x.lower, x.upper
        f = torch.nn.functional.softplus
        f_l, f_u = f(lower), f(upper)
        width = upper - lower
        close = width < 1e-6
        slope_chord = torch.where(close, torch.sigmoid(upper), (f_u - f_l) / width.clamp_min(1e-6))
        # chord above (for a (nearly) zero width: the line through (l, f(l)) with slope f'(u) >= chord)
        self.add_linear_relaxation(mask=None, type="upper", k=slope_chord, x0=lower, y0=f_l)
        mid = (lower + upper) / 2
        self.add_linear_relaxation(mask=None, type="lower", k=torch.sigmoid(mid), x0=mid, y0=f(mid))

    cls.bound_relax = bound_relax
    cls._certattr_relaxation = True


def _tangent_tables(func, dfunc, step: float, count: int, device, iters: int = 40):
    """Tangent points for the S-shaped relaxations (tanh, sigmoid), for the grid u_i = i * step:

    lower[i] <= 0: the point nearest 0 whose tangent lies below f at u_i (then below f on [l, u_i]
    for any l <= 0: f is convex left of 0, concave right of it);  upper[i] >= 0: the mirror image, a
    tangent above f at -u_i.  Bisection that keeps the valid end point (checked in the working dtype)."""
    u = step * torch.arange(count, device=device)
    f_u, f_mu = func(u), func(-u)

    def below(d):
        return dfunc(d) * (u - d) + func(d) <= f_u

    def above(d):
        return dfunc(d) * (-u - d) + func(d) >= f_mu

    return _bisect_valid(below, -torch.ones_like(u), iters), _bisect_valid(above, torch.ones_like(u), iters)


def _bisect_valid(ok_at, start: torch.Tensor, iters: int) -> torch.Tensor:
    """Per entry, the point nearest 0 on the side of ``start`` where ``ok_at`` holds: double ``start``
    until it holds everywhere, then bisect between it and 0 keeping the end where it holds."""
    valid = start
    while True:
        ok = ok_at(valid)
        if bool(ok.all()):
            break
        valid = torch.where(ok, valid, 2 * valid)
    invalid = torch.zeros_like(start)
    for _ in range(iters):
        mid = (valid + invalid) / 2
        ok = ok_at(mid)
        valid, invalid = torch.where(ok, mid, valid), torch.where(ok, invalid, mid)
    return valid


def _cache_s_shaped_tables(auto_lirpa) -> None:
    """0.3 recomputes the tangent tables of tanh / sigmoid (50,000 points, 100 bisection steps: 5-15 s
    on a CPU) for *every* Tanh/Sigmoid node it builds.  The tables depend only on the function:
    compute them once per (function, limit, device), with 40 bisection steps (the kept end point is
    valid after any number of steps; 40 halvings already reach float32 resolution), and share them."""
    from auto_LiRPA.operators import activation

    cls = activation.BoundTanh
    if getattr(cls.precompute_relaxation, "_certattr_patched", False):
        return
    cache: dict[tuple, tuple] = {}

    @torch.no_grad()
    def precompute_relaxation(self, name, func, dfunc, x_limit=500):
        device = getattr(self, "device", None)
        key = (name, float(x_limit), str(device), torch.get_default_dtype())  # tables in the run's dtype
        if key not in cache:
            step = 0.01
            count = int(x_limit / step) + 5
            lower, upper = _tangent_tables(func, dfunc, step, count, device)
            cache[key] = (x_limit, step, int(x_limit / step), lower, upper)
        self.x_limit, self.step_pre, self.num_points_pre, self.d_lower, self.d_upper = cache[key]

    precompute_relaxation._certattr_patched = True
    cls.precompute_relaxation = precompute_relaxation


def custom_ops() -> dict:
    """auto_LiRPA Bound classes of certattr's own ONNX ops (``certattr::ConvAdjoint``,
    ``certattr::Product``), registered with auto_LiRPA on import; also accepted as
    ``BoundedModule(..., custom_ops=custom_ops())``."""
    import_auto_lirpa()
    return _state["custom_ops"]


def _same_tensor(a, b) -> bool:
    """a and b view the same memory in the same way (then a linear map of them is computed once)."""
    if a is None or b is None or not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    return a is b or (
        a.dtype == b.dtype
        and a.device == b.device
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


def _build_custom_ops() -> dict:
    import numpy as np
    import torch.nn.functional as F
    from auto_LiRPA.operators.base import Bound

    from .product_backward import default_mix, mccormick_planes, product_backward
    from .windowed_conv import conv2d_rows

    class BoundConvAdjoint(Bound):
        """y = conv_transpose2d(v, W, stride, padding, output_padding, dilation) (W constant).

        Backward (CROWN): the coefficients of y map to those of v by the conv2d adjoint; interval:
        midpoint-radius form with |W|.  Coefficient matrices only (auto_LiRPA's matrix conv mode).
        The conv2d runs on each spec row's spatial window only (``windowed_conv.conv2d_rows``: the
        rows that start from the identity spec are local, the same terms are summed); coefficients
        shared by every sample (the identity spec, expanded over the batch) are convolved once, and
        a lower and upper matrix that are the same tensor once.  The per-offset-class matrices of the
        windows are cached on the node (its weight is constant; keyed on the weight's storage and
        version)."""

        def __init__(self, attr, inputs, output_index, options):
            super().__init__(attr, inputs, output_index, options)
            self.stride = tuple(attr["stride"])
            self.padding = tuple(attr["padding"])
            self.output_padding = tuple(attr["output_padding"])
            self.dilation = tuple(attr["dilation"])

        def forward(self, v, w):
            return F.conv_transpose2d(
                v, w, None, self.stride, self.padding, self.output_padding, 1, self.dilation
            )

        def bound_backward(self, last_lA, last_uA, v, w):
            if self.is_input_perturbed(1):
                raise NotImplementedError("ConvAdjoint with a perturbed weight")
            weight = w.lower
            pointwise = tuple(weight.shape[2:]) == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

            def one(a):
                if a is None:
                    return None
                if not isinstance(a, torch.Tensor):
                    raise NotImplementedError("ConvAdjoint supports auto_LiRPA's matrix mode only")
                if a.dim() == 5 and pointwise and tuple(a.shape[3:]) == (1, 1):  # a linear layer's W^T
                    if a.shape[1] > 1 and a.stride(1) == 0:
                        out = a[:, :1].reshape(a.shape[0], -1) @ weight.flatten(1).t()
                        return out.view(a.shape[0], 1, -1, 1, 1).expand(a.shape[0], a.shape[1], -1, 1, 1)
                    out = a.reshape(a.shape[0] * a.shape[1], -1) @ weight.flatten(1).t()
                    return out.view(a.shape[0], a.shape[1], -1, 1, 1)
                if a.dim() != 5:
                    shape = a.shape
                    out = F.conv2d(
                        a.reshape(shape[0] * shape[1], *shape[2:]), weight, None, self.stride, self.padding,
                        self.dilation,
                    )
                    return out.view(shape[0], shape[1], *out.shape[1:])
                cache = self.__dict__.setdefault("_certattr_windows", {})
                if a.shape[1] > 1 and a.stride(1) == 0:  # one matrix for the whole batch
                    out = conv2d_rows(a[:, :1], weight, self.stride, self.padding, self.dilation,
                                      cache.setdefault("shared", {}))
                    return out.expand(a.shape[0], a.shape[1], *out.shape[2:])
                return conv2d_rows(a, weight, self.stride, self.padding, self.dilation, cache.setdefault("rows", {}))

            lower = one(last_lA)
            upper = lower if _same_tensor(last_lA, last_uA) else one(last_uA)
            return [(lower, upper), (None, None)], 0, 0

        def interval_propagate(self, *v):
            (lo, hi), (w, _) = v[0], v[1]
            mid, rad = (hi + lo) / 2, (hi - lo) / 2
            c = self.forward(mid, w)
            r = F.conv_transpose2d(
                rad, w.abs(), None, self.stride, self.padding, self.output_padding, 1, self.dilation
            )
            return c - r, c + r

    from auto_LiRPA.operators.bivariate import BoundMul

    class BoundProduct(BoundMul):
        """a * b, both perturbed, equal shapes (a: a derivative factor, b: the upstream gradient).

        The four McCormick planes (Wong & Kolter; BoundMul uses L1 and U1 only) are valid on the box
        [l_a, u_a] x [l_b, u_b]:
            L1: ab >= l_b a + l_a b - l_a l_b      L2: ab >= u_b a + u_a b - u_a u_b
            U1: ab <= u_b a + l_a b - l_a u_b      U2: ab <= l_b a + u_a b - u_a l_b
        (each is (a - l_a)(b - l_b) >= 0 etc. rearranged), and so is any convex combination of two
        valid lower (upper) planes.  With ``MIX`` (default) we take
            lower = lam L1 + (1 - lam) L2,  lam = clip(u_b / (u_b - l_b), 0, 1),
            upper = mu U1 + (1 - mu) U2,    mu  = clip(-l_b / (u_b - l_b), 0, 1).
        For a ReLU factor a in [0, 1] and l_b < 0 < u_b these are the chords of min(0, b) and
        max(0, b), the hull of {ab}: the coefficient on b no longer vanishes when l_a = 0 (with L1/U1
        it is l_a = 0 and an unstable ReLU degrades to interval arithmetic).  ``MIX = False`` restores
        BoundMul's L1/U1.  alpha-CROWN (``bounds.alpha_crown``) replaces lam, mu by optimised weights
        in [0, 1] (per element, per spec row), still convex combinations of valid planes.  The backward
        pass (``product_backward``) writes them as A a_p + min(A, 0) (a_n - a_p); where the factor is
        a point (l_a = u_a: a stable ReLU) it uses the exact a b = l_a b, works on the other columns
        only, and concretises the coefficients of a box input a in place (the same value)."""

        MIX = True

        def __init__(self, attr, inputs, output_index, options):
            super().__init__(attr, inputs, output_index, options)
            self.is_constant_op = False
            self.requires_input_bounds = [0, 1]

        @staticmethod
        def mix_weights(y):
            """The default mixing weights lam = clip(u_b / (u_b - l_b)), mu = clip(-l_b / (u_b - l_b))."""
            return default_mix(y.lower, y.upper)

        def _planes(self, x, y, mix=None):
            """(lower, upper) planes (coefficient on a, on b, constant) on the box of x, y; exact
            (0, l_a, 0) where the factor is a point (``product_backward.mccormick_planes``)."""
            return mccormick_planes(x.lower, x.upper, y.lower, y.upper, mix, type(self).MIX)

        def _optimized_mix(self, a, y):
            """(lam, mu) from ``self.certattr_opt`` (set by ``bounds.alpha_crown``) or None: the optimisable
            mixing weights, created on first use from the defaults, shape (spec, batch, *shape) when
            ``opt["per_spec"]`` else (batch, *shape); None (defaults) where the spec does not match
            the one they were made for (e.g. an intermediate CROWN pass).  Any values in [0, 1] give
            valid planes (convex combinations), so the bound stays sound whatever the optimiser does."""
            opt = getattr(self, "certattr_opt", None)
            if opt is None or not type(self).MIX or a is None:
                return None
            if opt.get("lam") is None:
                lam, mu = self.mix_weights(y)
                if opt.get("per_spec"):
                    lam = lam.unsqueeze(0).expand(a.shape[0], *lam.shape)
                    mu = mu.unsqueeze(0).expand(a.shape[0], *mu.shape)
                opt["lam"] = lam.detach().clone().requires_grad_(True)
                opt["mu"] = mu.detach().clone().requires_grad_(True)
                opt["spec"] = a.shape[0]
            if opt["spec"] != a.shape[0] or opt["lam"].shape[-y.lower.dim():] != y.lower.shape:
                return None
            return opt["lam"], opt["mu"]

        def bound_backward(self, last_lA, last_uA, x, y):
            if not all(a is None or isinstance(a, torch.Tensor) for a in (last_lA, last_uA)):
                return super().bound_backward(last_lA, last_uA, x, y)
            mix = self._optimized_mix(last_lA if last_lA is not None else last_uA, y)
            bounds = (x.lower, x.upper, y.lower, y.upper)
            return product_backward(last_lA, last_uA, bounds, mix, type(self).MIX, self._box_input_factor(x))

        def _box_input_factor(self, x) -> bool:
            """x is an input with a box (norm inf) perturbation used by this node only: its coefficients
            can be concretised here, with the same result as at the input (``product_backward``)."""
            ptb = getattr(x, "perturbation", None)
            return (
                type(x).__name__ == "BoundInput"
                and ptb is not None
                and getattr(ptb, "norm", None) == np.inf
                and list(getattr(x, "output_name", [])) == [self.name]
            )

    return {"certattr::ConvAdjoint": BoundConvAdjoint, "certattr::Product": BoundProduct}


def import_auto_lirpa():
    """Import auto_LiRPA, restoring what 0.3 misses on current torch/numpy (only when missing).

    Returns the ``auto_LiRPA`` module (``BoundedModule``, ``BoundedTensor``, ``PerturbationLpNorm``).
    Raises ImportError with an installation hint when it is not installed.
    """
    if "module" in _state:
        return _state["module"]
    version = _installed_version()
    patch = _needs_patches(version)
    if patch:
        _patch_torch_and_numpy()
    try:
        auto_lirpa = importlib.import_module("auto_LiRPA")
    except ImportError as exc:
        raise ImportError(
            "auto_LiRPA is required for certified bounds: pip install --no-deps auto-lirpa==0.3 "
            f"(plus tqdm appdirs pyyaml packaging); import failed: {exc}"
        ) from exc
    if patch and _needs_patches(str(getattr(auto_lirpa, "__version__", version or _PATCHED_VERSION))):
        _patch_bounded_module(auto_lirpa)
        _softplus_relaxation(auto_lirpa)
        _cache_s_shaped_tables(auto_lirpa)
        _chunked_conv_transpose(auto_lirpa)
    ops = _build_custom_ops()
    register = getattr(auto_lirpa, "register_custom_op", None)
    if register is not None:
        for name, cls in ops.items():
            register(name, cls)
    _state["custom_ops"] = ops
    _state["module"] = auto_lirpa
    return auto_lirpa
