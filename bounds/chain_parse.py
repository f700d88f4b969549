"""Parsing a model into a ``Chain`` (``parse_chain``: BatchNorm folded, AvgPool as a convolution) and the
proof that the model computes that chain (``check_chain``: an fx trace of its forward plus a numeric check).

Split out of ``gradgraph`` (which re-exports every public name).
"""

from __future__ import annotations

import math

import torch
import torch.fx
from torch import nn

from .chain_ops import _SUPPORTED, Act, Affine, Chain, MaxPool, Reshape, ops_device_dtype


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
