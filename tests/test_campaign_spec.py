"""Campaign spec validation: every mistake is a CertattrError naming the key, raised before anything runs."""
from __future__ import annotations

from pathlib import Path

import pytest

from certattr.campaign.spec import load_spec, parse_spec
from certattr.campaign.units import expand, total_rows
from certattr.errors import CertattrError

BASE = """
name = "t"
seed = 3
batch_size = 4
checkpoints = ["zoo:cnn-small@mnist:tiny"]

[data]
dataset = "mnist"
start = 10
n = 10

[grid]
attributions = ["saliency", "ig"]
norms = ["inf", 2]
eps = {inf = [0.0, 0.01], 2 = [0.5]}

[[attacks]]
name = "ifia"
restarts = 2
params = { kind = "topk", k = 50, steps = 3, step_size = 0.01 }

[[attacks]]
name = "deviation"
params = { objective = "cosine", steps = 3 }

[[bounds]]
kind = "practical"

[[bounds]]
kind = "certified"
params = { method = "ibp" }
"""


def test_valid_spec_parses_and_expands():
    spec = parse_spec(BASE)
    assert spec.name == "t" and spec.seed == 3 and spec.start == 10 and spec.n == 10
    assert spec.norms == ["inf", "2"]
    assert spec.eps == {"inf": [0.0, 0.01], "2": [0.5]}
    assert [m.label for m in spec.attacks] == ["ifia-topk", "deviation-cosine"]
    assert [m.label for m in spec.bounds] == ["practical", "certified-ibp"]
    assert spec.attacks[0].params["step_size"] == 0.01
    # rows: 1 ckpt x 10 samples x 2 attributions x 3 (norm, eps) x (2 + 1 + 1 + 1) runs
    assert total_rows(spec) == 10 * 2 * 3 * 5
    units, already = expand(spec, {"f" * 64: "/nowhere"})
    assert already == 0
    assert sum(len(u.samples) for u in units) == total_rows(spec)
    assert {len(u.samples) for u in units} == {4, 2}  # batches 10-13, 14-17, 18-19
    assert min(min(u.samples) for u in units) == 10 and max(max(u.samples) for u in units) == 19
    keys = [(u.group, u.samples) for u in units]
    assert len(set(keys)) == len(keys)
    # seeds: independent of the batch, different across restarts
    ifia = [u for u in units if u.method == "ifia-topk" and u.attribution == "saliency" and u.norm == "2"]
    assert {u.seed for u in ifia if u.restart == 0} != {u.seed for u in ifia if u.restart == 1}
    assert len({u.seed for u in ifia if u.restart == 0}) == 1


def test_eps_list_applies_to_every_norm():
    spec = parse_spec(BASE.replace("eps = {inf = [0.0, 0.01], 2 = [0.5]}", "eps = [0.1, 0.2]"))
    assert spec.eps == {"inf": [0.1, 0.2], "2": [0.1, 0.2]}


def _bad(old: str, new: str, match: str):
    assert old in BASE, old
    with pytest.raises(CertattrError, match=match):
        parse_spec(BASE.replace(old, new, 1))


