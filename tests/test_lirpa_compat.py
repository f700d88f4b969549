"""auto_LiRPA 0.3 on current torch through bounds.lirpa_compat: the restored pieces work and CROWN
bounds are sound (they contain the outputs at sampled points of the perturbation set)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bounds.gradgraph import GradNet, parse_chain
from bounds.lirpa_compat import _needs_patches, _tangent_tables, import_auto_lirpa

al = import_auto_lirpa()
PATCHED = _needs_patches(getattr(al, "__version__", "0.3"))


def _samples(x: torch.Tensor, eps: float, norm: str, count: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if norm == "inf":
        d = (torch.rand((count,) + tuple(x.shape), generator=gen) * 2 - 1) * eps
        d[: count // 2] = d[: count // 2].sign() * eps  # vertices
    else:
        d = torch.randn((count,) + tuple(x.shape), generator=gen)
        d = d / d.flatten(2).norm(dim=2).view(count, x.shape[0], *([1] * (x.dim() - 1))) * eps
    return x.unsqueeze(0) + d


def _crown(net: nn.Module, x: torch.Tensor, eps: float, norm: str):
    bm = al.BoundedModule(net, x[:1], verbose=False)
    ptb = al.PerturbationLpNorm(norm=np.inf if norm == "inf" else 2, eps=eps)
    with torch.no_grad():
        return bm.compute_bounds(x=(al.BoundedTensor(x, ptb),), method="CROWN")


def test_import_is_idempotent_and_exports():
    assert import_auto_lirpa() is al
    for name in ("BoundedModule", "BoundedTensor", "PerturbationLpNorm"):
        assert hasattr(al, name)
    import torch.onnx.symbolic_helper as helper

    assert hasattr(helper, "_set_opset_version")
    assert hasattr(torch._C.Node, "__getitem__")


def test_version_detection():
    assert _needs_patches("0.3") and _needs_patches("0.2") and _needs_patches("0.3.1")
    assert not _needs_patches("0.4.0") and not _needs_patches("0.7.1") and not _needs_patches("1.0")


def test_node_getitem_reads_attributes():
    graph = torch.jit.trace(
        lambda t: F.conv2d(t, torch.ones(2, 1, 3, 3), stride=2), torch.zeros(1, 1, 5, 5)
    ).graph
    conv = [n for n in graph.nodes() if n.kind() == "aten::_convolution" or n.kind() == "aten::conv2d"]
    const = [n for n in graph.nodes() if n.kind() == "prim::Constant" and "value" in n.attributeNames()]
    assert conv and const
    for n in const:
        assert n["value"] is not None  # dispatches on kindOf ("i", "f", "t", "ival", ...)


@pytest.mark.parametrize("norm,eps", [("inf", 0.1), ("2", 0.5)])
@pytest.mark.parametrize("act", ["relu", "softplus1", "softplus10"])
def test_crown_contains_sampled_outputs(act, norm, eps):
    torch.manual_seed(0)
    layer = {"relu": nn.ReLU(), "softplus1": nn.Softplus(), "softplus10": nn.Softplus(beta=10)}[act]
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 20), layer, nn.Linear(20, 12), layer, nn.Linear(12, 5)
    ).eval()
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    lb, ub = _crown(net, x, eps, norm)
    with torch.no_grad():
        out = net(_samples(x, eps, norm, 400, seed=2).flatten(0, 1)).view(400, 3, 5)
    assert (out >= lb - 1e-5).all() and (out <= ub + 1e-5).all()
    assert (ub - lb > 0).all()


def test_softplus_relaxation_is_valid():
    """The chord lies above softplus and the midpoint tangent below it on [l, u] (dense grid check)."""
    from auto_LiRPA.operators.activation import BoundSoftplus

    gen = torch.Generator().manual_seed(0)
    lower = torch.randn(200, generator=gen) * 5
    upper = lower + torch.rand(200, generator=gen) ** 3 * 10  # widths from ~0 to 10
    upper[:5] = lower[:5]  # zero width
    node = BoundSoftplus({}, [], 0, {})

    class Box:
        pass

    box = Box()
    box.lower, box.upper = lower, upper
    node.init_linear_relaxation(box)
    node.bound_relax(box)
    t = torch.linspace(0, 1, 101).view(-1, 1)
    z = lower + t * (upper - lower)
    f = F.softplus(z)
    assert (node.lw * z + node.lb <= f + 1e-5).all()
    assert (node.uw * z + node.ub >= f - 1e-5).all()


@pytest.mark.skipif(not PATCHED, reason="tables are only replaced for auto_LiRPA 0.3")
@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_s_shaped_tangent_tables_are_valid(name):
    func = torch.sigmoid if name == "sigmoid" else torch.tanh
    dfunc = (
        (lambda z: torch.sigmoid(z) * torch.sigmoid(-z))
        if name == "sigmoid"
        else (lambda z: 1 - torch.tanh(z) ** 2)
    )
    step, count = 0.01, 2000
    lower, upper = _tangent_tables(func, dfunc, step, count, None)
    u = step * torch.arange(count)
    # the tangent at lower[i] lies below f at u_i and on a grid of [-10, u_i]; at upper[i] above f on [-u_i, 10]
    for i in range(0, count, 97):
        zs = torch.linspace(-10, float(u[i]), 400)
        assert (dfunc(lower[i]) * (zs - lower[i]) + func(lower[i]) <= func(zs) + 1e-6).all()
        zs = torch.linspace(-float(u[i]), 10, 400)
        assert (dfunc(upper[i]) * (zs - upper[i]) + func(upper[i]) >= func(zs) - 1e-6).all()
    assert (lower <= 0).all() and (upper >= 0).all()
    # tight: a point halfway to 0 is not valid any more
    bad = lower[50:] / 2
    assert not (dfunc(bad) * (u[50:] - bad) + func(bad) <= func(u[50:])).all()


def test_s_shaped_nodes_are_sound():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 8), nn.Sigmoid(), nn.Linear(8, 3)
    )
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    lb, ub = _crown(net.eval(), x, 0.2, "inf")
    with torch.no_grad():
        out = net(_samples(x, 0.2, "inf", 400, seed=4).flatten(0, 1)).view(400, 2, 3)
    assert (out >= lb - 1e-5).all() and (out <= ub + 1e-5).all()


@pytest.mark.skipif(not PATCHED, reason="documents a quirk of auto_LiRPA 0.3")
def test_l2_input_node_has_zero_width_interval():
    """The quirk behind the identity stem: under l2, 0.3 gives the input node lower == upper == x."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(2, 1, 4, 4)
    bm = al.BoundedModule(net, x[:1], verbose=False)
    bm.compute_bounds(x=(al.BoundedTensor(x, al.PerturbationLpNorm(norm=2, eps=0.5)),), method="CROWN")
    node = next(n for n in bm._modules.values() if type(n).__name__ == "BoundInput")
    assert torch.equal(node.lower, node.upper)


