"""Campaign specification: a TOML file, fully validated before anything runs.

A campaign is the grid  checkpoints x samples[start:start+n] x attributions x norms x eps x
(attacks x restarts  +  bounds)  (SPEC 6).  Layout::

    name = "smoke"              # optional
    seed = 0                    # optional, default 0
    batch_size = 8              # samples per work unit, optional, default 16
    checkpoints = ["zoo:cnn-small@mnist:quick", "runs/my-model"]

    [data]
    dataset = "mnist"           # mnist | fashion-mnist | idx | cifar10 | breast-cancer | wine (tabular)
    split = "test"              # optional, default "test"
    root = "path"               # optional (idx, cifar10)
    start = 0                   # optional, default 0
    n = 8

    [grid]
    attributions = ["saliency", "ig"]
    norms = ["inf", 2]
    eps = [0.01, 0.05]          # one list for every norm, or a table { inf = [...], 2 = [...] }

    [[attacks]]
    name = "ifia"               # ifia | deviation | pgd | smoothed
    label = "ifia-topk"         # optional; the method name stored in the results (unique)
    restarts = 2                # each restart is its own row (and work unit), seeded apart
    params = { kind = "topk", k = 100, steps = 20, step_size = 0.01 }
    # step_size_rel = 0.25      # instead of step_size: step = 0.25 * eps at every eps of the grid

    [[bounds]]
    kind = "certified"          # practical | certified | smoothed | complete
    params = { method = "crown" }

Pairing (SPEC 9.3): each attack records which function its deviations were measured on, and
compare checks each bound against the attacks on the function it bounds: a certified bound against
attacks on the real network; a practical bound on a ReLU net against a deviation attack with
``measure = "surrogate"`` and ``measure_beta`` equal to the bound's ``surrogate_beta`` (default 10);
a smoothed certificate against a ``smoothed`` attack with the same ``radius``.

``params`` are keyword arguments of the attack / bound function (``certattr.attacks.ifia``,
``deviation_attack``, ``pgd``, ``smoothed_attack``; ``bounds.practical_bound``, ``certified_bound``,
``smoothed_certificate``): the common ones are type-checked here, any other keyword the function takes
is passed through, anything else is an error.  The campaign sets model, x, eps, norm, attribution,
target (the clean prediction), domain, restarts and seed itself.  The smoothed certificate is an l2
certificate: on an l_inf grid it is evaluated at the l2 radius eps * sqrt(n) (B_inf is inside it).

Checkpoints are paths (relative ones are resolved against the spec file's folder) or
``zoo:MODEL@DATASET:RECIPE`` references, trained on first use and cached (see
:mod:`certattr.campaign.zoo`).  Every mistake raises :class:`CertattrError` naming the key.
"""
from __future__ import annotations

import inspect
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CertattrError, check_norm

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DATASETS = ("mnist", "fashion-mnist", "idx", "cifar10", "breast-cancer", "wine")
ATTRIBUTIONS = ("saliency", "grad_x_input", "ig", "smoothgrad")
BOUND_ATTRIBUTIONS = ("saliency", "grad_x_input", "ig")

# name -> (module, function) of the callables the runner invokes
ATTACK_FUNCS = {
    "ifia": ("certattr.attacks", "ifia"),
    "deviation": ("certattr.attacks", "deviation_attack"),
    "pgd": ("certattr.attacks", "pgd"),
    "smoothed": ("certattr.attacks", "smoothed_attack"),
}
BOUND_FUNCS = {
    "practical": ("bounds", "practical_bound"),
    "certified": ("bounds", "certified_bound"),
    "smoothed": ("bounds", "smoothed_certificate"),
    "complete": ("bounds", "complete_bound"),  # branch and bound on ReLU phases or input boxes (issue 10)
}

# Known parameters: key -> (type, check, description of the check).  Keys outside these tables are
# accepted only if the real function takes them as a keyword (checked against its signature).
_POS_INT = (int, lambda v: v > 0, "an integer > 0")
_NONNEG_INT = (int, lambda v: v >= 0, "an integer >= 0")
_POS_FLOAT = (float, lambda v: v > 0, "a number > 0")


def _choice(*options):
    return (str, lambda v: v in options, "one of " + ", ".join(options))