@pytest.mark.parametrize("old,new,match", [
    ('name = "t"', 'name = "t"\nworkers = 2', r"unknown key 'workers'"),
    ("start = 10", "start = 10\nstride = 2", r"unknown key data\.'stride'"),
    ('kind = "topk", k = 50', 'kind = "topk", kk = 50', r"attacks\[0\]\.params\.kk"),
    ("restarts = 2", "restarts = 2\nrepeats = 1", r"unknown key attacks\[0\]\.'repeats'"),
    ("n = 10", "n = 0", r"data\.n must be > 0"),
    ("n = 10", "n = -3", r"data\.n must be > 0"),
    ("n = 10", 'n = "ten"', r"data\.n must be int"),
    ("start = 10", "start = -1", r"data\.start must be >= 0"),
    ("batch_size = 4", "batch_size = 0", r"batch_size must be > 0"),
    ("eps = {inf = [0.0, 0.01], 2 = [0.5]}", "eps = [-0.1]", r"grid\.eps: eps must be a finite number >= 0"),
    ("eps = {inf = [0.0, 0.01], 2 = [0.5]}", "eps = {inf = [0.1]}", r"grid\.eps has no values for norm\(s\) 2"),
    ("eps = {inf = [0.0, 0.01], 2 = [0.5]}", 'eps = ["a"]', r"grid\.eps: 'a' is not a number"),
    ("eps = {inf = [0.0, 0.01], 2 = [0.5]}", "eps = 0.1", r"grid\.eps must be a list"),
    ('norms = ["inf", 2]', 'norms = ["inf", 1]', r"grid\.norms: unknown norm 1"),
    ('attributions = ["saliency", "ig"]', 'attributions = ["saliency", "lrp"]',
     r"grid\.attributions: unknown attribution 'lrp'"),
    ('attributions = ["saliency", "ig"]', 'attributions = ["smoothgrad"]', r"bounds support only"),
    ('name = "ifia"', 'name = "fgsm"', r"attacks\[0\]\.name: unknown attack 'fgsm'"),
    ('kind = "practical"', 'kind = "exact"', r"bounds\[0\]\.kind: unknown bound 'exact'"),
    ('method = "ibp"', 'method = "beta-crown"', r"bounds\[1\]\.params\.method must be one of crown, ibp, alpha-crown"),
    ("steps = 3, step_size = 0.01", "steps = 2.5, step_size = 0.01", r"attacks\[0\]\.params\.steps must be an integer"),
    ("step_size = 0.01", "step_size = -0.01", r"attacks\[0\]\.params\.step_size must be a number > 0"),
    ("restarts = 2", "restarts = 0", r"attacks\[0\]\.restarts must be > 0"),
    ('kind = "topk", k = 50', 'kind = "topk", eps = 0.3', r"attacks\[0\]\.params\.eps.*set by the campaign"),
    ('kind = "topk", k', 'kind = "targeted", k', r"targeted IFIA needs a per-image mask"),
    ('dataset = "mnist"', 'dataset = "imagenet"', r"data\.dataset 'imagenet' unknown"),
    ('dataset = "mnist"', 'dataset = "idx"', r"data\.root is required"),
    ('checkpoints = ["zoo:cnn-small@mnist:tiny"]', 'checkpoints = ["zoo:resnet@mnist:tiny"]',
     r"checkpoints\[0\]: unknown zoo model 'resnet'"),
    ('checkpoints = ["zoo:cnn-small@mnist:tiny"]', 'checkpoints = ["zoo:cnn-small@mnist:long"]',
     r"unknown zoo recipe 'long'"),
    ('checkpoints = ["zoo:cnn-small@mnist:tiny"]', "checkpoints = []", r"checkpoints must be a non-empty list"),
    ('checkpoints = ["zoo:cnn-small@mnist:tiny"]\n', "", r"missing required key checkpoints"),
    ('kind = "certified"\nparams = { method = "ibp" }', 'kind = "practical"', r"label 'practical' used twice"),
    ('seed = 3', 'seed = true', r"seed must be int, got a boolean"),
    ('[[bounds]]\nkind = "practical"', '[[bounds]]\nkind = "practical"\nrestarts = 2', r"restarts must be 1"),
])
def test_invalid_specs_name_the_key(old, new, match):
    _bad(old, new, match)


def test_not_toml_and_nothing_to_run():
    with pytest.raises(CertattrError, match="not valid TOML"):
        parse_spec("checkpoints = [")
    no_methods = BASE[: BASE.index("[[attacks]]")]
    with pytest.raises(CertattrError, match="nothing to run"):
        parse_spec(no_methods)


def test_missing_checkpoint_file_is_reported_before_running(tmp_path: Path):
    text = BASE.replace('"zoo:cnn-small@mnist:tiny"', '"models/absent"')
    (tmp_path / "spec.toml").write_text(text)
    with pytest.raises(CertattrError, match=r"checkpoint 'models/absent' not found"):
        load_spec(tmp_path / "spec.toml")
    (tmp_path / "models" / "absent").mkdir(parents=True)  # relative paths resolve against the spec's folder
    spec = load_spec(tmp_path / "spec.toml")
    assert spec.checkpoint_path("models/absent") == str((tmp_path / "models" / "absent").resolve())
    with pytest.raises(CertattrError, match="not found"):
        load_spec(tmp_path / "missing.toml")


def test_shipped_specs_are_valid():
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "campaigns"
    smoke = load_spec(root / "smoke.toml")
    assert len(smoke.attacks) >= 2 and len({m.name for m in smoke.bounds}) >= 2
    paper = load_spec(root / "paper.toml")
    assert total_rows(paper) > total_rows(smoke)


def test_cli_dry_run_and_error(tmp_path: Path, capsys):
    from certattr.cli import main

    good = tmp_path / "good.toml"
    good.write_text(BASE)
    assert main(["campaign", str(good), "--store", str(tmp_path / "s.sqlite"), "--dry-run"]) == 0
    assert '"rows": 300' in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE.replace("n = 10", "n = 0"))
    assert main(["campaign", str(bad), "--store", str(tmp_path / "s.sqlite")]) == 1
    err = capsys.readouterr().err
    assert "data.n must be > 0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.sqlite").exists()  # nothing ran, no store created
