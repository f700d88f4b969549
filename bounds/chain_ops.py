"""The parsed network: a chain of simple ops (``Affine``, ``Act``, ``Reshape``, ``MaxPool``) in a ``Chain``,
and the sound boxes of its discontinuous derivative factors (the ReLU step, the max-pool routing).

Split out of ``gradgraph`` (which re-exports every name); ``chain_parse`` builds a ``Chain`` from a
model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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


def ops_device_dtype(ops: list) -> tuple[torch.device, torch.dtype]:
    for op in ops:
        if isinstance(op, Affine):
            return op.weight.device, op.weight.dtype
    return torch.device("cpu"), torch.get_default_dtype()


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