# step_size_rel (campaign-level, not passed through): step_size = step_size_rel * eps for each eps
ATTACK_PARAMS: dict[str, dict[str, tuple]] = {
    "ifia": {"kind": _choice("topk", "mass_center", "random", "targeted"), "k": _POS_INT,
             "steps": _POS_INT, "step_size": _POS_FLOAT, "step_size_rel": _POS_FLOAT,
             "surrogate_beta": _POS_FLOAT},
    "deviation": {"objective": _choice("euclidean", "cosine"), "steps": _POS_INT,
                  "step_size": _POS_FLOAT, "step_size_rel": _POS_FLOAT, "k": _POS_INT,
                  "measure": _choice("real", "surrogate"), "measure_beta": _POS_FLOAT},
    "pgd": {"steps": _POS_INT, "step_size": _POS_FLOAT, "step_size_rel": _POS_FLOAT},
    "smoothed": {"radius": _POS_FLOAT, "objective": _choice("euclidean", "cosine"), "steps": _POS_INT,
                 "step_size": _POS_FLOAT, "step_size_rel": _POS_FLOAT, "noise_samples": _POS_INT,
                 "eval_samples": _POS_INT, "alpha_eval": (float, lambda v: 0 < v < 1, "a number in (0, 1)"),
                 "surrogate_beta": _POS_FLOAT, "k": _POS_INT},
}
BOUND_PARAMS: dict[str, dict[str, tuple]] = {
    "practical": {"surrogate_beta": _POS_FLOAT},
    "certified": {"method": _choice("crown", "ibp", "alpha-crown"), "alpha_iters": _POS_INT},
    "smoothed": {"radius": _POS_FLOAT, "n_samples": _POS_INT,
                 "alpha": (float, lambda v: 0 < v < 1, "a number in (0, 1)")},
    "complete": {"budget_s": _POS_FLOAT, "tol": _POS_FLOAT, "objective": _choice("euclidean", "cosine"),
                 "branching": _choice("auto", "phases", "input"), "ig_steps": _POS_INT,
                 "subdomain_bound": _choice("auto", "crown", "alpha-beta")},
}
# arguments the runner sets itself: never allowed in params
RESERVED = frozenset({"model", "x", "y", "eps", "norm", "attribution", "target", "restarts", "seed", "domain"})

ZOO_PREFIX = "zoo:"


@dataclass(frozen=True)
class MethodSpec:
    """One attack or bound of the campaign; ``label`` is the name stored in the results."""

    family: str  # "attack" | "bound"
    name: str  # attack name (ifia, deviation, pgd) or bound kind (practical, certified, smoothed)
    label: str
    restarts: int
    params: dict[str, Any]

    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True)


@dataclass
class CampaignSpec:
    """A validated campaign (see the module docstring for the TOML layout)."""

    checkpoints: list[str]
    dataset: str
    n: int
    attributions: list[str]
    norms: list[str]
    eps: dict[str, list[float]]
    attacks: list[MethodSpec]
    bounds: list[MethodSpec]
    name: str = "campaign"
    seed: int = 0
    batch_size: int = 16
    split: str = "test"
    root: str | None = None
    start: int = 0
    text: str = ""
    base_dir: Path = field(default_factory=Path.cwd)

    @property
    def methods(self) -> list[MethodSpec]:
        return list(self.attacks) + list(self.bounds)

    def checkpoint_path(self, ref: str) -> str:
        """A zoo reference unchanged, a path resolved against the spec's folder."""
        if ref.startswith(ZOO_PREFIX):
            return ref
        p = Path(ref).expanduser()
        return str(p if p.is_absolute() else (self.base_dir / p).resolve())


# --------------------------------------------------------------------------- loading

def load_spec(path: str | Path) -> CampaignSpec:
    """Read and validate a campaign TOML file."""
    path = Path(path)
    if not path.is_file():
        raise CertattrError(f"campaign spec {str(path)!r} not found")
    return parse_spec(path.read_text(encoding="utf-8"), base_dir=path.resolve().parent)


