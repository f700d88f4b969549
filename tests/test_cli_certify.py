"""``certattr certify`` end to end on a tiny checkpoint and 8 MNIST test images."""

from __future__ import annotations

import csv

import pytest
import torch

from certattr import __version__, checkpoint
from certattr.cli import main
from certattr.data import load_dataset
from certattr.models import build_model

HEADER = [
    "idx",
    "label",
    "predict",
    "correct",
    "bound",
    "norm",
    "eps",
    "attribution",
    "euclidean",
    "cosine",
    "label_certified",
    "time",
]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("mlp", hidden=(16,), activation="relu")
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save(model, path, dataset="mnist")
    return path


def _read(path):
    lines = path.read_text().splitlines()
    comments = [ln for ln in lines if ln.startswith("#")]
    rows = list(csv.reader([ln for ln in lines if not ln.startswith("#")], delimiter="\t"))
    return comments, rows[0], rows[1:]


def test_certify_certified_writes_one_line_per_image(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "cert.tsv"
    rc = main(
        [
            "certify",
            str(tiny_ckpt),
            "--dataset",
            "mnist",
            "--n",
            "8",
            "--start",
            "3",
            "--bound",
            "certified",
            "--norm",
            "inf",
            "--eps",
            "0.01",
            "--method",
            "ibp",
            "--batch-size",
            "3",
            "--seed",
            "5",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    comments, header, rows = _read(out)
    assert header == HEADER
    assert len(rows) == 8
    text = "\n".join(comments)
    assert f"certattr {__version__}" in text and f"torch {torch.__version__}" in text and "seed 5" in text
    assert f"sha256 {checkpoint.info(tiny_ckpt)['sha256']}" in text
    x, y = load_dataset("mnist", "test")
    assert [int(r[0]) for r in rows] == list(range(3, 11))
    assert [int(r[1]) for r in rows] == y[3:11].tolist()
    for r in rows:
        assert r[4] == "certified" and r[5] == "inf" and float(r[6]) == 0.01 and r[7] == "saliency"
        assert float(r[8]) >= 0 and -1 <= float(r[9]) <= 1 and r[10] in ("0", "1")
        assert int(r[3]) == int(r[1] == r[2])
    # the numbers are those of the library call on the same images
    from bounds import certified_bound

    model = checkpoint.load(tiny_ckpt)
    ref = certified_bound(model, x[3:11], 0.01, "inf", "saliency", method="ibp")
    torch.testing.assert_close(torch.tensor([float(r[8]) for r in rows]), ref.euclidean, rtol=1e-4, atol=1e-6)
    assert [bool(int(r[10])) for r in rows] == ref.label_certified.tolist()
    summary = capsys.readouterr().err
    assert (
        "8 images" in summary
        and "label certified" in summary
        and "median" in summary
        and "cosine >= 0.9" in summary
    )


def test_certify_crown_and_practical(tiny_ckpt, tmp_path):
    for bound in ("certified", "practical"):
        out = tmp_path / f"{bound}.tsv"
        rc = main(
            [
                "certify",
                str(tiny_ckpt),
                "--n",
                "4",
                "--bound",
                bound,
                "--norm",
                "2",
                "--eps",
                "0.1",
                "--attribution",
                "grad_x_input",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        assert rc == 0
        _, header, rows = _read(out)
        assert header == HEADER and len(rows) == 4 and all(r[4] == bound and r[5] == "2" for r in rows)


def test_certify_smoothed(tiny_ckpt, tmp_path):
    out = tmp_path / "smoothed.tsv"
    rc = main(
        [
            "certify",
            str(tiny_ckpt),
            "--n",
            "2",
            "--bound",
            "smoothed",
            "--norm",
            "2",
            "--eps",
            "0.1",
            "--radius",
            "0.5",
            "--n-samples",
            "32",
            "--alpha",
            "0.01",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    comments, _, rows = _read(out)
    assert len(rows) == 2 and "radius 0.5 n_samples 32 alpha 0.01" in "\n".join(comments)


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--bound", "smoothed", "--norm", "inf", "--eps", "0.1"], "l2"),
        (["--bound", "certified", "--eps", "-1"], "eps"),
        (["--bound", "certified", "--eps", "0.1", "--norm", "L3"], "L3"),
        (["--bound", "certified", "--eps", "0.1", "--attribution", "lrp"], "lrp"),
        (["--bound", "certified", "--eps", "0.1", "--n", "0"], "--n"),
    ],
)
def test_certify_user_errors(tiny_ckpt, tmp_path, capsys, extra, match):
    rc = main(
        ["certify", str(tiny_ckpt), "--n", "2", "--out", str(tmp_path / "x.tsv"), "--no-progress"] + extra
    )
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("certattr certify: error:") and match in err[0]


def test_certify_complete_rows_carry_lower_upper_gap(tiny_ckpt, tmp_path, capsys):
    """--bound complete: branch and bound per image; lower <= upper (= euclidean), gap = upper - lower, and
    lower is reached on the real net (checked by recomputing the deviation at the witness in the API)."""
    out = tmp_path / "bab.tsv"
    rc = main(["certify", str(tiny_ckpt), "--dataset", "mnist", "--n", "3", "--bound", "complete",
               "--norm", "inf", "--eps", "0.01", "--budget", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    comments, header, rows = _read(out)
    assert header == HEADER + ["lower", "gap", "subdomains", "stop_reason"]
    assert any("bound complete budget_s 2" in c for c in comments)
    for row in rows:
        rec = dict(zip(header, row))
        upper, lower, gap = float(rec["euclidean"]), float(rec["lower"]), float(rec["gap"])
        assert 0 <= lower <= upper + 1e-9 and abs(upper - lower - gap) <= 1e-5 * (1 + upper)
        assert rec["stop_reason"] in ("gap closed", "exhausted", "budget", "memory")
    assert "SOUND over the whole ball" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [(["--budget", "0"], "--budget"), (["--tol", "-1"], "--tol"),
                                             (["--branching", "phases", "--attribution", "ig"], "phase branching")])
def test_certify_complete_bad_input(tiny_ckpt, tmp_path, capsys, flags, message):
    out = tmp_path / "bad.tsv"
    rc = main(["certify", str(tiny_ckpt), "--n", "1", "--bound", "complete", "--eps", "0.01", "--out", str(out),
               "--no-progress", *flags])
    assert rc != 0
    assert message in capsys.readouterr().err


def test_certify_alpha_crown_is_at_least_as_tight_as_crown(tiny_ckpt, tmp_path):
    """``--method alpha-crown`` reaches certified_bound's optimised bound (never looser than CROWN here)."""
    rows = {}
    for method in ("crown", "alpha-crown"):
        out = tmp_path / f"{method}.tsv"
        rc = main(["certify", str(tiny_ckpt), "--n", "4", "--bound", "certified", "--method", method,
                   "--alpha-iters", "3", "--norm", "inf", "--eps", "0.02", "--out", str(out), "--no-progress"])
        assert rc == 0
        _, header, body = _read(out)
        rows[method] = [float(r[header.index("euclidean")]) for r in body]
    assert all(a <= c * (1 + 1e-9) for a, c in zip(rows["alpha-crown"], rows["crown"]))


@pytest.mark.parametrize("mode", ["crown", "alpha-beta"])
def test_certify_complete_subdomain_bound(tiny_ckpt, tmp_path, mode):
    """``--subdomain-bound`` reaches complete_bound and is recorded; both modes give lower <= upper."""
    out = tmp_path / f"sub-{mode}.tsv"
    rc = main(["certify", str(tiny_ckpt), "--dataset", "mnist", "--n", "2", "--bound", "complete", "--norm", "inf",
               "--eps", "0.005", "--budget", "1", "--subdomain-bound", mode, "--out", str(out), "--no-progress"])
    assert rc == 0
    comments, header, rows = _read(out)
    assert any(f"subdomain_bound {mode}" in c for c in comments)
    for row in rows:
        rec = dict(zip(header, row))
        assert float(rec["lower"]) <= float(rec["euclidean"]) + 1e-9
