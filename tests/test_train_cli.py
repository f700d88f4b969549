"""``certattr train`` end to end: bad input fails before any work, the final evaluation line and the
metrics it records, the method and every hyperparameter in the checkpoint meta, and --resume."""

from __future__ import annotations

import json

import pytest

from certattr import checkpoint
from certattr.cli import main
from certattr.train.losses import default_hparams


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--method", "magic"], "unknown training method 'magic'"),
        (["--method", "pgd-at", "--eps", "-0.1"], "eps"),
        (["--method", "ig-norm", "--lambda", "-1"], "lambda must be >= 0"),
        (["--method", "trades", "--lambda", "-1"], "beta must be >= 0"),
        (["--method", "pgd-at", "--eps", "1.5"], "larger than the data domain"),
        (["--method", "pgd-at", "--hp", "norm=2", "--eps", "30"], "larger than the data domain"),
        (["--method", "pgd-at", "--lambda", "1"], "no regulariser weight"),
        (["--method", "ig-norm", "--hp", "lamda=1"], "no hyperparameter 'lamda'"),
        (["--method", "natural", "--eps", "-1"], "--eps"),
        (["--method", "natural", "--eval-n", "-3"], "--eval-n"),
    ],
)
def test_bad_input_fails_cleanly_before_training(argv, message, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["train", *argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("certattr train: error:") and message in err[0]
    assert not out.exists()


def test_train_prints_final_evaluation_and_records_meta(tmp_path, capsys):
    out = tmp_path / "trades"
    rc = main(
        [
            "train",
            "--method",
            "trades",
            "--train-subset",
            "64",
            "--batch-size",
            "32",
            "--hp",
            "steps=2",
            "--lambda",
            "3",
            "--eval-n",
            "4",
            "--eval-pgd-n",
            "40",
            "--eval-steps",
            "3",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("final evaluation:")]
    assert len(lines) == 1
    for word in ("natural accuracy", "PGD accuracy", "top-k intersection", "Kendall"):
        assert word in lines[0]
    spec = checkpoint.info(out)
    assert spec["method"] == "trades"
    assert spec["hyperparameters"] == {**default_hparams("trades", "mnist"), "steps": 2, "beta": 3.0}
    metrics = spec["metrics"]
    for key in ("natural_accuracy", "pgd_accuracy", "topk_intersection", "kendall"):
        assert key in metrics
    assert f"{metrics['natural_accuracy']:.4f}" in lines[0] and f"{metrics['pgd_accuracy']:.4f}" in lines[0]
    assert metrics["evaluation"]["n_pgd"] == 40 and metrics["evaluation"]["pgd_steps"] == 3
    assert metrics["evaluation"]["eps"] == 0.3  # the training eps (MNIST default)
    json.dumps(metrics, allow_nan=False)  # NaNs are stored as null
    model = checkpoint.load(out)  # weights still match the recorded hash after the meta re-save
    assert model is not None


def test_cli_resume_gives_the_uninterrupted_weights(tmp_path):
    common = [
        "train",
        "--method",
        "pgd-at",
        "--train-subset",
        "64",
        "--batch-size",
        "32",
        "--hp",
        "steps=2",
        "--eps",
        "0.2",
        "--seed",
        "4",
        "--no-eval",
        "--no-progress",
    ]
    assert main([*common, "--epochs", "2", "--out", str(tmp_path / "full")]) == 0
    assert main([*common, "--epochs", "1", "--out", str(tmp_path / "cut")]) == 0
    first = checkpoint.info(tmp_path / "cut")["sha256"]
    assert main([*common, "--epochs", "2", "--resume", "--out", str(tmp_path / "cut")]) == 0
    resumed = checkpoint.info(tmp_path / "cut")["sha256"]
    assert resumed == checkpoint.info(tmp_path / "full")["sha256"] != first
