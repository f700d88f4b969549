"""Model zoo: architectures as documented, activations, bad names."""
import pytest
import torch
from torch import nn

from certattr.errors import CertattrError
from certattr.models import ZOO, build_model, has_relu, softplus_surrogate


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("activation", ["relu", "softplus"])
def test_zoo_shapes_and_activation(name, activation):
    model = build_model(name, activation=activation, beta=5.0)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert has_relu(model) == (activation == "relu")
    if activation == "softplus":
        assert all(m.beta == 5.0 for m in model.modules() if isinstance(m, nn.Softplus))
    assert model.certattr_spec["name"] == name


def test_cifar_shaped_models():
    model = build_model("lenet5", in_shape=(3, 32, 32))
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_documented_architectures():
    lenet = build_model("lenet5")
    convs = [m for m in lenet if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (3, 3)), (64, (3, 3))]
    assert [m.out_features for m in lenet if isinstance(m, nn.Linear)] == [200, 10]
    madry = build_model("madry-cnn")
    convs = [m for m in madry if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (5, 5)), (64, (5, 5))]
    assert [m.out_features for m in madry if isinstance(m, nn.Linear)] == [1024, 10]
    assert sum(isinstance(m, nn.MaxPool2d) for m in madry) == 2


def test_surrogate_of_a_custom_nested_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.block(x))

    sur = softplus_surrogate(Net(), beta=2.0)
    assert isinstance(sur.block[1], nn.Softplus) and sur.block[1].beta == 2.0


def test_bad_model_names_and_args():
    with pytest.raises(CertattrError, match="unknown model"):
        build_model("resnet-1000")
    with pytest.raises(CertattrError, match="activation"):
        build_model("mlp", activation="gelu")
    with pytest.raises(CertattrError, match="in_shape"):
        build_model("mlp", in_shape=(28, 28))
    with pytest.raises(CertattrError, match="beta"):
        softplus_surrogate(build_model("mlp"), beta=0)
