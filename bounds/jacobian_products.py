"""Batched products with the attribution's input Jacobian J = dg/dx (the engine of ``practical_bound``).

``JacobianProducts`` gives J v and J^T v for every sample at once, from one graph of g (double backprop),
or from ``_SequentialHessian``: hand-written forward-over-reverse Hessian-vector products for a plain
nn.Sequential of Linear / Conv2d / MaxPool2d / Flatten / elementwise activations (one tangent pass, one
transposed pass; about 3x cheaper than double backprop).  See bounds/practical.py for how they are used.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F


class JacobianProducts:
    """Batched products with J = dg/dx for every sample at once, from one graph of g (create_graph=True).

    ``build(rows)`` returns (g, x) for the samples ``rows`` (None: all), x a leaf requiring grad, or
    (g, x, jtv, jv) with closed-form product functions on (B, n) (the fast path; no graph).
    ``jtv(v)``: J^T v = grad_x <g, v> (one backward through the graph of g: a Hessian-vector product).
    ``jv(v)``:  J v; equal to J^T v when J is symmetric (saliency), else the double-vjp trick
    J v = grad_u <J^T u, v> (u a dummy variable; J^T u is linear in u).
    Products of the samples do not mix: grad of a sum over the batch gives per-sample products.
    ``subset(rows)`` rebuilds the graph for some of the rows (so finished samples stop costing work).
    """

    def __init__(self, build, symmetric: bool, rows: torch.Tensor | None = None, counter: dict | None = None):
        self._build, self.symmetric, self.rows = build, symmetric, rows
        built = build(rows)
        self.g, self.x = built[0], built[1]
        # optional closed-form products (g, x, jtv, jv) from the fast path (no autograd graph)
        self._fast = built[2:] if len(built) > 2 else None
        self.batch = self.x.shape[0]
        self.n = self.x[0].numel()
        self.counter = counter if counter is not None else {"products": 0, "row_products": 0}
        self._u = self._w = None

    def subset(self, rows: torch.Tensor) -> JacobianProducts:
        rows = rows.to(self.x.device)
        keep = rows if self.rows is None else self.rows[rows]
        return JacobianProducts(self._build, self.symmetric, keep, self.counter)

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(self.batch, self.n, dtype=self.x.dtype, device=self.x.device)

    def _grad(self, out: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        self.counter["products"] += 1
        self.counter["row_products"] += self.batch
        if not out.requires_grad:  # J constant zero (e.g. a linear model's saliency)
            return self._zeros()
        (res,) = torch.autograd.grad(out, inp, grad_outputs=weight.reshape(out.shape), retain_graph=True,
                                     allow_unused=True)
        return self._zeros() if res is None else res.reshape(self.batch, self.n)

    def jtv(self, v: torch.Tensor) -> torch.Tensor:
        if self._fast is not None:
            return self._count(self._fast[0](v))
        return self._grad(self.g, self.x, v)

    def _count(self, res: torch.Tensor) -> torch.Tensor:
        self.counter["products"] += 1
        self.counter["row_products"] += self.batch
        return res

    def jv(self, v: torch.Tensor) -> torch.Tensor:
        if self._fast is not None:
            return self._count(self._fast[1](v))
        if self.symmetric:
            return self.jtv(v)
        if self._w is None:
            if not self.g.requires_grad:
                return self._zeros()
            self._u = torch.zeros_like(self.g, requires_grad=True)
            (w,) = torch.autograd.grad(self.g, self.x, grad_outputs=self._u, create_graph=True, allow_unused=True)
            self._w = w if w is not None else torch.zeros_like(self.x)
        return self._grad(self._w, self._u, v)

    def gram(self, v: torch.Tensor) -> torch.Tensor:
        """J^T J v."""
        return self.jtv(self.jv(v))


# ---------------------------------------------------------------------------------------------- fast path


_ELEMENTWISE = (nn.Softplus, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SiLU, nn.GELU, nn.ReLU, nn.LeakyReLU, nn.Identity)


def _supported_layer(m: nn.Module) -> bool:
    if type(m) is nn.Conv2d:
        return m.padding_mode == "zeros" and not isinstance(m.padding, str)
    return type(m) in (nn.Linear, nn.Flatten, nn.MaxPool2d) or type(m) in _ELEMENTWISE


def _flat_layers(net: nn.Module) -> list[nn.Module] | None:
    """The layers of a (nested) nn.Sequential if every one is supported by ``_SequentialHessian``, else None."""
    # exact types only: a subclass may override forward
    if type(net) is not nn.Sequential or net._forward_hooks or net._forward_pre_hooks:
        return None
    out: list[nn.Module] = []
    for m in net:
        if m._forward_hooks or m._forward_pre_hooks:
            return None
        if type(m) is nn.Sequential:
            sub = _flat_layers(m)
            if sub is None:
                return None
            out += sub
        elif _supported_layer(m):
            out.append(m)
        elif type(m) is nn.Dropout and not m.training:
            continue
        else:
            return None
    return out


def _activation_derivatives(m: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """s'(z) and s''(z) (None where identically 0) of an elementwise activation; closed forms for
    Softplus (PyTorch's: linear above ``threshold``) and ReLU, autograd otherwise."""
    if type(m) is nn.Softplus:
        bz = m.beta * z
        e = torch.exp(bz)
        lin = bz > m.threshold
        s1 = torch.where(lin, torch.ones_like(z), e / (e + 1))
        s2 = torch.where(lin, torch.zeros_like(z), m.beta * e / (e + 1) ** 2)
        return s1, s2
    if type(m) is nn.ReLU:
        return (z > 0).to(z.dtype), None
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        (s1,) = torch.autograd.grad(m(zz).sum(), zz, create_graph=True)
        s2 = None
        if s1.requires_grad:
            (s2,) = torch.autograd.grad(s1.sum(), zz, allow_unused=True)
    return s1.detach(), s2


class _SequentialHessian:
    """Input gradient g = grad_x f_y and Hessian-vector products H v for a Sequential of affine layers
    (Linear, Conv2d), elementwise activations, MaxPool2d and Flatten, without autograd graphs.

    With z_l the pre-activations, s', s'' the activation derivatives at z_l and r_l = df_y/da_l the
    backward signal, g = backprop of e_y, and H v is the directional derivative of that backprop along
    the forward tangent u_l = dz_l[v]: d(delta_l) = s''(z_l) u_l r_l + s'(z_l) d(r_l) (forward-over-reverse
    by hand: one tangent pass and one transposed pass per product, the per-layer constants computed once).
    """

    def __init__(self, layers: list[nn.Module], x: torch.Tensor, target: torch.Tensor, curvature: bool = True):
        self.layers = layers
        self.shapes: list[torch.Size] = []
        self.consts: list = []
        self._shared: dict = {}
        z = x
        with torch.no_grad():
            for m in layers:
                self.shapes.append(z.shape)
                if isinstance(m, nn.MaxPool2d):
                    z, idx = F.max_pool2d(z, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                                          return_indices=True)
                    self.consts.append(idx.flatten(2))
                elif type(m) in _ELEMENTWISE:
                    s1, s2 = _activation_derivatives(m, z)
                    s2 = s2 if curvature else None
                    self.consts.append([s1, s2, None])  # s''(z) r, the curvature weight, set below
                    z = m(z)
                elif isinstance(m, nn.Conv2d) and m.in_channels == 1 and m.groups == 1 and z.dim() == 4:
                    wt = m.weight.reshape(m.out_channels, -1).t().contiguous()  # shared by all samples
                    self._shared[id(wt)] = wt
                    self.consts.append(wt)
                    z = m(z)
                else:
                    self.consts.append(None)
                    z = m(z)
            if z.dim() != 2 or z.shape[0] != x.shape[0]:
                raise ValueError(f"model must return (B, classes) logits, got shape {tuple(z.shape)}")
            self.logits = z
            r = torch.zeros_like(z)
            r.scatter_(1, target.view(-1, 1), 1.0)
            for i in reversed(range(len(layers))):
                c = self.consts[i]
                if isinstance(c, list):
                    c[2] = None if c[1] is None else c[1] * r  # s''(z) r: the curvature weight
                r = self._transpose(i, r)
        self.g = r
        acts = [i for i, c in enumerate(self.consts) if isinstance(c, list)]
        self.depth = acts[-1] + 1 if acts else 0  # the tangent is not needed past the last activation

    def subset(self, rows: torch.Tensor) -> _SequentialHessian:
        """The same operator restricted to some samples (per-sample constants indexed, nothing recomputed)."""
        out = copy.copy(self)

        def pick(c):
            if c is None:
                return None
            if isinstance(c, list):
                return [pick(t) for t in c]
            return c if id(c) in self._shared else c[rows]

        out.consts = [pick(c) for c in self.consts]
        out.shapes = [torch.Size((len(rows),) + tuple(sh[1:])) for sh in self.shapes]
        out.g = self.g[rows]
        out.logits = self.logits[rows]
        return out

    def backprop(self, r: torch.Tensor) -> torch.Tensor:
        """J_f(x)^T r for r (B, classes) at the logits: one transposed pass, all samples at once."""
        with torch.no_grad():
            for i in reversed(range(len(self.layers))):
                r = self._transpose(i, r)
        return r

    def _transpose(self, i: int, r: torch.Tensor) -> torch.Tensor:
        m, shape, c = self.layers[i], self.shapes[i], self.consts[i]
        if isinstance(m, nn.Linear):
            return r @ m.weight
        if isinstance(m, nn.Conv2d):
            if m.in_channels == 1 and m.groups == 1 and len(shape) == 4:
                # one input channel: W^T r as a matmul, then fold (col2im) -- about 3x faster on CPU than
                # the transposed convolution (measured, batch 256, one thread)
                cols = torch.matmul(c, r.reshape(r.shape[0], r.shape[1], -1))
                return F.fold(cols, tuple(shape[2:]), m.kernel_size, m.dilation, m.padding, m.stride)
            if len(shape) != 4:
                return torch.nn.grad.conv2d_input(shape, m.weight, r, m.stride, m.padding, m.dilation, m.groups)
            # the transposed convolution on a channels-last r: 2-2.5x faster on CPU than conv2d_input
            # (measured: 3.8 vs 9.7 ms for cnn-small's second layer at batch 256, one thread)
            extra = tuple(shape[2 + d] - ((r.shape[2 + d] - 1) * m.stride[d] - 2 * m.padding[d]
                                          + m.dilation[d] * (m.kernel_size[d] - 1) + 1) for d in range(2))
            out = F.conv_transpose2d(r.contiguous(memory_format=torch.channels_last), m.weight, None, m.stride,
                                     m.padding, extra, m.groups, m.dilation)
            return out.contiguous()
        if isinstance(m, nn.MaxPool2d):
            out = torch.zeros(shape[0], shape[1], shape[2] * shape[3], dtype=r.dtype, device=r.device)
            return out.scatter_add_(2, c, r.flatten(2)).view(shape)
        if isinstance(m, nn.Flatten):
            return r.reshape(shape)
        return r * c[0]  # elementwise: s'(z) r

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v for v shaped like x (batched)."""
        tangents: list = [None] * len(self.layers)
        u = v
        with torch.no_grad():
            for i, m in enumerate(self.layers[: self.depth]):
                if isinstance(m, nn.Linear):
                    u = F.linear(u, m.weight)
                elif isinstance(m, nn.Conv2d):
                    u = F.conv2d(u, m.weight, None, m.stride, m.padding, m.dilation, m.groups)
                elif isinstance(m, nn.MaxPool2d):
                    c = self.consts[i]
                    u = u.flatten(2).gather(2, c).view(u.shape[0], u.shape[1], *self._pool_out(i))
                elif isinstance(m, nn.Flatten):
                    u = m(u)
                else:
                    tangents[i] = u
                    u = u * self.consts[i][0]
            dr = None  # the tangent of the backward signal; zero at the logits (e_y is constant)
            for i in reversed(range(self.depth)):
                c = self.consts[i]
                if isinstance(c, list):
                    s1, _, s2r = c
                    if dr is None:
                        dr = None if s2r is None else s2r * tangents[i]
                    else:
                        dr = s1 * dr if s2r is None else torch.addcmul(s1 * dr, s2r, tangents[i])
                elif dr is not None:
                    dr = self._transpose(i, dr)
        return torch.zeros_like(v) if dr is None else dr

    def _pool_out(self, i: int) -> tuple[int, int]:
        nxt = self.shapes[i + 1] if i + 1 < len(self.shapes) else None
        if nxt is not None:
            return tuple(nxt[2:])
        raise ValueError("MaxPool2d as the last layer is not supported")


def _fast_products(hess: _SequentialHessian, x: torch.Tensor, name: str) -> tuple:
    """(g, x, jtv, jv) for saliency (J = H) or gradient x input (J = diag(grad f) + diag(x) H,
    J^T v = grad f * v + H (x v)) from ``_SequentialHessian``; x, v are (B, n) for the products."""
    batch, shape = x.shape[0], x.shape
    flat_x = x.detach().reshape(batch, -1)
    grad = hess.g.reshape(batch, -1)

    def hv(v: torch.Tensor) -> torch.Tensor:
        return hess.hvp(v.reshape(shape)).reshape(batch, -1)

    if name == "saliency":
        return hess.g, x, hv, hv
    return (x.detach() * hess.g, x, lambda v: grad * v + hv(flat_x * v),
            lambda v: grad * v + flat_x * hv(v))
