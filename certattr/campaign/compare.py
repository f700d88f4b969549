"""Bounds against attacks, read from a results store, each bound against the function it bounds.

Pairing (SPEC 9.3).  Every attack row records which function its deviations were measured on
(``measured_on`` in the unit_info table: "real", "softplus-surrogate(beta=B)" or "smoothed(...)";
"real" when absent), and every bound row which function it bounds (``pairs_with``):

| bound kind            | paired attacks measured on                    | a violation means                  |
|-----------------------|-----------------------------------------------|------------------------------------|
| certified, complete   | the real network                              | a bug (sound bound): exit 3        |
| practical             | the network whose Taylor model it is (the     | its measured violation rate (not   |
|                       | softplus surrogate with the same beta for a   | sound: first-order)                |
|                       | ReLU net, the model itself for a smooth net)  |                                    |
| smoothed              | the smoothed attribution h (same r and rule)  | a rate to compare with its alpha   |

Deviations measured on other functions are never counted as violations; for a practical bound about
a surrogate, ``other_exceed_rate`` reports how often the best attack on the REAL network's saliency
moves further than the bound (how far the surrogate's first-order model is from the ReLU saliency).

Per (checkpoint, attribution, norm, eps, bound): the samples, the paired attack runs, the best paired
attack per sample (max Euclidean deviation and min cosine over every paired run whose returned point
keeps the label), the bound, the violations (``attack_euclid > bound_euclid * (1 + rtol) + atol`` or
``attack_cos < bound_cos - rtol``), the violation rate (violated samples / samples with a paired
attack) and the tightness ratio ``bound_euclid / best_attack_euclid`` (quantiles p10 / median / p90).
For the smoothed certificate the attack's Monte Carlo confidence bounds are compared instead of its
point estimates (``euclidean_lcb``, ``cosine_ucb``; see :mod:`certattr.attacks.smoothed`): an excess
within the Monte Carlo error is not a violation.  A PGD run that flips a label the bound certified is
a label violation (PGD runs on the real network).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .store import Store

RTOL = 1e-6
ATOL = 1e-9
SOUND_KINDS = ("certified", "complete")
REAL = "real"

COLUMNS = ("checkpoint", "attribution", "norm", "eps", "bound", "kind", "paired_with", "samples", "attacks",
           "attack_euclidean", "bound_euclidean", "attack_cosine", "bound_cosine", "violations", "tested",
           "violation_rate", "violations_euclidean", "violations_cosine", "label_violations", "label_certified",
           "other_exceed_rate", "tightness_p10", "tightness_median", "tightness_p90", "meaning")


@dataclass
class Violation:
    checkpoint: str
    attribution: str
    norm: str
    eps: float
    bound: str
    kind: str
    sample: int
    what: str  # euclidean | cosine | label
    bound_value: float
    attack_value: float


@dataclass
class Comparison:
    rows: list[dict[str, Any]]
    violations: list[Violation] = field(default_factory=list)

    def count(self, kind: str) -> int:
        """Violation records of one bound kind (a sample can violate on Euclidean, cosine and label)."""
        return sum(1 for v in self.violations if v.kind == kind)

    def violated_pairs(self, kind: str) -> int:
        """Distinct (checkpoint, attribution, norm, eps, bound, sample) with any violation of ``kind``."""
        return len({(v.checkpoint, v.attribution, v.norm, v.eps, v.bound, v.sample)
                    for v in self.violations if v.kind == kind})

    def tested_pairs(self, kind: str) -> int:
        """(sample, setting) pairs of ``kind`` that had at least one paired attack."""
        return sum(r["tested"] for r in self.rows if r["kind"] == kind)

    def rate(self, kind: str) -> float:
        """Pooled violation rate of one kind: violated pairs / tested pairs (nan if none was tested)."""
        tested = self.tested_pairs(kind)
        return self.violated_pairs(kind) / tested if tested else math.nan

    @property
    def certified_violated(self) -> bool:
        return any(self.count(k) > 0 for k in SOUND_KINDS)


def euclid_violated(attack: float, bound: float, rtol: float = RTOL, atol: float = ATOL) -> bool:
    return attack > bound * (1 + rtol) + atol if math.isfinite(bound) else False


def cosine_violated(attack: float, bound: float, rtol: float = RTOL) -> bool:
    return attack < bound - rtol * max(1.0, abs(bound))


def meaning(kind: str, paired_with: str, alpha: float | None = None) -> str:
    """What a violation of this kind of bound means (the compare table's last column)."""
    if kind in SOUND_KINDS:
        return "sound bound: any violation is a bug (exit 3)"
    if kind == "practical":
        return f"first-order, not sound: measured violation rate on {paired_with}"
    if kind == "smoothed":
        a = f"{alpha:g}" if alpha is not None else "its alpha"
        return (f"holds with prob. 1-alpha per sample: rate should be <= alpha={a} "
                "(+2 alpha_eval of the attack's Monte Carlo check)")
    return "unknown bound kind"


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (math.nan, math.nan, math.nan)
    q = np.quantile(np.asarray(values, dtype=np.float64), [0.1, 0.5, 0.9])
    return float(q[0]), float(q[1]), float(q[2])


def _median(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.median(vals)) if vals else math.nan


def measured_on(store: Store) -> dict[tuple[str, str, int], str]:
    """(ckpt, method, restart) -> the function an attack unit's deviations were measured on."""
    return {k: str(v.get("measured_on", REAL)) for k, v in store.unit_info().items()}


def bound_pairing(kind: str, info: dict[str, Any]) -> str:
    """The function a bound is about (see the module table); stores written before pairing existed
    fall back to the bound's ``network`` (practical) or "real"."""
    if kind in SOUND_KINDS:
        return REAL
    if "pairs_with" in info:
        return str(info["pairs_with"])
    if kind == "practical":
        net = str(info.get("network", REAL))
        return net if net.startswith("softplus-surrogate") else REAL
    return REAL


def best_attacks(store: Store) -> dict[tuple, dict[str, Any]]:
    """(ckpt, attribution, norm, eps, sample, measured_on) -> best label-keeping attack values and run
    counts (``label_flips``: PGD runs that flipped the label, on the real network whatever is measured)."""
    where = measured_on(store)
    best: dict[tuple, dict[str, Any]] = {}
    cur = store.conn.execute(
        "SELECT ckpt, attribution, norm, eps, sample, method, restart, kind, label_kept, euclidean, cosine, "
        "topk_intersection, kendall, extra FROM results WHERE family='attack'")
    for ck, attr, norm, eps, sample, method, restart, kind, kept, e, c, t, k, extra in cur:
        net = where.get((ck, method, restart), REAL)
        b = best.setdefault((ck, attr, norm, eps, sample, net), {
            "runs": 0, "euclidean": None, "cosine": None, "topk_intersection": None, "kendall": None,
            "label_flips": 0, "euclidean_lcb": None, "cosine_ucb": None})
        b["runs"] += 1
        if kind == "pgd" and kept == 0:
            b["label_flips"] += 1
        if kept != 1:
            continue
        ex = json.loads(extra) if extra else {}
        for col, val, better in (("euclidean", e, max), ("cosine", c, min), ("topk_intersection", t, min),
                                 ("kendall", k, min), ("euclidean_lcb", ex.get("euclidean_lcb"), max),
                                 ("cosine_ucb", ex.get("cosine_ucb"), min)):
            if val is not None and not (isinstance(val, float) and math.isnan(val)):
                b[col] = val if b[col] is None else better(b[col], val)
    return best


def compare(store_path: str | Path, *, rtol: float = RTOL, atol: float = ATOL) -> Comparison:
    """The comparison table of a store (see the module docstring)."""
    with Store(store_path, readonly=True) as store:
        names = {sha: _ckpt_name(meta) for sha, meta in store.checkpoints().items()}
        best = best_attacks(store)
        infos = store.unit_info()
        groups: dict[tuple, list] = defaultdict(list)
        cur = store.conn.execute(
            "SELECT ckpt, attribution, norm, eps, method, kind, sample, euclidean, cosine, label_certified "
            "FROM results WHERE family='bound' ORDER BY ckpt, attribution, norm, eps, method, sample")
        for ck, attr, norm, eps, method, kind, sample, e, c, lc in cur:
            groups[(ck, attr, norm, eps, method, kind)].append((sample, e, c, lc))
    flips: dict[tuple, int] = defaultdict(int)
    by_sample: dict[tuple, list[tuple[str, dict]]] = defaultdict(list)
    for key, v in best.items():
        flips[key[:5]] += v["label_flips"]
        by_sample[key[:5]].append((key[5], v))
    rows, violations = [], []
    for (ck, attr, norm, eps, method, kind), samples in sorted(groups.items(), key=lambda kv: _sort_key(kv[0])):
        info = infos.get((ck, method, 0), {})
        pair = bound_pairing(kind, info)
        alpha = info.get("alpha")
        conservative = kind == "smoothed"
        attacks = tested = 0
        att_e, att_c, bnd_e, bnd_c, tight = [], [], [], [], []
        v_e = v_c = v_l = 0
        certified = other_tested = other_exceeded = 0
        violated: set[int] = set()
        for sample, e, c, lc in samples:
            certified += int(bool(lc))
            be = e if e is not None else math.inf
            bnd_e.append(be)
            bnd_c.append(c if c is not None else -1.0)
            where = {"checkpoint": names.get(ck, ck[:12]), "attribution": attr, "norm": norm, "eps": eps,
                     "bound": method, "kind": kind, "sample": sample}
            if lc and flips.get((ck, attr, norm, eps, sample), 0):
                v_l += 1
                violated.add(sample)
                violations.append(Violation(**where, what="label", bound_value=1.0, attack_value=0.0))
            # a practical bound about a surrogate: how often the REAL net's saliency moves further
            # (the first-order model of the surrogate vs the ReLU saliency; never a violation)
            for net, b in by_sample.get((ck, attr, norm, eps, sample), ()) if kind == "practical" else ():
                if net == REAL != pair and b["euclidean"] is not None and math.isfinite(be):
                    other_tested += 1
                    other_exceeded += int(euclid_violated(b["euclidean"], be, rtol, atol))
            b = best.get((ck, attr, norm, eps, sample, pair))
            if b is None:
                continue
            attacks += b["runs"]
            a_e = b["euclidean_lcb"] if conservative and b["euclidean_lcb"] is not None else b["euclidean"]
            a_c = b["cosine_ucb"] if conservative and b["cosine_ucb"] is not None else b["cosine"]
            if a_e is not None or a_c is not None:
                tested += 1
            if b["euclidean"] is not None:
                att_e.append(b["euclidean"])
                if b["euclidean"] > 0 and math.isfinite(be):
                    tight.append(be / b["euclidean"])
            if a_e is not None and euclid_violated(a_e, be, rtol, atol):
                v_e += 1
                violated.add(sample)
                violations.append(Violation(**where, what="euclidean", bound_value=be, attack_value=a_e))
            if b["cosine"] is not None:
                att_c.append(b["cosine"])
            if a_c is not None and c is not None and cosine_violated(a_c, c, rtol):
                v_c += 1
                violated.add(sample)
                violations.append(Violation(**where, what="cosine", bound_value=c, attack_value=a_c))
        p10, med, p90 = _quantiles(tight)
        rows.append({
            "checkpoint": names.get(ck, ck[:12]), "attribution": attr, "norm": norm, "eps": eps,
            "bound": method, "kind": kind, "paired_with": pair, "samples": len(samples), "attacks": attacks,
            "attack_euclidean": _median(att_e), "bound_euclidean": _median(bnd_e),
            "attack_cosine": _median(att_c), "bound_cosine": _median(bnd_c),
            "violations": len(violated), "tested": tested,
            "violation_rate": len(violated) / tested if tested else math.nan,
            "violations_euclidean": v_e, "violations_cosine": v_c,
            "label_violations": v_l, "label_certified": certified / max(len(samples), 1),
            "other_exceed_rate": other_exceeded / other_tested if other_tested else math.nan,
            "tightness_p10": p10, "tightness_median": med, "tightness_p90": p90,
            "meaning": meaning(kind, pair, alpha) if tested else f"not tested: no attack measured on {pair}",
            "alpha": alpha,
        })
    return Comparison(rows=rows, violations=violations)


def _sort_key(key: tuple) -> tuple:
    ck, attr, norm, eps, method, kind = key
    return (ck, attr, norm, eps, {"certified": 0, "complete": 0, "practical": 1, "smoothed": 2}.get(kind, 3), method)


def _ckpt_name(meta: dict) -> str:
    ref = meta.get("ref") or meta.get("path") or "?"
    return ref if ref.startswith("zoo:") else Path(ref).name or ref


def format_value(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf"
        return f"{v:.4g}"
    return str(v)


def to_tsv(comp: Comparison) -> str:
    """The table as tab-separated text (header + one line per row); medians over samples."""
    lines = ["\t".join(COLUMNS)]
    for r in comp.rows:
        lines.append("\t".join(_tsv_value(c, r[c]) for c in COLUMNS))
    return "\n".join(lines) + "\n"


def _tsv_value(col: str, v: Any) -> str:
    if isinstance(v, float):
        if col == "eps":
            return repr(v)
        return "nan" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.6g}")
    return str(v)


def to_text(comp: Comparison) -> str:
    """An aligned plain-text table of the main columns (for the terminal)."""
    cols = ("checkpoint", "attribution", "norm", "eps", "bound", "paired_with", "samples", "attacks",
            "attack_euclidean", "bound_euclidean", "attack_cosine", "bound_cosine", "violations", "tested",
            "violation_rate", "other_exceed_rate", "tightness_median")
    heads = ("checkpoint", "attr", "norm", "eps", "bound", "vs attacks on", "n", "attacks", "atk_l2", "bnd_l2",
             "atk_cos", "bnd_cos", "viol", "tested", "rate", "other>bnd", "tight")
    table = [list(heads)] + [[format_value(r[c]) for c in cols] for r in comp.rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(heads))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    kinds = {r["kind"]: meaning(r["kind"], "the network it describes", r.get("alpha"))
             for r in comp.rows if r["tested"]}
    if kinds:
        lines.append("")
        lines.append("rate = violated samples / samples with an attack on the paired function (vs attacks on); "
                     "other>bnd = practical bound vs the REAL ReLU net's saliency (never a violation)")
        for kind, what in kinds.items():
            lines.append(f"  {kind}: {what}")
    return "\n".join(lines)
