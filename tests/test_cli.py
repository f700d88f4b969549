"""The CLI: help for every subcommand, one-line errors with a non-zero exit, train + explain end to end."""
import subprocess
import sys

import pytest

from certattr.cli import build_parser, main


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in _subcommands():
        assert name in out
    assert {"train", "explain"} <= set(_subcommands())


@pytest.mark.parametrize("name", _subcommands())
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert "usage: certattr " + name in capsys.readouterr().out


def test_errors_are_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "certattr", "train", "--dataset", "imagenet-9000",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "imagenet-9000" in lines[0]


def test_debug_flag_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError):
        main(["--debug", "train", "--dataset", "nope", "--out", str(tmp_path)])


def test_train_then_explain(tmp_path, capsys):
    out = tmp_path / "model"
    code = main(["train", "--dataset", "mnist", "--model", "mlp", "--epochs", "1", "--train-subset", "2000",
                 "--out", str(out), "--no-progress", "--no-eval"] if "--no-eval" in _train_flags() else
                ["train", "--dataset", "mnist", "--model", "mlp", "--epochs", "1", "--train-subset", "2000",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    assert (out / "model.safetensors").exists() and (out / "certattr.json").exists()
    capsys.readouterr()
    plot = tmp_path / "maps.png"
    assert main(["explain", str(out), "--n", "4", "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert rows[0].split("\t")[:3] == ["idx", "label", "predict"]
    assert len(rows) == 5 and plot.stat().st_size > 1000


def _train_flags():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return {opt for a in action.choices["train"]._actions for opt in a.option_strings}
