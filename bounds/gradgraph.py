"""A feed-forward network as a list of simple ops, and its input gradient as an explicit forward module.

For a chain f = L_K o a_{K-1} o ... o a_1 o L_1 the gradient of the logit f_y is the backward pass
(reverse-mode chain rule)

    v_K = e_y,   v <- W^T v (Linear),  v <- conv_transpose(v, W) (Conv2d),  v <- a'(z) * v (activation),
    v <- sum over the windows that picked an input (MaxPool),   d f_y / dx = v_0,

so it can be written as an ordinary torch module that auto_LiRPA (CROWN, Zhang et al. 2018) can bound
(``GradNet``): smooth derivative factors (softplus' = sigmoid(beta z), sigmoid' = 1/4 - (s - 1/2)^2,
tanh' = 1 - t^2) stay functions of x; discontinuous ones (the ReLU step, max-pool routing) enter as
extra inputs whose box is their sound interval (``relu_derivative_box``, ``maxpool_routing_box``).

Supported layers: Linear, Conv2d, ReLU, Softplus, Sigmoid, Tanh, Flatten, AvgPool2d, MaxPool2d,
BatchNorm1d/2d (eval; folded into the preceding affine layer), plus the no-ops Identity and Dropout
(eval).  AvgPool2d and a BatchNorm that follows no affine layer become convolutions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("relu", "softplus", "sigmoid", "tanh")
_SUPPORTED = (
    "Linear, Conv2d, ReLU, Softplus, Sigmoid, Tanh, Flatten, AvgPool2d, MaxPool2d, BatchNorm1d/2d (eval), "
    "Identity, Dropout"
)


# ----------------------------------------------------------------------------------------------
# ops
# ----------------------------------------------------------------------------------------------
@dataclass
class Affine:
    """z = W h + b (kind "linear", h of shape (n,)) or z = conv2d(h, W, b) (kind "conv")."""

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    # |bias| before folding cancelled its parts (|b| |scale| + |mean scale| + |beta| for a folded
    # BatchNorm): the magnitude that the model's float evaluation rounds (``floatsafe``)
    bias_magnitude: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(h, self.weight, self.bias)
        return F.conv2d(h, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def backward(self, v: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Adjoint map v -> W^T v (``weight`` replaces W, e.g. by |W| for interval radii)."""
        w = self.weight if weight is None else weight
        if self.kind == "linear":
            return v @ w
        return F.conv_transpose2d(
            v, w, None, self.stride, self.padding, self.output_padding, 1, self.dilation
        )

    @property
    def output_padding(self) -> tuple[int, int]:
        out = []
        for d in range(2):
            k = self.weight.shape[2 + d]
            full = (
                (self.out_shape[1 + d] - 1) * self.stride[d]
                - 2 * self.padding[d]
                + self.dilation[d] * (k - 1)
                + 1
            )
            out.append(self.in_shape[1 + d] - full)
        return (out[0], out[1])


@dataclass
class Act:
    """Elementwise activation: relu | softplus (log(1 + e^{beta z}) / beta) | sigmoid | tanh."""

    name: str
    beta: float = 1.0
    threshold: float = 20.0
    shape: tuple[int, ...] = ()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.name == "relu":
            return torch.relu(z)
        if self.name == "softplus":
            return F.softplus(z, beta=self.beta, threshold=self.threshold)
        if self.name == "sigmoid":
            return torch.sigmoid(z)
        return torch.tanh(z)

    def derivative(self, z: torch.Tensor) -> torch.Tensor:
        """a'(z) with autograd's conventions (relu'(0) = 0; softplus' = 1 above the threshold)."""
        if self.name == "relu":
            return (z > 0).to(z.dtype)
        if self.name == "softplus":
            bz = z * self.beta
            return torch.where(bz > self.threshold, torch.ones_like(z), torch.sigmoid(bz))
        if self.name == "sigmoid":
            s = torch.sigmoid(z)
            return s * (1 - s)
        return 1 - torch.tanh(z) ** 2


@dataclass
class Reshape:
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