def parse_spec(text: str, *, base_dir: str | Path | None = None, check_files: bool = True) -> CampaignSpec:
    """Parse and validate campaign TOML text; ``base_dir`` resolves relative checkpoint paths."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CertattrError(f"campaign spec is not valid TOML: {exc}") from None
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    spec = _validate(doc, base)
    spec.text = text
    if check_files:
        for ref in spec.checkpoints:
            _check_checkpoint(spec, ref)
    return spec


def _validate(doc: dict, base: Path) -> CampaignSpec:
    _keys(doc, "", required={"checkpoints", "data", "grid"},
          optional={"name", "seed", "batch_size", "attacks", "bounds"})
    name = _typed(doc.get("name", "campaign"), str, "name")
    seed = _typed(doc.get("seed", 0), int, "seed")
    if seed < 0:
        raise CertattrError(f"campaign spec: seed must be >= 0, got {seed}")
    batch_size = _typed(doc.get("batch_size", 16), int, "batch_size")
    if batch_size <= 0:
        raise CertattrError(f"campaign spec: batch_size must be > 0, got {batch_size}")

    ckpts = doc["checkpoints"]
    if isinstance(ckpts, str):
        ckpts = [ckpts]
    ckpts = _str_list(ckpts, "checkpoints")
    for i, ref in enumerate(ckpts):
        if ref.startswith(ZOO_PREFIX):
            parse_zoo_ref(ref, key=f"checkpoints[{i}]")
    if len(set(ckpts)) != len(ckpts):
        raise CertattrError("campaign spec: checkpoints lists the same checkpoint twice")

    data = _table(doc["data"], "data")
    _keys(data, "data", required={"dataset", "n"}, optional={"split", "root", "start"})
    dataset = _typed(data["dataset"], str, "data.dataset")
    if dataset not in DATASETS:
        raise CertattrError(f"campaign spec: data.dataset {dataset!r} unknown; choose from {', '.join(DATASETS)}")
    split = _typed(data.get("split", "test"), str, "data.split")
    if split not in ("train", "test"):
        raise CertattrError(f"campaign spec: data.split must be 'train' or 'test', got {split!r}")
    root = data.get("root")
    if root is not None:
        root = _typed(root, str, "data.root")
        root_path = Path(root).expanduser()
        root = str(root_path if root_path.is_absolute() else (base / root_path).resolve())
    elif dataset in ("idx", "cifar10"):
        raise CertattrError(f"campaign spec: data.root is required for dataset {dataset!r}")
    start = _typed(data.get("start", 0), int, "data.start")
    if start < 0:
        raise CertattrError(f"campaign spec: data.start must be >= 0, got {start}")
    n = _typed(data["n"], int, "data.n")
    if n <= 0:
        raise CertattrError(f"campaign spec: data.n must be > 0, got {n}")

    grid = _table(doc["grid"], "grid")
    _keys(grid, "grid", required={"attributions", "norms", "eps"}, optional=set())
    attributions = _str_list(grid["attributions"], "grid.attributions")
    for a in attributions:
        if a not in ATTRIBUTIONS:
            raise CertattrError(f"campaign spec: grid.attributions: unknown attribution {a!r}; "
                                f"choose from {', '.join(ATTRIBUTIONS)}")
    _no_dups(attributions, "grid.attributions")
    raw_norms = grid["norms"]
    if not isinstance(raw_norms, list) or not raw_norms:
        raise CertattrError("campaign spec: grid.norms must be a non-empty list")
    norms = []
    for v in raw_norms:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise CertattrError(f"campaign spec: grid.norms: bad norm {v!r}; use 2 or 'inf'")
        try:
            norms.append(check_norm(v))
        except CertattrError:
            raise CertattrError(f"campaign spec: grid.norms: unknown norm {v!r}; use 2 or 'inf'") from None
    _no_dups(norms, "grid.norms")
    eps = _eps_grid(grid["eps"], norms)

    attacks = [_method(t, "attack", i) for i, t in enumerate(_table_list(doc.get("attacks", []), "attacks"))]
    bounds = [_method(t, "bound", i) for i, t in enumerate(_table_list(doc.get("bounds", []), "bounds"))]
    if not attacks and not bounds:
        raise CertattrError("campaign spec: nothing to run: give at least one [[attacks]] or [[bounds]] entry")
    labels = [m.label for m in attacks + bounds]
    for lab in labels:
        if labels.count(lab) > 1:
            raise CertattrError(f"campaign spec: method label {lab!r} used twice; give each entry its own 'label'")
    if bounds:
        for a in attributions:
            if a not in BOUND_ATTRIBUTIONS:
                raise CertattrError(f"campaign spec: grid.attributions: bounds support only "
                                    f"{', '.join(BOUND_ATTRIBUTIONS)}, not {a!r}")
    return CampaignSpec(checkpoints=ckpts, dataset=dataset, n=n, attributions=attributions, norms=norms,
                        eps=eps, attacks=attacks, bounds=bounds, name=name, seed=seed, batch_size=batch_size,
                        split=split, root=root, start=start, base_dir=base)


def _eps_grid(raw, norms: list[str]) -> dict[str, list[float]]:
    if isinstance(raw, list):
        values = _eps_list(raw, "grid.eps")
        return {nm: list(values) for nm in norms}
    if isinstance(raw, dict):
        out: dict[str, list[float]] = {}
        for key, vals in raw.items():
            try:
                nm = check_norm(key)
            except CertattrError:
                raise CertattrError(f"campaign spec: grid.eps: unknown norm key {key!r}; use 2 or inf") from None
            if nm not in norms:
                raise CertattrError(f"campaign spec: grid.eps.{key}: norm {key!r} is not in grid.norms")
            out[nm] = _eps_list(vals, f"grid.eps.{key}")
        missing = [nm for nm in norms if nm not in out]
        if missing:
            raise CertattrError(f"campaign spec: grid.eps has no values for norm(s) {', '.join(missing)}")
        return out
    raise CertattrError("campaign spec: grid.eps must be a list of numbers or a table {inf = [...], 2 = [...]}")


def _eps_list(raw, key: str) -> list[float]:
    if not isinstance(raw, list) or not raw:
        raise CertattrError(f"campaign spec: {key} must be a non-empty list of numbers")
    out = []
    for v in raw:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise CertattrError(f"campaign spec: {key}: {v!r} is not a number")
        if not math.isfinite(v) or v < 0:
            raise CertattrError(f"campaign spec: {key}: eps must be a finite number >= 0, got {v!r}")
        out.append(float(v))
    _no_dups(out, key)
    return out


def _method(table, family: str, index: int) -> MethodSpec:
    where = f"{family}s[{index}]"
    name_key = "name" if family == "attack" else "kind"
    _keys(table, where, required={name_key}, optional={"label", "restarts", "params"})
    name = _typed(table[name_key], str, f"{where}.{name_key}")
    known = ATTACK_PARAMS if family == "attack" else BOUND_PARAMS
    if name not in known:
        raise CertattrError(f"campaign spec: {where}.{name_key}: unknown {family} {name!r}; "
                            f"choose from {', '.join(known)}")
    restarts = _typed(table.get("restarts", 1), int, f"{where}.restarts")
    if restarts <= 0:
        raise CertattrError(f"campaign spec: {where}.restarts must be > 0, got {restarts}")
    if family == "bound" and restarts != 1:
        raise CertattrError(f"campaign spec: {where}.restarts: bounds are deterministic, restarts must be 1")
    params = dict(_table(table.get("params", {}), f"{where}.params"))
    for key, value in params.items():
        pkey = f"{where}.params.{key}"
        if key in RESERVED:
            raise CertattrError(f"campaign spec: {pkey}: {key!r} is set by the campaign, not by params")
        if key in known[name]:
            typ, ok, what = known[name][key]
            if typ is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                params[key] = value
            if isinstance(value, bool) or not isinstance(value, typ) or not ok(value):
                raise CertattrError(f"campaign spec: {pkey} must be {what}, got {value!r}")
        elif not _accepts_keyword(family, name, key):
            raise CertattrError(f"campaign spec: {pkey}: unknown parameter {key!r} for {family} {name!r}; "
                                f"known: {', '.join(sorted(known[name]))}")
        elif not _scalar_or_list(value):
            raise CertattrError(f"campaign spec: {pkey} must be a number, string, boolean or a list of them")
    if "step_size" in params and "step_size_rel" in params:
        raise CertattrError(f"campaign spec: {where}.params: give step_size or step_size_rel, not both")
    if family == "attack" and name == "ifia" and params.get("kind") == "targeted":
        raise CertattrError(f"campaign spec: {where}.params.kind: targeted IFIA needs a per-image mask, "
                            "which a campaign cannot give; use topk, mass_center or random")
    label = table.get("label")
    if label is None:
        label = _default_label(family, name, params)
    label = _typed(label, str, f"{where}.label")
    if not label or any(c.isspace() for c in label):
        raise CertattrError(f"campaign spec: {where}.label must be a non-empty word, got {label!r}")
    return MethodSpec(family=family, name=name, label=label, restarts=restarts, params=params)


def _scalar_or_list(value) -> bool:
    scalar = (int, float, str, bool)
    return isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar) for v in value))


def _default_label(family: str, name: str, params: dict) -> str:
    if family == "attack" and name == "ifia":
        return f"ifia-{params.get('kind', 'topk')}"
    if family == "attack" and name == "deviation":
        suffix = "-surrogate" if params.get("measure") == "surrogate" else ""
        return f"deviation-{params.get('objective', 'euclidean')}{suffix}"
    if family == "attack" and name == "smoothed":
        return f"smoothed-{params.get('objective', 'euclidean')}"
    if family == "bound" and name == "certified" and params.get("method", "crown") != "crown":
        return f"certified-{params['method']}"
    return name


def method_callable(family: str, name: str):
    """The function that runs an attack or bound (imported lazily)."""
    import importlib

    module, func = (ATTACK_FUNCS if family == "attack" else BOUND_FUNCS)[name]
    return getattr(importlib.import_module(module), func)


def _accepts_keyword(family: str, name: str, key: str) -> bool:
    try:
        fn = method_callable(family, name)
        sig = inspect.signature(fn)
    except (ImportError, AttributeError, ValueError, TypeError):
        return False
    p = sig.parameters.get(key)
    return p is not None and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)


# --------------------------------------------------------------------------- checkpoints

def parse_zoo_ref(ref: str, *, key: str = "checkpoint") -> tuple[str, str, str]:
    """``zoo:MODEL@DATASET[:RECIPE]`` -> (model, dataset, recipe); recipe defaults to "quick"."""
    from ..models import ZOO
    from .zoo import RECIPES, ZOO_DATASETS

    body = ref[len(ZOO_PREFIX):]
    if "@" not in body:
        raise CertattrError(f"campaign spec: {key}: zoo reference {ref!r} must look like zoo:MODEL@DATASET:RECIPE")
    model, rest = body.split("@", 1)
    dataset, _, recipe = rest.partition(":")
    recipe = recipe or "quick"
    if model not in ZOO:
        raise CertattrError(f"campaign spec: {key}: unknown zoo model {model!r}; choose from {', '.join(ZOO)}")
    if dataset not in ZOO_DATASETS:
        raise CertattrError(f"campaign spec: {key}: zoo dataset {dataset!r} unknown; "
                            f"choose from {', '.join(ZOO_DATASETS)}")
    if recipe not in RECIPES:
        raise CertattrError(f"campaign spec: {key}: unknown zoo recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    return model, dataset, recipe


def _check_checkpoint(spec: CampaignSpec, ref: str) -> None:
    if ref.startswith(ZOO_PREFIX):
        return
    path = Path(spec.checkpoint_path(ref))
    if not path.exists():
        raise CertattrError(f"campaign spec: checkpoints: checkpoint {ref!r} not found (looked at {path})")


# --------------------------------------------------------------------------- small validators

def _keys(table: dict, where: str, *, required: set, optional: set) -> None:
    prefix = f"{where}." if where else ""
    for key in table:
        if key not in required and key not in optional:
            allowed = ", ".join(sorted(required | optional))
            raise CertattrError(f"campaign spec: unknown key {prefix}{key!r} (allowed: {allowed})")
    for key in sorted(required):
        if key not in table:
            raise CertattrError(f"campaign spec: missing required key {prefix}{key}")


def _typed(value, typ, key: str):
    if isinstance(value, bool) and typ is not bool:
        raise CertattrError(f"campaign spec: {key} must be {typ.__name__}, got a boolean")
    if typ is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, typ):
        raise CertattrError(f"campaign spec: {key} must be {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def _table(value, key: str) -> dict:
    if not isinstance(value, dict):
        raise CertattrError(f"campaign spec: {key} must be a table, got {type(value).__name__}")
    return value


def _table_list(value, key: str) -> list[dict]:
    if not isinstance(value, list):
        raise CertattrError(f"campaign spec: {key} must be an array of tables ([[{key}]])")
    for i, t in enumerate(value):
        _table(t, f"{key}[{i}]")
    return value


def _str_list(value, key: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise CertattrError(f"campaign spec: {key} must be a non-empty list of strings")
    for v in value:
        if not isinstance(v, str) or not v:
            raise CertattrError(f"campaign spec: {key}: {v!r} is not a non-empty string")
    return list(value)


def _no_dups(values: list, key: str) -> None:
    if len(set(values)) != len(values):
        raise CertattrError(f"campaign spec: {key} has duplicate values")
