"""The one training loop: natural training reaches an accuracy, is seeded, and resumes exactly."""
import pytest
import torch

from certattr.errors import CertattrError
from certattr.models import build_model
from certattr.train import accuracy, fit


def _model():
    torch.manual_seed(0)
    return build_model("mlp", hidden=(64,))


def test_natural_training_learns_mnist(mnist_train_small, mnist_test):
    model = _model()
    before = accuracy(model, *mnist_test)
    summary = fit(model, mnist_train_small, epochs=1, batch_size=64, seed=0, progress=False, test=mnist_test)
    assert before < 0.3
    assert summary["test_accuracy"] >= 0.85  # an MLP after one epoch on 10k images (0.86 measured)
    assert summary["steps"] == (10000 + 63) // 64


def test_seeded_training_is_reproducible(mnist_train_small):
    x, y = mnist_train_small[0][:512], mnist_train_small[1][:512]
    a, b = _model(), _model()
    fit(a, (x, y), epochs=1, batch_size=64, seed=3, progress=False)
    fit(b, (x, y), epochs=1, batch_size=64, seed=3, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_equals_uninterrupted_run(tmp_path, mnist_train_small):
    x, y = mnist_train_small[0][:512], mnist_train_small[1][:512]
    full = _model()
    fit(full, (x, y), epochs=2, batch_size=64, seed=1, progress=False, out=tmp_path / "full")
    part = _model()
    fit(part, (x, y), epochs=1, batch_size=64, seed=1, progress=False, out=tmp_path / "part")
    resumed = _model()  # a fresh process would rebuild the model from scratch
    fit(resumed, (x, y), epochs=2, batch_size=64, seed=1, progress=False, out=tmp_path / "part", resume=True)
    for p, q in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    from certattr.checkpoint import info, load

    meta = info(tmp_path / "part")
    assert meta["method"] == "natural" and meta["training"]["epochs"] == 2
    reloaded = load(tmp_path / "part")
    assert torch.equal(reloaded(x[:4]), resumed(x[:4]))


def test_bad_training_arguments():
    model = _model()
    data = (torch.rand(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))
    with pytest.raises(CertattrError, match="unknown training method"):
        fit(model, data, method="magic")
    with pytest.raises(CertattrError, match="epochs"):
        fit(model, data, epochs=0)
    with pytest.raises(CertattrError, match="labels"):
        fit(model, (data[0], data[1][:4]))