@dataclass
class MaxPool:
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(h, self.kernel, self.stride, self.padding, self.dilation)

    @property
    def window(self) -> int:
        return self.kernel[0] * self.kernel[1]

    def unfold(self, t: torch.Tensor, fill: float) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, k*k, Ho, Wo): the window entries, padding filled with ``fill``."""
        ph, pw = self.padding
        if ph or pw:
            t = F.pad(t, (pw, pw, ph, ph), value=fill)
        cols = F.unfold(t, self.kernel, self.dilation, 0, self.stride)
        return cols.view(t.shape[0], self.in_shape[0], self.window, self.out_shape[1], self.out_shape[2])

    def fold(self, cols: torch.Tensor) -> torch.Tensor:
        """Adjoint of ``unfold``: (B, C, k*k, Ho, Wo) -> (B, C, H, W), summing overlapping windows."""
        b = cols.shape[0]
        ph, pw = self.padding
        size = (self.in_shape[1] + 2 * ph, self.in_shape[2] + 2 * pw)
        out = F.fold(
            cols.reshape(b, self.in_shape[0] * self.window, -1),
            size,
            self.kernel,
            self.dilation,
            0,
            self.stride,
        )
        return out[:, :, ph : ph + self.in_shape[1], pw : pw + self.in_shape[2]]

    def routing_at(self, h: torch.Tensor) -> torch.Tensor:
        """One-hot (B, C, k*k, Ho, Wo) of the window entry autograd routes the gradient to."""
        cols = self.unfold(h, float("-inf"))
        # torch's max_pool2d (CPU and CUDA) keeps the first maximum in window scan order, and
        # argmax returns the first maximal index
        idx = cols.argmax(dim=2, keepdim=True)
        return torch.zeros_like(cols).scatter_(2, idx, 1.0)


Op = Affine | Act | Reshape | MaxPool


@dataclass
class Chain:
    """The parsed network: ``ops`` (folded), the original ``leaves`` and, for every op, the index
    of the last leaf it consumed (``leaf_end[i]``), so exact values of the user's model can be read."""

    ops: list
    leaves: list
    leaf_end: list
    in_shape: tuple[int, ...]
    num_classes: int
    notes: list = field(default_factory=list)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for op in self.ops:
            h = apply_op(op, h)
        return h

    def leaf_values(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run the user's own modules in order and return the value after each op (exact, not folded)."""
        outs, h, j = [], x, 0
        for end in self.leaf_end:
            while j <= end:
                h = self.leaves[j](h)
                j += 1
            outs.append(h.clone())  # an inplace layer (ReLU(inplace=True)) must not overwrite it
        return outs


def apply_op(op, h: torch.Tensor) -> torch.Tensor:
    if isinstance(op, (Affine, Act, MaxPool)):
        return op.forward(h)
    return h.reshape(h.shape[0], *op.out_shape)


# ----------------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------------
def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1])) if len(v) == 2 else (int(v[0]), int(v[0]))
    return (int(v), int(v))


def leaf_modules(model: nn.Module) -> list[nn.Module]:
    """The layers of a (possibly nested) nn.Sequential, in order.  A module that is not a Sequential
    but has children is walked in registration order (``check_chain`` verifies that this is what its
    forward computes)."""
    if isinstance(model, nn.Sequential) or len(list(model.children())) > 0:
        out = []
        for child in model.children():
            out.extend(leaf_modules(child))
        return out
    return [model]


def _is_noop(m: nn.Module) -> bool:
    return isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout))