@pytest.mark.parametrize("act", ["relu", "softplus"])
def test_l2_gradient_times_input_with_identity_stem_is_sound(act):
    """x * (d f_y / dx) under l2 (SPEC 8: unsound without the identity-linear workaround): CROWN on
    GradNet(times_input=True, identity_stem=True) contains the values at sampled points of the ball."""
    torch.manual_seed(0)
    layer = nn.ReLU() if act == "relu" else nn.Softplus(beta=3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), layer, nn.Linear(12, 3)).eval()
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    chain = parse_chain(net, (1, 4, 4))
    eps = 0.4
    target = torch.tensor([0, 2])
    onehot = F.one_hot(target, 3).float()
    pts = _samples(x, eps, "2", 300, seed=6)
    if act == "relu":
        # the ReLU derivative as a perturbed input with box [0, 1] (sound whatever the pattern)
        d0 = (net[1](x.flatten(1)) > 0).float()
        inputs = (x, onehot, d0)
        dptb = al.PerturbationLpNorm(norm=np.inf, eps=1.0, x_L=torch.zeros_like(d0), x_U=torch.ones_like(d0))
        extra = (al.BoundedTensor(d0, dptb),)
    else:
        inputs, extra = (x, onehot), ()
    gnet = GradNet(chain, times_input=True, identity_stem=True)
    bm = al.BoundedModule(gnet, inputs, bound_opts={"conv_mode": "matrix"}, verbose=False)
    with torch.no_grad():
        lb, ub = bm.compute_bounds(
            x=(al.BoundedTensor(x, al.PerturbationLpNorm(norm=2, eps=eps)), onehot) + extra, method="CROWN"
        )
    xs = pts.flatten(0, 1).requires_grad_(True)
    logits = net(xs)
    (grad,) = torch.autograd.grad(logits.gather(1, target.repeat(300).view(-1, 1)).sum(), xs)
    vals = (xs * grad).detach().view(300, 2, -1)
    assert (vals >= lb - 1e-5).all() and (vals <= ub + 1e-5).all()
