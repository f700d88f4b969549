"""Work units: the campaign grid cut into batches, and the function that computes one unit.

A unit = one batch of samples for one (checkpoint, attribution, norm, eps, method, restart): one
attack call (``restarts=1``, its own seed) or one bound call.  :func:`execute_unit` is pure compute
(model + tensors in, row dicts out): the local pool and Ray run exactly this function, and the driver
alone writes the rows to the store.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .spec import CampaignSpec, MethodSpec, method_callable
from .store import METRIC_COLUMNS, Store


@dataclass(frozen=True)
class Unit:
    """One batch of work; ``samples`` are dataset indices, ``rows`` their positions in the loaded slice."""

    ckpt: str  # sha256 of the checkpoint weights
    ckpt_path: str
    family: str  # attack | bound
    name: str  # ifia | deviation | pgd | practical | certified | smoothed
    method: str  # label stored in the results
    params_json: str
    attribution: str
    norm: str  # "2" | "inf"
    eps: float
    restart: int
    samples: tuple[int, ...]
    seed: int
    domain: tuple[float, float] = (0.0, 1.0)

    @property
    def group(self) -> tuple:
        return (self.ckpt, self.attribution, self.norm, self.eps, self.method, self.restart)

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)

    def describe(self) -> str:
        return (f"{self.method}[r{self.restart}] {self.attribution} l{self.norm} eps={self.eps:g} "
                f"samples {self.samples[0]}..{self.samples[-1]}")


def unit_seed(base_seed: int, *key: Any) -> int:
    """A 31-bit seed derived from the campaign seed and the unit's identity (stable across runs/backends)."""
    text = json.dumps([int(base_seed)] + [str(k) for k in key])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def expand(spec: CampaignSpec, checkpoints: dict[str, str], store: Store | None = None,
           domain: tuple[float, float] = (0.0, 1.0)) -> tuple[list[Unit], int]:
    """All units of the grid that still have missing rows in ``store`` (``checkpoints``: sha256 -> path).

    Returns (units to run, number of rows already stored).  A unit whose samples are partly stored (a
    spec whose batch_size changed) is shrunk to the missing samples.
    """
    indices = list(range(spec.start, spec.start + spec.n))
    units: list[Unit] = []
    already = 0
    for sha, path in checkpoints.items():
        for attribution in spec.attributions:
            for norm in spec.norms:
                for eps in spec.eps[norm]:
                    for m in spec.methods:
                        for restart in range(m.restarts):
                            done = store.done_samples(sha, attribution, norm, eps, m.label, restart) if store else set()
                            already += len(done & set(indices))
                            for b in range(0, len(indices), spec.batch_size):
                                batch = tuple(i for i in indices[b:b + spec.batch_size] if i not in done)
                                if not batch:
                                    continue
                                # no batch position in the seed: the attacks draw their noise per
                                # (seed, restart, sample), so rows do not depend on batch_size
                                seed = unit_seed(spec.seed, sha, attribution, norm, eps, m.label, restart)
                                units.append(Unit(ckpt=sha, ckpt_path=path, family=m.family, name=m.name,
                                                  method=m.label, params_json=m.params_json(),
                                                  attribution=attribution, norm=norm, eps=float(eps),
                                                  restart=restart, samples=batch, seed=seed, domain=domain))
    return units, already


def total_rows(spec: CampaignSpec) -> int:
    """Rows a complete campaign holds."""
    per_sample = sum(m.restarts for m in spec.methods)
    eps_count = sum(len(spec.eps[nm]) for nm in spec.norms)
    return len(spec.checkpoints) * spec.n * len(spec.attributions) * eps_count * per_sample


def method_of(unit: Unit) -> MethodSpec:
    return MethodSpec(unit.family, unit.name, unit.method, 1, unit.params)


# --------------------------------------------------------------------------- compute

def _norm_arg(norm: str):
    return 2 if norm == "2" else "inf"


