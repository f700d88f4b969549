"""certattr.checkpoint: safetensors + JSON round trips, hashes, factories, and refusals.

Oracles: hashlib on the raw file, the model's own outputs and state_dict before saving, and the
unsafe loaders (pickle.load / torch.load(weights_only=False)) to prove each malicious payload is live.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
import sys
import zipfile
from datetime import datetime, timezone

import pytest
import torch
import torch.serialization as tser
from torch import nn

from certattr import checkpoint as ck
from certattr.errors import CertattrError
from certattr.models import build_model, softplus_surrogate

FACTORY_MODULE = "certattr_test_user_models"
FACTORY_SOURCE = '''
import torch
from torch import nn


def tiny(width=8, classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, width), nn.ReLU(), nn.Linear(width, classes))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 6, bias=False)
        self.dec = nn.Linear(6, 6, bias=False)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


def tied():
    return Tied()


def not_a_model():
    return {"weights": 1}


def broken():
    raise RuntimeError("factory exploded")


CONSTANT = 3
'''


def _plant_marker(path):
    """The payload of the malicious pickles: proof of execution if the file appears."""
    with open(path, "w") as fh:
        fh.write("pwned")
    return {}


class _RunsFunction:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_plant_marker, (self.marker,))


class _RunsShell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    folder = tmp_path / "userpkg"
    folder.mkdir()
    (folder / f"{FACTORY_MODULE}.py").write_text(FACTORY_SOURCE)
    (folder / "certattr_test_bad_import.py").write_text("import certattr_no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(folder))
    for name in (FACTORY_MODULE, "certattr_test_bad_import"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield FACTORY_MODULE
    for name in (FACTORY_MODULE, "certattr_test_bad_import"):
        sys.modules.pop(name, None)


def _inputs(shape, seed=0, batch=4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, *shape, generator=g)


# --------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("activation", ["relu", "softplus"])
@pytest.mark.parametrize("name", ["mlp", "cnn-small", "lenet5", "madry-cnn"])
def test_zoo_round_trip_identical(tmp_path, name, activation):
    torch.manual_seed(1)
    model = build_model(name, activation=activation, beta=5.0).eval()
    x = _inputs((1, 28, 28))
    path = ck.save(model, tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" and (path / "model.safetensors").is_file()
    loaded = ck.load(path)
    assert not loaded.training
    assert loaded is not model and type(loaded) is type(model)
    assert repr(loaded) == repr(model)
    assert loaded.certattr_spec == model.certattr_spec
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_round_trip_non_default_kwargs_and_dtype(tmp_path):
    torch.manual_seed(2)
    model = build_model("mlp", in_shape=(3, 8, 8), num_classes=7, hidden=(32, 16)).double().eval()
    path = ck.save(model, tmp_path / "deep" / "er" / "ckpt")  # parents are created
    loaded = ck.load(path)
    assert loaded.certattr_spec["kwargs"] == {"in_shape": [3, 8, 8], "num_classes": 7, "hidden": [32, 16]}
    assert loaded[1].weight.dtype == torch.float64  # saved precision kept, not cast to float32
    x = _inputs((3, 8, 8)).double()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert ck.info(path)["in_shape"] == [3, 8, 8]


def test_load_from_files_inside_the_directory(tmp_path):
    torch.manual_seed(3)
    model = build_model("mlp", hidden=(8,)).eval()
    path = ck.save(model, tmp_path / "c")
    x = _inputs((1, 28, 28))
    for target in (path, path / "certattr.json", path / "model.safetensors", str(path)):
        with torch.no_grad():
            assert torch.equal(ck.load(target)(x), model(x))


def test_save_and_load_leave_the_global_rng_alone(tmp_path):
    torch.manual_seed(14)
    model = build_model("cnn-small")
    state = torch.get_rng_state()
    path = ck.save(model, tmp_path / "r")
    ck.load(path)
    assert torch.equal(torch.get_rng_state(), state)


def test_save_load_save_is_stable(tmp_path):
    torch.manual_seed(4)
    first = ck.save(build_model("lenet5"), tmp_path / "a", dataset="mnist")
    second = ck.save(ck.load(first), tmp_path / "b", dataset="mnist")
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert ck.info(first)["sha256"] == ck.info(second)["sha256"]


# ----------------------------------------------------------------------------------- metadata
def test_meta_round_trip(tmp_path):
    torch.manual_seed(5)
    model = build_model("mlp", hidden=(16,))
    meta = dict(
        dataset="mnist",
        normalisation={"mean": [0.1307], "std": [0.3081]},
        method="ig-norm",
        hyperparameters={"eps": 0.1, "lr": 1e-3, "epochs": 2},
        metrics={"clean_acc": torch.tensor(0.975), "note": None},
        seed=7,
        run_id="abc",
        tags=["a", "b"],
    )
    before = datetime.now(timezone.utc).replace(microsecond=0)
    path = ck.save(model, tmp_path / "m", **meta)
    spec = json.loads((path / "certattr.json").read_text())
    assert spec["format"] == "certattr-checkpoint" and spec["format_version"] == 1
    assert spec["architecture"] == model.certattr_spec
    assert spec["architecture"]["name"] == "mlp" and spec["architecture"]["kwargs"]["hidden"] == [16]
    assert spec["in_shape"] == [1, 28, 28]  # the zoo default when not given
    for key in ("dataset", "normalisation", "method", "hyperparameters", "seed", "run_id", "tags"):
        assert spec[key] == meta[key], key
    assert spec["metrics"] == {"clean_acc": pytest.approx(0.975), "note": None}
    created = datetime.fromisoformat(spec["created"])
    assert created.utcoffset().total_seconds() == 0 and created >= before
    assert spec["versions"]["torch"] == torch.__version__
    assert spec["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert set(spec["versions"]) == {"certattr", "torch", "python"}

    loaded = ck.load(path)
    attached = loaded.certattr_checkpoint
    assert attached["path"] == str(path)
    for key, value in spec.items():
        assert attached[key] == value, key
    info = ck.info(path)
    assert {k: info[k] for k in spec} == spec


def test_zoo_model_defaults_in_spec(tmp_path):
    spec = ck.info(ck.save(build_model("lenet5", in_shape=(3, 32, 32)), tmp_path / "z"))
    assert spec["in_shape"] == [3, 32, 32]
    assert spec["normalisation"] is None and spec["dataset"] is None and spec["seed"] is None


def test_meta_must_be_json_serialisable(tmp_path):
    model = build_model("mlp", hidden=(4,))
    with pytest.raises(CertattrError, match="'hyperparameters' is not JSON-serialisable"):
        ck.save(model, tmp_path / "x", hyperparameters={"optimizer": torch.optim.SGD})
    with pytest.raises(CertattrError, match="'weights' is not JSON-serialisable"):
        ck.save(model, tmp_path / "x", weights=torch.zeros(3))
    assert not (tmp_path / "x").exists()  # nothing written on a metadata error
    with pytest.raises(CertattrError, match="reserved"):
        ck.save(model, tmp_path / "x", sha256="0" * 64)


def test_save_refuses_models_it_cannot_rebuild(tmp_path):
    plain = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(CertattrError, match="factory="):
        ck.save(plain, tmp_path / "p")
    # layers swapped by hand after build_model: the spec no longer describes the model
    edited = build_model("mlp", hidden=(4,))
    edited[2] = nn.Tanh()
    with pytest.raises(CertattrError, match="no longer matches its certattr_spec"):
        ck.save(edited, tmp_path / "s")
    # softplus_surrogate updates the spec, so a surrogate round-trips as the softplus model it is
    surrogate = softplus_surrogate(build_model("mlp", hidden=(4,)), beta=7.0)
    reloaded = ck.load(ck.save(surrogate, tmp_path / "sur"))
    assert isinstance(reloaded[2], nn.Softplus) and reloaded[2].beta == 7.0
    with pytest.raises(CertattrError, match="expects a torch.nn.Module, got dict"):
        ck.save({"w": torch.zeros(2)}, tmp_path / "d")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CertattrError, match="not a directory"):
        ck.save(build_model("mlp", hidden=(4,)), tmp_path / "afile")


def test_files_honour_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = ck.save(build_model("mlp", hidden=(4,)), tmp_path / "u")
    finally:
        os.umask(old)
    for item in (path, path / "model.safetensors", path / "certattr.json"):
        assert item.stat().st_mode & 0o044 == 0o044, item
    assert sorted(p.name for p in path.iterdir()) == ["certattr.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["u"]  # no staging leftovers


# ------------------------------------------------------------------------------------- hashing
def test_sha256_recorded_and_streamed(tmp_path):
    torch.manual_seed(6)
    path = ck.save(build_model("mlp", hidden=(1024,)), tmp_path / "h")  # 3.2 MB: several 1 MiB chunks
    raw = (path / "model.safetensors").read_bytes()
    assert len(raw) > 3 * (1 << 20)
    digest = hashlib.sha256(raw).hexdigest()
    assert ck.sha256_file(path / "model.safetensors") == digest
    assert json.loads((path / "certattr.json").read_text())["sha256"] == digest
    assert ck.load(path).certattr_checkpoint["sha256"] == digest
    info = ck.info(path)
    assert info["sha256"] == info["recorded_sha256"] == digest
    small = tmp_path / "small.bin"
    small.write_bytes(b"")
    assert ck.sha256_file(small) == hashlib.sha256(b"").hexdigest()


def test_tampered_weights_fail_the_hash(tmp_path):
    torch.manual_seed(7)
    path = ck.save(build_model("mlp", hidden=(8,)), tmp_path / "t")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last float: still a valid safetensors file
    weights.write_bytes(bytes(data))
    from safetensors.torch import load_file

    load_file(str(weights))  # parses fine: only the hash can catch it
    with pytest.raises(CertattrError, match="checkpoint weights do not match their recorded hash"):
        ck.load(path)
    info = ck.info(path)
    assert info["sha256"] != info["recorded_sha256"]


# ------------------------------------------------------------------------------ corrupt files
def test_truncated_safetensors(tmp_path, factory_module):
    torch.manual_seed(8)
    path = ck.save(build_model("cnn-small"), tmp_path / "cut")
    weights = path / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CertattrError, match="corrupt or truncated safetensors file"):
        ck.load(path)
    # a standalone .safetensors loaded through a factory, cut in half
    from safetensors.torch import save_file

    lone = tmp_path / "lone.safetensors"
    save_file(_factory_state(factory_module), str(lone))
    lone.write_bytes(lone.read_bytes()[: lone.stat().st_size // 2])
    with pytest.raises(CertattrError, match="corrupt or truncated safetensors file"):
        ck.load(lone, factory=f"{factory_module}:tiny")


def test_corrupt_json(tmp_path):
    path = ck.save(build_model("mlp", hidden=(4,)), tmp_path / "j")
    spec_file = path / "certattr.json"
    good = spec_file.read_text()
    spec_file.write_text(good[: len(good) // 2])
    with pytest.raises(CertattrError, match="corrupt checkpoint spec"):
        ck.load(path)
    with pytest.raises(CertattrError, match="corrupt checkpoint spec"):
        ck.info(path)
    spec_file.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CertattrError, match="corrupt checkpoint spec"):
        ck.load(path)
    spec_file.write_text("[1, 2]")
    with pytest.raises(CertattrError, match="expected a JSON object"):
        ck.load(path)
    spec = json.loads(good)
    for edit, message in (
        ({"sha256": None}, "malformed sha256"),
        ({"format": "something-else"}, "not a certattr checkpoint spec"),
        ({"format_version": 99}, "format_version 99"),
        ({"architecture": {"kwargs": {}}}, "no architecture name or factory"),
    ):
        spec_file.write_text(json.dumps({**spec, **edit}))
        with pytest.raises(CertattrError, match=message):
            ck.load(path)


def test_corrupt_torch_files(tmp_path, factory_module):
    good = tmp_path / "good.pt"
    torch.save(_factory_state(factory_module), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a torch file" * 20)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for bad in (cut, junk, empty):
        expected = r"corrupt or truncated torch file|refusing to unpickle"
        with pytest.raises(CertattrError, match=expected) as err:
            ck.load(bad, factory=f"{factory_module}:tiny")
        assert "\n" not in str(err.value)


def test_missing_paths_and_not_a_checkpoint(tmp_path, factory_module):
    with pytest.raises(CertattrError, match="checkpoint not found"):
        ck.load(tmp_path / "nope")
    with pytest.raises(CertattrError, match="checkpoint not found"):
        ck.info(tmp_path / "nope")
    weights = tmp_path / "w.pt"
    torch.save(_factory_state(factory_module), weights)
    with pytest.raises(CertattrError, match="not a certattr checkpoint.*factory="):
        ck.load(weights)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CertattrError, match="not a certattr checkpoint"):
        ck.load(tmp_path / "emptydir")
    path = ck.save(build_model("mlp", hidden=(4,)), tmp_path / "nw")
    (path / "model.safetensors").unlink()
    with pytest.raises(CertattrError, match="has no model.safetensors"):
        ck.load(path)


# ------------------------------------------------------------------------- architecture errors
def _rewrite_arch(path, arch):
    spec_file = path / "certattr.json"
    spec = json.loads(spec_file.read_text())
    spec["architecture"] = arch
    spec_file.write_text(json.dumps(spec))


def test_weights_of_a_different_architecture(tmp_path, factory_module):
    path = ck.save(build_model("mlp", hidden=(32,)), tmp_path / "mlp")
    _rewrite_arch(path, {"name": "mlp", "kwargs": {"hidden": [16]}})
    with pytest.raises(CertattrError, match=r"shape mismatch at key '1\.weight'.*\(32, 784\).*\(16, 784\)"):
        ck.load(path)
    _rewrite_arch(path, {"name": "cnn-small", "kwargs": {}})
    with pytest.raises(CertattrError, match="missing key '0.weight'"):
        ck.load(path)
    _rewrite_arch(path, {"name": "mlp", "kwargs": {"hidden": []}})
    with pytest.raises(CertattrError, match=r"unexpected key '3\.(weight|bias)'"):
        ck.load(path)
    # a zoo checkpoint's weights handed to a user factory
    with pytest.raises(CertattrError, match="do not fit.*key '1.weight'"):
        ck.load(path / "model.safetensors", factory=f"{factory_module}:tiny")


def test_unknown_architecture_name(tmp_path):
    path = ck.save(build_model("mlp", hidden=(4,)), tmp_path / "u")
    _rewrite_arch(path, {"name": "resnet-9000", "kwargs": {}})
    with pytest.raises(CertattrError, match="unknown model 'resnet-9000'"):
        ck.load(path)
    _rewrite_arch(path, {"name": "mlp", "kwargs": {"no_such_arg": 1}})
    with pytest.raises(CertattrError, match="bad arguments for model 'mlp'"):
        ck.load(path)


# -------------------------------------------------------------------------------- user models
def _factory_state(module_name, **kwargs):
    import importlib

    return importlib.import_module(module_name).tiny(**kwargs).state_dict()


def _reference(module_name, seed, **kwargs):
    import importlib

    model = importlib.import_module(module_name).tiny(**kwargs)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model"])
def test_factory_load_torch_save(tmp_path, factory_module, wrap):
    ref = _reference(factory_module, seed=9, width=5, classes=4)
    sd = ref.state_dict()
    payload = {
        "raw": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd, "opt": {"lr": 0.1}},
    }[wrap]
    weights = tmp_path / "user.pt"
    torch.save(payload, weights)
    loaded = ck.load(weights, factory=f"{factory_module}:tiny", width=5, classes=4)
    assert not loaded.training
    x = _inputs((12,), seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref(x))
    info = loaded.certattr_checkpoint
    assert info["architecture"] == {"factory": f"{factory_module}:tiny", "kwargs": {"width": 5, "classes": 4}}
    assert info["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_factory_load_safetensors_and_bad_payloads(tmp_path, factory_module):
    from safetensors.torch import save_file

    ref = _reference(factory_module, seed=10)
    st = tmp_path / "user.safetensors"
    save_file(ref.state_dict(), str(st))
    loaded = ck.load(st, factory=f"{factory_module}:tiny")
    x = _inputs((12,), seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref(x))
    odd = tmp_path / "odd.pt"
    torch.save({"weights": [1, 2, 3]}, odd)
    with pytest.raises(CertattrError, match="holds no state_dict"):
        ck.load(odd, factory=f"{factory_module}:tiny")
    torch.save(torch.zeros(3), odd)
    with pytest.raises(CertattrError, match="holds no state_dict"):
        ck.load(odd, factory=f"{factory_module}:tiny")


def test_factory_checkpoint_needs_explicit_factory(tmp_path, factory_module):
    import importlib

    model = importlib.import_module(factory_module).tiny(width=6)
    path = ck.save(model, tmp_path / "f", factory=f"{factory_module}:tiny", factory_kwargs={"width": 6})
    spec = ck.info(path)
    assert spec["architecture"] == {"factory": f"{factory_module}:tiny", "kwargs": {"width": 6}}
    assert spec["in_shape"] is None
    # a checkpoint file never makes certattr import code
    with pytest.raises(CertattrError, match="does not import code named in a checkpoint"):
        ck.load(path)
    loaded = ck.load(path, factory=f"{factory_module}:tiny")  # recorded kwargs (width=6) reused
    x = _inputs((12,), seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    # the loaded model remembers its factory, so it can be saved again without meta
    again = ck.save(loaded, tmp_path / "f2")
    assert ck.info(again)["architecture"] == spec["architecture"]
    with pytest.raises(CertattrError, match="without factory="):
        ck.load(path, width=6)


def test_tied_weights_survive(tmp_path, factory_module):
    import importlib

    torch.manual_seed(11)
    model = importlib.import_module(factory_module).tied()
    path = ck.save(model, tmp_path / "tied", factory=f"{factory_module}:tied")
    loaded = ck.load(path, factory=f"{factory_module}:tied")
    assert loaded.enc.weight is loaded.dec.weight
    x = _inputs((6,), seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_factory_errors(tmp_path, factory_module):
    weights = tmp_path / "w.pt"
    torch.save(_factory_state(factory_module), weights)
    cases = [
        ("certattr_no_such_module_xyz:build", "cannot import factory module 'certattr_no_such_module_xyz'"),
        (f"{factory_module}:missing", f"factory module '{factory_module}' has no attribute 'missing'"),
        (f"{factory_module}:CONSTANT", "is not callable"),
        (f"{factory_module}:not_a_model", "returned a dict, not a torch.nn.Module"),
        (f"{factory_module}:broken", "factory exploded"),
        ("certattr_test_bad_import:build", "importing factory module 'certattr_test_bad_import' failed"),
        ("no_colon_here", "factory must be 'module:function'"),
        (":tiny", "factory must be 'module:function'"),
    ]
    for factory, message in cases:
        with pytest.raises(CertattrError, match=message) as err:
            ck.load(weights, factory=factory)
        assert "\n" not in str(err.value), factory
    with pytest.raises(CertattrError, match="factory .*failed: TypeError"):
        ck.load(weights, factory=f"{factory_module}:tiny", depth=3)


# ------------------------------------------------------------------------------ unsafe pickles
@pytest.mark.parametrize("payload", [_RunsFunction, _RunsShell])
@pytest.mark.parametrize("writer", ["torch.save", "pickle-protocol2", "pickle-default"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, factory_module, payload, writer):
    marker = tmp_path / "pwned"
    evil = {"0.weight": torch.zeros(2), "extra": payload(marker)}
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(evil, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(evil, fh, protocol=2 if writer == "pickle-protocol2" else pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CertattrError, match=r"refusing to unpickle .*\(weights_only\)") as err:
        ck.load(path, factory=f"{factory_module}:tiny")
    assert "\n" not in str(err.value)
    assert not marker.exists()
    # control: the payload is live, an unsafe loader runs it
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as fh:
            pickle.load(fh)
    assert marker.exists()


def test_refusal_names_the_offending_global(tmp_path, factory_module):
    path = tmp_path / "evil.pt"
    torch.save({"x": _RunsShell(tmp_path / "m")}, path)
    with pytest.raises(CertattrError, match=r"GLOBAL (posix|os|nt)\.system"):
        ck.load(path, factory=f"{factory_module}:tiny")
    assert not (tmp_path / "m").exists()


# -------------------------------------------------------------------------------------- devices
def test_cuda_tagged_state_dict_loads_on_cpu(tmp_path, factory_module, monkeypatch):
    ref = _reference(factory_module, seed=12)
    path = tmp_path / "cuda.pt"

    def cuda_tag(obj):
        return "cuda:0"

    with monkeypatch.context() as m:  # every storage gets the location tag "cuda:0", as on a GPU box
        m.setattr(tser, "_package_registry", [(0, cuda_tag, None)] + list(tser._package_registry))
        torch.save(ref.state_dict(), path)
    with zipfile.ZipFile(path) as zf:
        pkl = next(n for n in zf.namelist() if n.endswith("data.pkl"))
        assert b"cuda:0" in zf.read(pkl)
    if not torch.cuda.is_available():  # proof the tag is real: a plain load wants CUDA
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    loaded = ck.load(path, factory=f"{factory_module}:tiny", map_location="cpu")
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    x = _inputs((12,), seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref(x))


def test_map_location(tmp_path):
    path = ck.save(build_model("mlp", hidden=(4,)), tmp_path / "d")
    assert all(p.device.type == "cpu" for p in ck.load(path, map_location=torch.device("cpu")).parameters())
    with pytest.raises(CertattrError, match="bad map_location"):
        ck.load(path, map_location="not-a-device")
    if torch.cuda.is_available():
        model = ck.load(path, map_location="cuda")
        assert all(p.device.type == "cuda" for p in model.parameters())
    else:
        with pytest.raises(CertattrError, match="CUDA is not available"):
            ck.load(path, map_location="cuda")


# ------------------------------------------------------------------------------------ atomicity
def test_interrupted_save_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(13)
    old_model = build_model("mlp", hidden=(8,)).eval()
    new_model = build_model("mlp", hidden=(8,)).eval()
    real_write = ck._atomic_write

    def dies_at(name):
        def write(target, data):
            if target.name == name:
                tmp = target.with_name(f".{target.name}.partial-by-test")
                tmp.write_bytes(data[: len(data) // 3])  # killed mid-write
                raise KeyboardInterrupt
            real_write(target, data)
        return write

    # a fresh checkpoint: staged in a hidden folder, so nothing appears at the path
    monkeypatch.setattr(ck, "_atomic_write", dies_at("certattr.json"))
    with pytest.raises(KeyboardInterrupt):
        ck.save(old_model, tmp_path / "fresh")
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(ck, "_atomic_write", real_write)
    path = ck.save(old_model, tmp_path / "ckpt")
    x = _inputs((1, 28, 28))
    # overwriting, killed while writing the weights: the old checkpoint is intact
    monkeypatch.setattr(ck, "_atomic_write", dies_at("model.safetensors"))
    with pytest.raises(KeyboardInterrupt):
        ck.save(new_model, path)
    with torch.no_grad():
        assert torch.equal(ck.load(path)(x), old_model(x))
    # killed between the two files: new weights, old spec -> detected, never silently loaded
    monkeypatch.setattr(ck, "_atomic_write", dies_at("certattr.json"))
    with pytest.raises(KeyboardInterrupt):
        ck.save(new_model, path)
    with pytest.raises(CertattrError, match="do not match their recorded hash"):
        ck.load(path)
