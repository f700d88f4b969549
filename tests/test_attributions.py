"""Attributions against Captum (the oracle), differentiability, batching and bad input."""
import pytest
import torch
from captum.attr import InputXGradient, IntegratedGradients, Saliency

from certattr.attributions import (
    attribution_map,
    get_attribution,
    grad_x_input,
    integrated_gradients,
    saliency,
    smoothgrad,
)
from certattr.errors import CertattrError
from certattr.models import build_model, softplus_surrogate


@pytest.fixture(scope="module", params=["relu", "softplus"])
def net(request):
    torch.manual_seed(0)
    return build_model("lenet5", activation=request.param).eval()


@pytest.fixture(scope="module")
def batch():
    return torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_saliency_matches_captum(net, batch):
    target = net(batch).argmax(1)
    ours = saliency(net, batch)
    theirs = Saliency(net).attribute(batch, target=target, abs=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_grad_x_input_matches_captum(net, batch):
    target = torch.tensor([0, 1, 2, 3, 4])
    ours = grad_x_input(net, batch, target=target)
    theirs = InputXGradient(net).attribute(batch, target=target)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [2, 7, 50])
def test_integrated_gradients_matches_captum(net, batch, steps):
    target = net(batch).argmax(1)
    ours = integrated_gradients(net, batch, steps=steps, chunk_size=64)
    theirs = IntegratedGradients(net).attribute(batch, target=target, n_steps=steps, method="riemann_right",
                                                baselines=torch.zeros_like(batch))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_integrated_gradients_completeness_on_linear_model():
    """For a linear model IG is exact: sum_i IG_i = f_y(x) - f_y(0) for any number of steps."""
    torch.manual_seed(3)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    x = torch.rand(3, 1, 3, 4)
    y = torch.tensor([0, 2, 3])
    ig = integrated_gradients(lin, x, target=y, steps=3)
    gain = lin(x).gather(1, y[:, None]).squeeze(1) - lin(torch.zeros_like(x)).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(ig.flatten(1).sum(1), gain, rtol=1e-5, atol=1e-6)


def test_custom_baseline_matches_captum(net, batch):
    target = net(batch).argmax(1)
    base = torch.full_like(batch, 0.5)
    ours = integrated_gradients(net, batch, steps=10, baseline=base)
    theirs = IntegratedGradients(net).attribute(batch, target=target, n_steps=10, method="riemann_right",
                                                baselines=base)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_batched_equals_one_at_a_time(net, batch):
    for fn in (saliency, grad_x_input, lambda m, x: integrated_gradients(m, x, steps=5)):
        whole = fn(net, batch)
        single = torch.cat([fn(net, batch[i:i + 1]) for i in range(batch.shape[0])])
        torch.testing.assert_close(whole, single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["saliency", "grad_x_input", "ig"])
def test_create_graph_gives_correct_second_derivatives(name):
    """gradcheck: the attribution is differentiable and its autograd derivative matches finite differences."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 5), torch.nn.Softplus(beta=3),
                              torch.nn.Linear(5, 3)).double()
    x = torch.rand(2, 1, 2, 3, dtype=torch.float64, requires_grad=True)
    fn = get_attribution(name)
    kwargs = {"steps": 4} if name == "ig" else {}
    target = torch.tensor([0, 2])
    assert torch.autograd.gradcheck(lambda inp: fn(net, inp, target=target, create_graph=True, **kwargs), (x,))


def test_create_graph_reaches_weights():
    torch.manual_seed(0)
    net = build_model("cnn-small", activation="softplus")
    x = torch.rand(2, 1, 28, 28)
    g = saliency(net, x, create_graph=True)
    g.pow(2).sum().backward()
    # every weight gets a gradient (the last bias cannot: d f_y/dx does not depend on it)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in net.named_parameters()
               if n.endswith("weight"))
    assert net[0].weight.grad.abs().sum() > 0


def test_smoothgrad_is_mean_of_noisy_saliency(net, batch):
    sg = smoothgrad(net, batch, sigma=0.1, n=8, seed=4)
    assert torch.equal(sg, smoothgrad(net, batch, sigma=0.1, n=8, seed=4))  # seeded
    gen = torch.Generator().manual_seed(4)
    noise = torch.randn((8,) + tuple(batch.shape), generator=gen) * 0.1
    target = net(batch).argmax(1)
    manual = torch.stack([saliency(net, batch + noise[i], target=target) for i in range(8)]).mean(0)
    torch.testing.assert_close(sg, manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(smoothgrad(net, batch, sigma=0.0, n=3), saliency(net, batch), rtol=1e-5, atol=1e-7)


def test_attribution_map_collapses_channels():
    g = torch.tensor([[[[1.0, -2.0]], [[-3.0, 0.5]]]])  # (1, 2, 1, 2)
    assert torch.equal(attribution_map(g), torch.tensor([[4.0, 2.5]]))


def test_softplus_surrogate_keeps_weights_and_approaches_relu(batch):
    torch.manual_seed(0)
    net = build_model("lenet5").eval()
    sur = softplus_surrogate(net, beta=1000.0)
    assert not any(isinstance(m, torch.nn.ReLU) for m in sur.modules())
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), sur.state_dict().values()))
    torch.testing.assert_close(sur(batch), net(batch), atol=5e-3, rtol=0)
    assert any(isinstance(m, torch.nn.ReLU) for m in net.modules())  # the original is untouched


@pytest.mark.parametrize("bad, message", [
    (torch.full((2, 1, 28, 28), float("nan")), "NaN"),
    (torch.rand(2, 1, 28, 28).masked_fill(torch.rand(2, 1, 28, 28) > 0.5, float("inf")), "NaN or inf"),
    (torch.randint(0, 255, (2, 1, 28, 28)), "floating-point"),
    (torch.rand(2, 1, 27, 28), "shape"),
    (torch.rand(28), "batch"),
])
def test_bad_input_raises_clear_error(net, bad, message):
    with pytest.raises(CertattrError, match=message):
        saliency(net, bad)


def test_unknown_attribution_and_bad_target(net, batch):
    with pytest.raises(CertattrError, match="unknown attribution"):
        get_attribution("lime")
    with pytest.raises(CertattrError, match="target"):
        saliency(net, batch, target=torch.tensor([1, 2]))
    with pytest.raises(CertattrError, match="out of range"):
        saliency(net, batch, target=12)
    with pytest.raises(CertattrError, match="steps"):
        integrated_gradients(net, batch, steps=0)