def _dense_conv_weight(conv: nn.Conv2d) -> torch.Tensor:
    w = conv.weight.detach()
    if conv.groups == 1:
        return w
    out_c, in_per = w.shape[0], w.shape[1]
    g = conv.groups
    dense = w.new_zeros(out_c, in_per * g, *w.shape[2:])
    out_per = out_c // g
    for k in range(g):  # construction only, not a hot path
        dense[k * out_per : (k + 1) * out_per, k * in_per : (k + 1) * in_per] = w[
            k * out_per : (k + 1) * out_per
        ]
    return dense


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding_mode != "zeros":
        raise ValueError(f"Conv2d with padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
    pad = conv.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0, 0)
        # 'same' with stride 1: total padding dilation*(k-1), split evenly only when it is even
        total = [conv.dilation[d] * (conv.kernel_size[d] - 1) for d in range(2)]
        if any(t % 2 for t in total):
            raise ValueError("Conv2d(padding='same') with an even kernel is not supported")
        return (total[0] // 2, total[1] // 2)
    return _pair(pad)


def _abs(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.abs()


def _bn_scale_shift(bn: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as z * scale + shift (computed in ``dtype``), and |mean scale| + |beta|."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{type(bn).__name__} without running statistics (track_running_stats=False) is not supported"
        )
    var = bn.running_var.detach().to(dtype)
    if bool((var < 0).any()):
        raise ValueError(f"{type(bn).__name__} has a negative running_var")
    scale = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(dtype)
    shift = -bn.running_mean.detach().to(dtype) * scale
    mag = shift.abs()
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(dtype)
        mag = mag + bn.bias.detach().to(dtype).abs()
    return scale, shift, mag


_STOCK_FORWARD = {
    cls: cls.forward
    for cls in (
        nn.Linear, nn.Conv2d, nn.ReLU, nn.Softplus, nn.Sigmoid, nn.Tanh, nn.Flatten, nn.AvgPool2d,
        nn.MaxPool2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
        nn.AlphaDropout, nn.Sequential,
    )
}


def _check_module(m: nn.Module) -> None:
    """Refuse what the parser cannot see: forward hooks (they may change any output) and supported
    classes whose ``forward`` was overridden by a subclass."""
    hooks = ("_forward_hooks", "_forward_pre_hooks")
    if any(len(getattr(m, h, {}) or {}) for h in hooks):
        raise ValueError(f"{type(m).__name__} has forward hooks, which certified bounds do not model: remove them")
    for cls, fwd in _STOCK_FORWARD.items():
        if isinstance(m, cls) and type(m).forward is not fwd:
            raise ValueError(
                f"{type(m).__name__} overrides {cls.__name__}.forward, which certified bounds do not model"
            )


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for t in list(model.parameters()) + list(model.buffers()):
        if torch.is_floating_point(t):
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def parse_chain(model: nn.Module, in_shape: tuple[int, ...], dtype: torch.dtype | None = None) -> Chain:
    """Turn ``model`` into ops (BatchNorm folded, AvgPool as a convolution), with per-sample shapes.

    ``dtype``: the dtype of the ops (default: the model's); folding is done in it, from the model's
    own parameters.  Raises ValueError naming the first unsupported layer or layer option."""
    leaves = leaf_modules(model)
    if not leaves:
        raise ValueError("model has no layers")
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        raise ValueError("global forward hooks are registered: certified bounds do not model them")
    model_dtype, device = model_dtype_device(model)
    dtype = dtype or model_dtype
    for m in [model, *model.modules()]:
        _check_module(m)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
            raise ValueError(f"parameter {name} contains NaN or inf")
    ops: list = []
    leaf_end: list[int] = []
    shape = tuple(int(s) for s in in_shape)
    notes: list[str] = []
    for j, m in enumerate(leaves):
        if _is_noop(m):
            if m.training and not isinstance(m, nn.Identity) and getattr(m, "p", 0) > 0:
                raise ValueError(f"{type(m).__name__} in training mode is not supported: call model.eval()")
            if leaf_end:
                leaf_end[-1] = j
            else:
                ops.append(Reshape(shape, shape))
                leaf_end.append(j)
            continue
        if isinstance(m, nn.Linear):
            if len(shape) != 1:
                raise ValueError(
                    f"Linear applied to a tensor of shape {shape} is not supported: flatten first"
                )
            w = m.weight.detach().to(dtype)
            b = m.bias.detach().to(dtype) if m.bias is not None else None
            ops.append(Affine("linear", w, b, shape, (w.shape[0],), bias_magnitude=_abs(b)))
            shape = (w.shape[0],)
        elif isinstance(m, nn.Conv2d):
            if len(shape) != 3:
                raise ValueError(f"Conv2d applied to a tensor of shape {shape} is not supported")
            w = _dense_conv_weight(m).to(dtype)
            b = m.bias.detach().to(dtype) if m.bias is not None else None
            op = Affine("conv", w, b, shape, shape, _pair(m.stride), _conv_padding(m), _pair(m.dilation))
            op.bias_magnitude = _abs(b)
            op.out_shape = _conv_out_shape(op, shape)
            ops.append(op)
            shape = op.out_shape
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            if m.training:
                raise ValueError(f"{type(m).__name__} in training mode is not supported: call model.eval()")
            scale, shift, shift_mag = _bn_scale_shift(m, dtype)
            prev = ops[-1] if ops else None
            if isinstance(prev, Affine) and prev.out_shape[0] == scale.numel() and leaf_end[-1] == j - 1:
                view = (-1,) + (1,) * (prev.weight.dim() - 1)
                prev.weight = prev.weight * scale.view(view)
                bias = prev.bias if prev.bias is not None else torch.zeros_like(shift)
                prev.bias = bias * scale + shift
                prev.bias_magnitude = bias.abs() * scale.abs() + shift_mag
                leaf_end[-1] = j
                continue
            if len(shape) == 3 and shape[0] == scale.numel():
                c = shape[0]
                w = torch.zeros(c, c, 1, 1, dtype=dtype, device=device)
                w[torch.arange(c), torch.arange(c), 0, 0] = scale
                ops.append(Affine("conv", w, shift.clone(), shape, shape, bias_magnitude=shift_mag))
            elif len(shape) == 1 and shape[0] == scale.numel():
                ops.append(Affine("linear", torch.diag(scale), shift.clone(), shape, shape, bias_magnitude=shift_mag))
            else:
                raise ValueError(f"{type(m).__name__} on a tensor of shape {shape} is not supported")
        elif isinstance(m, nn.ReLU):
            ops.append(Act("relu", shape=shape))
        elif isinstance(m, nn.Softplus):
            if not (m.beta > 0 and math.isfinite(m.beta)):
                raise ValueError(f"Softplus with beta={m.beta} is not supported (beta must be finite and > 0)")
            if math.isnan(m.threshold):
                raise ValueError("Softplus with threshold=nan is not supported")
            # torch's softplus is linear above beta z > threshold and jumps there by
            # log1p(exp(-threshold)) / beta: bounded as the smooth softplus plus that jump
            # (``floatsafe.softplus_jumps``), which is sound for every threshold
            ops.append(Act("softplus", float(m.beta), float(m.threshold), shape=shape))
        elif isinstance(m, nn.Sigmoid):
            ops.append(Act("sigmoid", shape=shape))
        elif isinstance(m, nn.Tanh):
            ops.append(Act("tanh", shape=shape))
        elif isinstance(m, nn.Flatten):
            full = (1,) + shape
            start = m.start_dim % len(full)
            end = m.end_dim % len(full)
            if start == 0:
                raise ValueError("Flatten over the batch dimension (start_dim=0) is not supported")
            new = full[:start] + (int(torch.tensor(full[start : end + 1]).prod()),) + full[end + 1 :]
            ops.append(Reshape(shape, tuple(new[1:])))
            shape = tuple(new[1:])
        elif isinstance(m, nn.AvgPool2d):
            if len(shape) != 3:
                raise ValueError(f"AvgPool2d on a tensor of shape {shape} is not supported")
            if m.ceil_mode:
                raise ValueError("AvgPool2d(ceil_mode=True) is not supported")
            kh, kw = _pair(m.kernel_size)
            stride = _pair(m.stride if m.stride is not None else m.kernel_size)
            pad = _pair(m.padding)
            if not m.count_include_pad and (pad[0] or pad[1]):
                raise ValueError("AvgPool2d(count_include_pad=False) with padding is not supported")
            c = shape[0]
            div = float(m.divisor_override) if m.divisor_override else float(kh * kw)
            w = torch.zeros(c, c, kh, kw, dtype=dtype, device=device)
            w[torch.arange(c), torch.arange(c)] = 1.0 / div
            op = Affine("conv", w, None, shape, shape, stride, pad)
            op.out_shape = _conv_out_shape(op, shape)
            ops.append(op)
            shape = op.out_shape
        elif isinstance(m, nn.MaxPool2d):
            if len(shape) != 3:
                raise ValueError(f"MaxPool2d on a tensor of shape {shape} is not supported")
            if m.ceil_mode or m.return_indices:
                raise ValueError("MaxPool2d with ceil_mode=True or return_indices=True is not supported")
            k = _pair(m.kernel_size)
            s = _pair(m.stride if m.stride is not None else m.kernel_size)
            p, d = _pair(m.padding), _pair(m.dilation)
            out_hw = [(shape[1 + i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2)]
            op = MaxPool(k, s, p, d, shape, (shape[0], out_hw[0], out_hw[1]))
            ops.append(op)
            shape = op.out_shape
        else:
            raise ValueError(  # noqa: TRY004 - the spec asks for a ValueError naming the layer
                f"unsupported layer {type(m).__name__} for certified bounds; supported: {_SUPPORTED}"
            )
        leaf_end.append(j)
    if len(shape) != 1:
        raise ValueError(f"model output per sample must be a vector of logits, got shape {shape}")
    return Chain(ops, leaves, leaf_end, tuple(int(s) for s in in_shape), int(shape[0]), notes)


def _conv_out_shape(op: Affine, shape: tuple[int, ...]) -> tuple[int, int, int]:
    k = op.weight.shape[2:]
    hw = [
        (shape[1 + i] + 2 * op.padding[i] - op.dilation[i] * (k[i] - 1) - 1) // op.stride[i] + 1
        for i in range(2)
    ]
    return (int(op.weight.shape[0]), hw[0], hw[1])


class _LayerTracer(torch.fx.Tracer):
    """torch.fx tracer that keeps every supported layer (stock forward) as one call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return not isinstance(m, nn.Sequential) and any(
            isinstance(m, cls) and type(m).forward is fwd for cls, fwd in _STOCK_FORWARD.items()
        )


def check_traced_chain(model: nn.Module, leaves: list) -> None:
    """Proof that ``model``'s forward is the chain of its layers: torch.fx traces it to
    input -> layer_1 -> ... -> layer_K -> output, each call taking the previous one's output alone, in
    registration order.  A functional op (F.relu, +, a reshape...) anywhere in a custom forward is refused
    by name, even where it happens to do nothing at the certified point."""
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward and all(
        not isinstance(m, nn.Sequential) or type(m).forward is nn.Sequential.forward for m in model.modules()
    ):
        return  # a stock Sequential applies its children in order by definition
    name = type(model).__name__
    try:
        graph = _LayerTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: not provably a chain
        raise ValueError(
            f"{name}'s forward cannot be traced by torch.fx ({type(exc).__name__}: {str(exc)[:120]}): certified "
            "bounds need a chain of layers (an nn.Sequential)"
        ) from None
    called, prev = [], None
    for node in graph.nodes:
        if node.op == "placeholder":
            if prev is not None:
                raise ValueError(f"{name}'s forward takes more than one input")
            prev = node
        elif node.op == "call_module":
            if tuple(node.args) != (prev,) or node.kwargs:
                raise ValueError(f"{name} is not a simple chain of its submodules: {node.target} does not take the "
                                 "previous layer's output alone")
            called.append(model.get_submodule(node.target))
            prev = node
        elif node.op == "output":
            if node.args[0] is not prev:
                raise ValueError(f"{name} is not a simple chain of its submodules: its output is not its last layer's")
        else:
            raise ValueError(
                f"{name} is not a simple chain of its submodules: its forward applies {node.op} "
                f"{getattr(node.target, '__name__', node.target)} outside its layers"
            )
    if len(called) != len(leaves) or any(a is not b for a, b in zip(called, leaves)):
        raise ValueError(f"{name} is not a simple chain of its submodules: its forward calls its layers in another "
                         "order than they are registered, or not all of them once")


def check_chain(model: nn.Module, chain: Chain, x: torch.Tensor, atol: float = 1e-4) -> None:
    """The parsed chain must compute what ``model`` computes: the forward is traced to a chain of its
    layers (``check_traced_chain``), ``model(x)`` must equal applying its layers in registration order
    (up to 1e-6 relative: the same float operations), and the folded chain must agree with it up to
    ``atol`` relative (folding BatchNorm changes the rounding only)."""
    check_traced_chain(model, chain.leaves)
    with torch.no_grad():
        ref = model(x)
        leaf_out = chain.leaf_values(x)[-1]
        ours = chain.forward(x.to(ops_device_dtype(chain.ops)[1]))
    if ref.shape != ours.shape or ref.shape != leaf_out.shape:
        raise ValueError(
            f"{type(model).__name__} is not a simple chain of its submodules: its output shape {tuple(ref.shape)} "
            f"differs from the chained layers' {tuple(ours.shape)}"
        )
    scale = 1.0 + float(ref.abs().max())
    same_ops = torch.allclose(ref, leaf_out, atol=1e-6 * scale, rtol=0)
    if not same_ops or not torch.allclose(ref.to(ours.dtype), ours, atol=atol * scale, rtol=0):
        raise ValueError(
            f"{type(model).__name__} is not a simple chain of its submodules (its forward computes something else "
            "than applying its layers in registration order)"
        )


# ----------------------------------------------------------------------------------------------
# sound boxes of the discontinuous derivative factors
# ----------------------------------------------------------------------------------------------
def relu_derivative_box(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """relu'(z) over z in [l, u] with autograd's relu'(0) = 0: {1} if l > 0, {0} if u <= 0, else [0, 1]."""
    return (lower > 0).to(lower.dtype), (upper > 0).to(upper.dtype)


def maxpool_routing_box(
    op: MaxPool, lower: torch.Tensor, upper: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box (B, C, k*k, Ho, Wo) on the routing weights of every window.

    Autograd routes to the *first* maximum in scan order, so entry i can be picked only if
    u_i > l_k for every earlier entry k and u_i >= l_k for every later one; an entry that is the only
    possible one is picked for sure ({1}), impossible ones get {0}, the others [0, 1]."""
    lo = op.unfold(lower, float("-inf"))
    hi = op.unfold(upper, float("-inf"))
    kk = op.window
    # pairwise (i, k): hi_i vs lo_k  -> (B, C, kk_i, kk_k, Ho, Wo)
    hi_i = hi.unsqueeze(3)
    lo_k = lo.unsqueeze(2)
    order = torch.arange(kk, device=lower.device)
    earlier = (order.view(1, kk) < order.view(kk, 1)).view(1, 1, kk, kk, 1, 1)  # k < i
    later = (order.view(1, kk) > order.view(kk, 1)).view(1, 1, kk, kk, 1, 1)
    ok = torch.where(earlier, hi_i > lo_k, torch.where(later, hi_i >= lo_k, torch.ones_like(hi_i > lo_k)))
    possible = ok.all(dim=3) & torch.isfinite(hi)
    count = possible.sum(dim=2, keepdim=True)
    box_hi = possible.to(lower.dtype)
    box_lo = (possible & (count == 1)).to(lower.dtype)
    return box_lo, box_hi


# ----------------------------------------------------------------------------------------------
# the forward network and the gradient network as torch modules for auto_LiRPA
# ----------------------------------------------------------------------------------------------
def _frozen(t: torch.Tensor) -> nn.Parameter:
    # auto_LiRPA 0.3 crashes on modules without parameters and treats buffers as constants: keep
    # weights as frozen parameters
    return nn.Parameter(t.detach().clone(), requires_grad=False)


class _Stem(nn.Module):
    """Input stem: an identity affine layer.  Under l2, auto_LiRPA 0.3 gives the input node itself a
    zero-width interval, which makes products with x (gradient x input, IG) unsound; a layer in
    front of them gets real bounds (SPEC 8)."""

    def __init__(self, in_shape: tuple[int, ...], identity: bool, dtype, device):
        super().__init__()
        self.identity = identity
        self.in_shape = in_shape
        if identity:
            if len(in_shape) == 3:
                c = in_shape[0]
                self.eye = _frozen(torch.eye(c, dtype=dtype, device=device).view(c, c, 1, 1))
            else:
                n = int(torch.tensor(in_shape).prod())
                self.eye = _frozen(torch.eye(n, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            x = F.conv2d(x, self.eye) if len(self.in_shape) == 3 else F.linear(x, self.eye)
        return x


class _OpModules(nn.Module):
    """Frozen copies of the chain's weights (and the extra constant kernels of the backward pass)."""

    def __init__(self, ops: list):
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.index: list[int] = []
        self.bias_index: list[int] = []
        self.expand = nn.ParameterList()
        self.route = nn.ParameterList()
        self.pool_index: list[int] = []
        for op in ops:
            if isinstance(op, Affine):
                self.index.append(len(self.weights))
                self.weights.append(_frozen(op.weight))
                if op.bias is not None:
                    self.bias_index.append(len(self.biases))
                    self.biases.append(_frozen(op.bias))
                else:
                    self.bias_index.append(-1)
            else:
                self.index.append(-1)
                self.bias_index.append(-1)
            if isinstance(op, MaxPool):
                c, kk = op.in_shape[0], op.window
                dev, dt = ops_device_dtype(ops)
                e = torch.zeros(c * kk, c, 1, 1, dtype=dt, device=dev)
                e[torch.arange(c * kk), torch.arange(c).repeat_interleave(kk), 0, 0] = 1.0
                r = torch.zeros(c * kk, c, op.kernel[0], op.kernel[1], dtype=dt, device=dev)
                o = torch.arange(kk).repeat(c)
                r[
                    torch.arange(c * kk),
                    torch.arange(c).repeat_interleave(kk),
                    o // op.kernel[1],
                    o % op.kernel[1],
                ] = 1.0
                self.pool_index.append(len(self.expand))
                self.expand.append(_frozen(e))
                self.route.append(_frozen(r))
            else:
                self.pool_index.append(-1)


def ops_device_dtype(ops: list) -> tuple[torch.device, torch.dtype]:
    for op in ops:
        if isinstance(op, Affine):
            return op.weight.device, op.weight.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _forward_op(op, mods: _OpModules, i: int, h: torch.Tensor) -> torch.Tensor:
    if isinstance(op, Affine):
        w = mods.weights[mods.index[i]]
        b = mods.biases[mods.bias_index[i]] if mods.bias_index[i] >= 0 else None
        if op.kind == "linear":
            return F.linear(h, w, b)
        return F.conv2d(h, w, b, op.stride, op.padding, op.dilation)
    if isinstance(op, Act):
        if op.name == "relu":
            return torch.relu(h)
        if op.name == "softplus":
            # exported to ONNX as Div(Softplus(Mul(z, beta)), beta): the smooth softplus; the
            # threshold's jump is accounted for by ``floatsafe`` as an evaluation error
            return F.softplus(h * op.beta) / op.beta if op.beta != 1.0 else F.softplus(h)
        if op.name == "sigmoid":
            return torch.sigmoid(h)
        return torch.tanh(h)
    if isinstance(op, MaxPool):
        return F.max_pool2d(h, op.kernel, op.stride, op.padding, op.dilation)
    return h.reshape(-1, *op.out_shape)


class ForwardNet(nn.Module):
    """The folded chain as a module."""

    def __init__(self, chain: Chain, identity_stem: bool = False):
        super().__init__()
        dev, dt = ops_device_dtype(chain.ops)
        self.ops = chain.ops
        self.stem = _Stem(chain.in_shape, identity_stem, dt, dev)
        self.mods = _OpModules(chain.ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for i, op in enumerate(self.ops):
            h = _forward_op(op, self.mods, i, h)
        return h


class _ConvAdjoint(torch.autograd.Function):
    """v -> conv_transpose2d(v, W, stride, padding, output_padding, dilation): the adjoint of
    conv2d(., W, stride, padding, dilation).  Exported to ONNX as the single op
    ``certattr::ConvAdjoint`` (bounded by ``lirpa_compat.BoundConvAdjoint``): auto_LiRPA 0.3's own
    ConvTranspose supports neither padding nor output padding."""

    @staticmethod
    def forward(ctx, v, w, stride, padding, output_padding, dilation):
        ctx.save_for_backward(w)
        ctx.conv = (stride, padding, dilation)
        return F.conv_transpose2d(v, w, None, stride, padding, output_padding, 1, dilation)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        return F.conv2d(grad, w, None, stride, padding, dilation), None, None, None, None, None

    @staticmethod
    def symbolic(g, v, w, stride, padding, output_padding, dilation):
        out = g.op(
            "certattr::ConvAdjoint",
            v,
            w,
            stride_i=list(stride),
            padding_i=list(padding),
            output_padding_i=list(output_padding),
            dilation_i=list(dilation),
        )
        try:  # tell the exporter the output shape (it warns otherwise)
            vs, ws = v.type().sizes(), w.type().sizes()
            hw = [
                (vs[2 + d] - 1) * stride[d]
                - 2 * padding[d]
                + dilation[d] * (ws[2 + d] - 1)
                + 1
                + output_padding[d]
                for d in range(2)
            ]
            out.setType(v.type().with_sizes([vs[0], ws[1], hw[0], hw[1]]))
        except Exception:  # noqa: BLE001, S110 - shapes unknown: the exporter falls back to its own inference
            pass
        return out


def conv_adjoint(v, w, stride, padding, output_padding, dilation=(1, 1)) -> torch.Tensor:
    return _ConvAdjoint.apply(v, w, tuple(stride), tuple(padding), tuple(output_padding), tuple(dilation))


class _Product(torch.autograd.Function):
    """Elementwise a * b of two equally shaped tensors (a derivative factor times the upstream
    gradient), exported as ``certattr::Product`` so that auto_LiRPA bounds it with
    ``lirpa_compat``'s BoundProduct (BoundMul's McCormick planes, fewer passes over the coefficients)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return grad * b, grad * a

    @staticmethod
    def symbolic(g, a, b):
        out = g.op("certattr::Product", a, b)
        out.setType(a.type())
        return out


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _Product.apply(a, b)


def _adjoint_output_padding(in_hw, out_hw, kernel, stride, padding, dilation) -> tuple[int, int]:
    return tuple(
        int(in_hw[d] - ((out_hw[d] - 1) * stride[d] - 2 * padding[d] + dilation[d] * (kernel[d] - 1) + 1))
        for d in range(2)
    )


class GradNet(nn.Module):
    """d f_y / dx (times x for gradient x input) as a forward module.

    Inputs: ``x`` (B, *in_shape); ``onehot`` (B, classes) = e_y; then one tensor per ReLU (its
    derivative, (B, *shape)) and per MaxPool (its routing weights, (B, C*k*k, Ho, Wo)), in chain
    order.  Output: (B, n) flat.  Transposed convolutions are one custom op (``conv_adjoint``)."""

    def __init__(self, chain: Chain, times_input: bool = False, identity_stem: bool = False):
        super().__init__()
        dev, dt = ops_device_dtype(chain.ops)
        self.ops = chain.ops
        self.stem = _Stem(chain.in_shape, identity_stem, dt, dev)
        self.mods = _OpModules(chain.ops)
        self.times_input = times_input
        # static kernel sizes (tracing records every .shape read of a tensor)
        self.kernels = {
            i: (int(op.weight.shape[2]), int(op.weight.shape[3]))
            for i, op in enumerate(self.ops)
            if isinstance(op, Affine) and op.kind == "conv"
        }
        # forward values are needed up to the last smooth activation
        smooth = [i for i, op in enumerate(self.ops) if isinstance(op, Act) and op.name != "relu"]
        self.forward_until = (max(smooth) + 1) if smooth else 0

    def forward(self, x: torch.Tensor, onehot: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
        x0 = self.stem(x)
        saved: dict[int, torch.Tensor] = {}
        h = x0
        for i in range(self.forward_until):
            op = self.ops[i]
            if isinstance(op, Act) and op.name == "softplus":
                w = h * op.beta
                saved[i] = w
                h = F.softplus(w) / op.beta
                continue
            h = _forward_op(op, self.mods, i, h)
            if isinstance(op, Act) and op.name in ("sigmoid", "tanh"):
                saved[i] = h
        # backward pass
        fi = len(factors)
        v = onehot
        for i in range(len(self.ops) - 1, -1, -1):
            op = self.ops[i]
            if isinstance(op, Affine):
                w = self.mods.weights[self.mods.index[i]]
                if op.kind == "linear":
                    v = F.linear(v, w.t())
                else:
                    opad = _adjoint_output_padding(
                        op.in_shape[1:], op.out_shape[1:], self.kernels[i], op.stride, op.padding, op.dilation
                    )
                    v = conv_adjoint(v, w, op.stride, op.padding, opad, op.dilation)
            elif isinstance(op, Reshape):
                v = v.reshape(-1, *op.in_shape)
            elif isinstance(op, Act):
                if op.name == "relu":
                    fi -= 1
                    d = factors[fi]
                elif op.name == "softplus":
                    d = torch.sigmoid(saved[i])
                elif op.name == "sigmoid":
                    u = saved[i] - 0.5
                    d = (u * u) * (-1.0) + 0.25
                else:
                    t = saved[i]
                    d = (t * t) * (-1.0) + 1.0
                v = product(d, v)
            else:  # MaxPool
                fi -= 1
                route = factors[fi]
                p = self.mods.pool_index[i]
                rep = F.conv2d(v, self.mods.expand[p])
                t = product(route, rep)
                opad = _adjoint_output_padding(
                    op.in_shape[1:], op.out_shape[1:], op.kernel, op.stride, op.padding, op.dilation
                )
                v = conv_adjoint(t, self.mods.route[p], op.stride, op.padding, opad, op.dilation)
        if self.times_input:
            v = product(x0, v)
        # a flat output: auto_LiRPA's backward pass starts from a (spec, B, n) matrix, which only
        # the Reshape node turns back into the image shape
        return v.reshape(v.shape[0], -1)
