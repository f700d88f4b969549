"""Bounds against attacks, read from a results store.

Per (checkpoint, attribution, norm, eps, bound): the samples, the attack runs, the best attack per
sample (max Euclidean deviation and min cosine over every attack and restart whose returned point
keeps the label), the bound, the violations (best attack beyond the bound:
``attack_euclid > bound_euclid * (1 + rtol) + atol`` or ``attack_cos < bound_cos - rtol``), and the
tightness ratio ``bound_euclid / best_attack_euclid`` (quantiles p10 / median / p90 over samples).
A PGD run that flips a label the bound certified is a label violation.

A violated *certified* bound is a bug (the bound is sound by construction); a violated *practical*
bound is expected now and then (a first-order bound, not sound).  The *smoothed* certificate is about
the smoothed attribution h, which the attacks do not target: its violations are informational.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .store import Store

RTOL = 1e-6
ATOL = 1e-9

COLUMNS = ("checkpoint", "attribution", "norm", "eps", "bound", "kind", "samples", "attacks",
           "attack_euclidean", "bound_euclidean", "attack_cosine", "bound_cosine", "violations",
           "violations_euclidean", "violations_cosine", "label_violations", "label_certified",
           "tightness_p10", "tightness_median", "tightness_p90")


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

    @property
    def certified_violated(self) -> bool:
        return self.count("certified") > 0


def euclid_violated(attack: float, bound: float, rtol: float = RTOL, atol: float = ATOL) -> bool:
    return attack > bound * (1 + rtol) + atol if math.isfinite(bound) else False


def cosine_violated(attack: float, bound: float, rtol: float = RTOL) -> bool:
    return attack < bound - rtol * max(1.0, abs(bound))


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (math.nan, math.nan, math.nan)
    q = np.quantile(np.asarray(values, dtype=np.float64), [0.1, 0.5, 0.9])
    return float(q[0]), float(q[1]), float(q[2])


def _median(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.median(vals)) if vals else math.nan


def best_attacks(store: Store) -> dict[tuple, dict[str, Any]]:
    """(ckpt, attribution, norm, eps, sample) -> best label-keeping attack values and run counts."""
    best: dict[tuple, dict[str, Any]] = {}
    cur = store.conn.execute(
        "SELECT ckpt, attribution, norm, eps, sample, COUNT(*), "
        "MAX(CASE WHEN label_kept=1 THEN euclidean END), MIN(CASE WHEN label_kept=1 THEN cosine END), "
        "MIN(CASE WHEN label_kept=1 THEN topk_intersection END), MIN(CASE WHEN label_kept=1 THEN kendall END), "
        "SUM(CASE WHEN kind='pgd' AND label_kept=0 THEN 1 ELSE 0 END) "
        "FROM results WHERE family='attack' GROUP BY ckpt, attribution, norm, eps, sample")
    for ck, attr, norm, eps, sample, runs, e, c, t, k, flips in cur:
        best[(ck, attr, norm, eps, sample)] = {"runs": runs, "euclidean": e, "cosine": c,
                                               "topk_intersection": t, "kendall": k, "label_flips": flips}
    return best


def compare(store_path: str | Path, *, rtol: float = RTOL, atol: float = ATOL) -> Comparison:
    """The comparison table of a store (see the module docstring)."""
    with Store(store_path, readonly=True) as store:
        names = {sha: _ckpt_name(meta) for sha, meta in store.checkpoints().items()}
        best = best_attacks(store)
        groups: dict[tuple, list] = defaultdict(list)
        cur = store.conn.execute(
            "SELECT ckpt, attribution, norm, eps, method, kind, sample, euclidean, cosine, label_certified "
            "FROM results WHERE family='bound' ORDER BY ckpt, attribution, norm, eps, method, sample")
        for ck, attr, norm, eps, method, kind, sample, e, c, lc in cur:
            groups[(ck, attr, norm, eps, method, kind)].append((sample, e, c, lc))
    rows, violations = [], []
    for (ck, attr, norm, eps, method, kind), samples in sorted(groups.items(), key=lambda kv: _sort_key(kv[0])):
        attacks = 0
        att_e, att_c, bnd_e, bnd_c, tight = [], [], [], [], []
        v_e = v_c = v_l = 0
        certified = 0
        for sample, e, c, lc in samples:
            b = best.get((ck, attr, norm, eps, sample))
            certified += int(bool(lc))
            bnd_e.append(e if e is not None else math.inf)
            bnd_c.append(c if c is not None else -1.0)
            if b is None:
                continue
            attacks += b["runs"]
            where = {"checkpoint": names.get(ck, ck[:12]), "attribution": attr, "norm": norm, "eps": eps,
                     "bound": method, "kind": kind, "sample": sample}
            if lc and b["label_flips"]:
                v_l += 1
                violations.append(Violation(**where, what="label", bound_value=1.0, attack_value=0.0))
            if b["euclidean"] is not None:
                att_e.append(b["euclidean"])
                be = e if e is not None else math.inf
                if euclid_violated(b["euclidean"], be, rtol, atol):
                    v_e += 1
                    violations.append(Violation(**where, what="euclidean", bound_value=be,
                                                attack_value=b["euclidean"]))
                if b["euclidean"] > 0 and math.isfinite(be):
                    tight.append(be / b["euclidean"])
            if b["cosine"] is not None and c is not None:
                att_c.append(b["cosine"])
                if cosine_violated(b["cosine"], c, rtol):
                    v_c += 1
                    violations.append(Violation(**where, what="cosine", bound_value=c, attack_value=b["cosine"]))
        p10, med, p90 = _quantiles(tight)
        n_viol = len({v.sample for v in violations
                      if (v.checkpoint, v.attribution, v.norm, v.eps, v.bound) ==
                      (names.get(ck, ck[:12]), attr, norm, eps, method)})
        rows.append({
            "checkpoint": names.get(ck, ck[:12]), "attribution": attr, "norm": norm, "eps": eps,
            "bound": method, "kind": kind, "samples": len(samples), "attacks": attacks,
            "attack_euclidean": _median(att_e), "bound_euclidean": _median(bnd_e),
            "attack_cosine": _median(att_c), "bound_cosine": _median(bnd_c),
            "violations": n_viol, "violations_euclidean": v_e, "violations_cosine": v_c,
            "label_violations": v_l, "label_certified": certified / max(len(samples), 1),
            "tightness_p10": p10, "tightness_median": med, "tightness_p90": p90,
        })
    return Comparison(rows=rows, violations=violations)


def _sort_key(key: tuple) -> tuple:
    ck, attr, norm, eps, method, kind = key
    return (ck, attr, norm, eps, {"certified": 0, "practical": 1, "smoothed": 2}.get(kind, 3), method)


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
    cols = ("checkpoint", "attribution", "norm", "eps", "bound", "samples", "attacks", "attack_euclidean",
            "bound_euclidean", "attack_cosine", "bound_cosine", "violations", "tightness_median")
    heads = ("checkpoint", "attr", "norm", "eps", "bound", "n", "attacks", "atk_l2", "bnd_l2", "atk_cos",
             "bnd_cos", "viol", "tight")
    table = [list(heads)] + [[format_value(r[c]) for c in cols] for r in comp.rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(heads))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)