def _call(fn, kwargs: dict[str, Any], optional: dict[str, Any]):
    """Call ``fn(**kwargs)`` adding the ``optional`` keywords that its signature takes."""
    try:
        params = inspect.signature(fn).parameters
        takes_var = any(p.kind == p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        params, takes_var = {}, False
    for k, v in optional.items():
        if takes_var or k in params:
            kwargs[k] = v
    return fn(**kwargs)


def _takes(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _per_sample(value, batch: int) -> list | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().reshape(-1).cpu().tolist()
    elif not isinstance(value, (list, tuple)):
        return None
    return list(value) if len(value) == batch else None


def restart_options(fn, name: str, restart: int, params: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments that make restart ``restart`` of an attack an independent run.

    Each restart is its own call with ``restarts=1`` and its own seed.  IFIA starts restart 0 at x (as
    Ghorbani et al.) and later restarts at a random point of the ball (``random_start=True`` where the
    attack takes it); the deviation attack cycles its surrogate beta over restarts as it does inside
    one call (``betas[r % len(betas)]``).
    """
    try:
        sig = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    out: dict[str, Any] = {}
    if name == "ifia" and restart > 0 and "random_start" in sig and "random_start" not in params:
        out["random_start"] = True
    if name == "deviation" and "betas" in sig and "betas" not in params:
        default = sig["betas"].default
        if isinstance(default, (list, tuple)) and default:
            out["betas"] = (float(default[restart % len(default)]),)
    return out


def execute_unit(unit: Unit, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """Run one unit on (x, y) (the unit's samples, in order) and return one row dict per sample.

    The attribution target is the clean prediction (SPEC 1); ``correct`` says whether it equals y.
    Tracing chatter of auto_LiRPA / torch.jit is silenced (it repeats for every unit).
    """
    with warnings.catch_warnings():
        if unit.family == "bound" and unit.name == "certified":
            _import_lirpa()  # it calls warnings.simplefilter("once") on import: let that happen first
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", module=r"auto_LiRPA.*")
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
        return _execute(unit, model, x, y, device)


def _import_lirpa() -> None:
    try:
        from bounds.lirpa_compat import import_auto_lirpa

        with warnings.catch_warnings(record=True):  # record: its own filter changes cannot print
            import_auto_lirpa()
    except (ImportError, AttributeError):
        pass


def _execute(unit: Unit, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             device: str | torch.device) -> list[dict[str, Any]]:
    device = torch.device(device)
    model = model.to(device).eval()
    x = x.to(device=device, dtype=torch.float32)
    y = y.to(device)
    batch = x.shape[0]
    with torch.no_grad():
        pred = model(x).argmax(dim=1)
    correct = (pred == y).cpu().tolist()
    fn = method_callable(unit.family, unit.name)
    params = unit.params
    if "step_size_rel" in params:  # a step relative to the radius: the same schedule at every eps
        rel = float(params.pop("step_size_rel"))
        params["step_size"] = rel * unit.eps if unit.eps > 0 else rel
    norm = _norm_arg(unit.norm)
    t0 = time.perf_counter()
    if unit.family == "attack":
        if unit.name == "pgd":
            x_adv = _call(fn, dict(model=model, x=x, y=pred, eps=unit.eps, norm=norm, seed=unit.seed, **params),
                          {"domain": unit.domain})
            x_adv = getattr(x_adv, "x_adv", x_adv)
            with torch.no_grad():
                kept = model(x_adv).argmax(dim=1) == pred
            res = SimpleNamespace(label_kept=kept, time=time.perf_counter() - t0)
        else:
            kwargs = dict(model=model, x=x, eps=unit.eps, norm=norm, attribution=unit.attribution, restarts=1,
                          seed=unit.seed, **params)
            kwargs.update(restart_options(fn, unit.name, unit.restart, params))
            res = _call(fn, kwargs, {"domain": unit.domain, "target": pred})
    else:
        kwargs = dict(model=model, x=x, eps=unit.eps, norm=norm, attribution=unit.attribution, **params)
        optional = {"domain": unit.domain, "target": pred, "seed": unit.seed}
        if unit.name == "smoothed" and not _takes(fn, "norm"):
            # an l2 certificate: B_inf(x, eps) lies inside B_2(x, eps * sqrt(n))
            del kwargs["norm"]
            if unit.norm == "inf":
                kwargs["eps"] = unit.eps * math.sqrt(x[0].numel())
        res = _call(fn, kwargs, optional)
    wall = time.perf_counter() - t0
    elapsed = float(getattr(res, "time", None) or wall)
    return result_rows(unit, res, correct, elapsed / max(batch, 1))


def result_rows(unit: Unit, res: Any, correct: list, per_sample_time: float) -> list[dict[str, Any]]:
    """Turn an attack result or a BoundResult into store rows for the unit's samples."""
    batch = len(unit.samples)
    metrics = {c: _per_sample(getattr(res, c, None), batch) for c in METRIC_COLUMNS}
    label_kept = _per_sample(getattr(res, "label_kept", None), batch) if unit.family == "attack" else None
    label_cert = _per_sample(getattr(res, "label_certified", None), batch) if unit.family == "bound" else None
    extras: dict[str, list | None] = {}
    if unit.family == "bound":
        extras["abstain"] = _per_sample(getattr(res, "abstain", None), batch)
        if getattr(res, "kind", "") == "complete":  # branch and bound: the reached deviation and the gap
            for key in ("lower", "upper", "gap", "subdomains", "stop_reason"):
                extras[key] = _per_sample(getattr(res, key, None), batch)
    else:
        for key, vals in (getattr(res, "extras", None) or {}).items():
            extras[key] = _per_sample(vals, batch)
    unit_info = {}  # the same for every row: stored once per (ckpt, method, restart)
    for attr in ("network", "method"):
        v = getattr(res, attr, None)
        if isinstance(v, str) and v:
            unit_info[attr] = v
    unit_info.update(pairing_info(unit, res))
    rows = []
    for i, sample in enumerate(unit.samples):
        extra = {}
        for k, vals in extras.items():
            if vals is not None:
                extra[k] = bool(vals[i]) if isinstance(vals[i], bool) else (
                    _finite(vals[i]) if isinstance(vals[i], float) else vals[i])
        rows.append({
            "ckpt": unit.ckpt, "attribution": unit.attribution, "norm": unit.norm, "eps": unit.eps,
            "method": unit.method, "restart": unit.restart, "sample": sample, "family": unit.family,
            "kind": unit.name,
            **{c: (None if metrics[c] is None else _finite(metrics[c][i])) for c in METRIC_COLUMNS},
            "label_kept": None if label_kept is None else bool(label_kept[i]),
            "label_certified": None if label_cert is None else bool(label_cert[i]),
            "correct": bool(correct[i]), "time": per_sample_time, "extra": extra, "unit_info": unit_info,
        })
    return rows


def pairing_info(unit: Unit, res: Any) -> dict[str, Any]:
    """What compare pairs by (SPEC 9.3): an attack's ``measured_on`` (the function its deviations were
    measured on); a bound's ``pairs_with`` (the function it bounds) and, for the smoothed certificate,
    its ``alpha``."""
    if unit.family == "attack":
        return {"measured_on": str(getattr(res, "measured_on", "real") or "real")}
    if unit.name == "smoothed":
        from ..attacks.smoothed import smoothed_key

        p = unit.params
        return {"pairs_with": smoothed_key(float(getattr(res, "radius", p.get("radius", 1.0))),
                                           bool(p.get("normalize", True)), float(p.get("clip_norm", 1.0))),
                "alpha": float(getattr(res, "alpha", p.get("alpha", 0.001)))}
    if unit.name == "practical":
        net = str(getattr(res, "network", "real"))
        return {"pairs_with": net if net.startswith("softplus-surrogate") else "real"}
    return {"pairs_with": "real"}


def _finite(v) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v  # NaN -> NULL
