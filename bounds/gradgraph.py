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

import torch
import torch.nn.functional as F
from torch import nn

# the chain and its parser live in chain_ops / chain_parse; their names stay importable from here
from .chain_ops import (  # noqa: F401
    ACTIVATIONS,
    Act,
    Affine,
    Chain,
    MaxPool,
    Op,
    Reshape,
    apply_op,
    maxpool_routing_box,
    ops_device_dtype,
    relu_derivative_box,
)
from .chain_parse import (  # noqa: F401
    check_chain,
    check_traced_chain,
    leaf_modules,
    model_dtype_device,
    parse_chain,
)


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


def _flattened_image(ops: list, i: int) -> tuple[int, int, int] | None:
    """(C, H, W) if the linear op ``i`` reads a Flatten of a (C, H, W) image that is not the network's
    input (there the identity spec reaches the layer dense and batch-shared: one matmul is best)."""
    if i < 2 or not isinstance(ops[i - 1], Reshape):
        return None
    shape = tuple(ops[i - 1].in_shape)
    if len(shape) != 3 or int(torch.tensor(shape).prod()) != int(ops[i].weight.shape[1]):
        return None
    return shape


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
        # W of every linear layer as a (out, in, 1, 1) kernel of its adjoint (a parameter of its own:
        # auto_LiRPA reads constant weights from parameter nodes).  A linear layer that reads a flattened image (C, H, W) from inside the net (a Flatten after a
        # convolution or pooling) is the C x H x W convolution of that image to (out, 1, 1): its
        # adjoint is written as that transposed convolution (kernel W viewed as (out, C, H, W)), so the
        # CROWN coefficients reach it as images and ``windowed_conv`` multiplies only the few pixels
        # each spec row touches (the same products W_oj A_j, the zero terms left out); the Flatten's
        # reshape is then a no-op.
        self.linear_index: dict[int, int] = {}
        self.linear_kernels = nn.ParameterList()
        self.image_linear: set[int] = set()
        for i, op in enumerate(self.ops):
            if isinstance(op, Affine) and op.kind == "linear":
                self.linear_index[i] = len(self.linear_kernels)
                image = _flattened_image(self.ops, i)
                if image is not None:
                    self.image_linear.add(i)
                    kernel = op.weight.reshape(op.weight.shape[0], *image)
                else:
                    kernel = op.weight.reshape(*op.weight.shape, 1, 1)
                self.linear_kernels.append(_frozen(kernel))
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
                    # W^T v as a 1x1 transposed convolution: one ConvAdjoint op (``lirpa_compat``) whose
                    # bound backward multiplies a batch-shared identity spec once (auto_LiRPA's MatMul
                    # multiplies it per sample and asks for its input's bounds)
                    k = self.linear_kernels[self.linear_index[i]]
                    v = conv_adjoint(v.reshape(-1, k.shape[0], 1, 1), k, (1, 1), (0, 0), (0, 0))
                    if i not in self.image_linear:
                        v = v.reshape(-1, k.shape[1])
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
