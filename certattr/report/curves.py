"""Certification curves from a results store: the numbers (tables) and their figures (PNG + SVG + CSV).

Figures, one per (checkpoint, attribution, norm) setting (SPEC 6, 9.3):

* certified fraction vs eps: fraction of samples whose bound on cos(g(x), g(x')) is >= c, from SOUND
  certificates only (certified, complete, and the smoothed one at its confidence 1 - alpha);
* certified attribution-robust accuracy vs eps: correct AND label certified AND cosine bound >= c
  (certified and complete bounds: the smoothed certificate does not assess the label);
* estimated fraction / estimated robust accuracy vs eps: the same from the practical (first-order,
  NOT sound) bound, drawn dashed, with its measured violation rate (against attacks on the network
  it describes, :mod:`certattr.campaign.compare`) in the legend: an estimate, never a certificate;
* bound vs best attack per sample (Euclidean), against the attacks on the function each bound is
  about, with the diagonal (points below it are violations); for a practical bound on a ReLU net a
  separate, labelled panel shows the real network's deviations (how far the surrogate's first-order
  model is from the ReLU net's saliency: never a violation);
* attack strength vs eps per attack: mean over samples of the worst (over restarts) top-k intersection,
  Kendall tau and cosine of the label-keeping attack results.

Every figure is written as ``NAME.png`` and ``NAME.svg`` with ``NAME.csv`` holding exactly the
plotted numbers.
"""
from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..campaign.compare import SOUND_KINDS, best_attacks, bound_pairing, compare
from ..campaign.store import Store

DEFAULT_THRESHOLDS = (0.5, 0.8, 0.9, 0.95)
CERTIFYING_KINDS = SOUND_KINDS + ("smoothed",)  # sound (smoothed: with probability 1 - alpha)
ESTIMATE_KINDS = ("practical",)
STRENGTH_METRICS = (("topk_intersection", "top-k intersection"), ("kendall", "Kendall tau"),
                    ("cosine", "cosine similarity"))


@dataclass
class Figure:
    """One written figure: its title, kind and the paths of its files."""

    kind: str
    title: str
    setting: tuple
    png: Path
    svg: Path
    csv: Path


# --------------------------------------------------------------------------- tables

def _bound_rows(store: Store) -> list[tuple]:
    return [tuple(r) for r in store.conn.execute(
        "SELECT ckpt, attribution, norm, eps, method, kind, sample, euclidean, cosine, label_certified, correct "
        "FROM results WHERE family='bound' ORDER BY ckpt, attribution, norm, eps, method, sample")]


def checkpoint_names(store: Store) -> dict[str, str]:
    names = {}
    for sha, meta in store.checkpoints().items():
        ref = meta.get("ref") or meta.get("path") or sha[:12]
        names[sha] = ref if ref.startswith("zoo:") else (Path(ref).name or ref)
    return names


def certified_fraction(store: Store, thresholds=DEFAULT_THRESHOLDS, kinds=CERTIFYING_KINDS) -> list[dict[str, Any]]:
    """Rows (checkpoint, attribution, norm, bound, kind, c, eps, n, fraction): share of samples whose
    cosine lower bound is >= c, for the bounds of ``kinds`` (default: the certifying ones)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for ck, attr, norm, eps, method, kind, _s, _e, cos, _lc, _corr in _bound_rows(store):
        if kind not in kinds:
            continue
        groups[(ck, attr, norm, method, kind, eps)].append(-1.0 if cos is None else float(cos))
    names = checkpoint_names(store)
    out = []
    for (ck, attr, norm, method, kind, eps), cos in sorted(groups.items()):
        arr = np.asarray(cos)
        for c in thresholds:
            out.append({"checkpoint": names.get(ck, ck[:12]), "attribution": attr, "norm": norm, "bound": method,
                        "kind": kind, "c": float(c), "eps": eps, "n": len(arr),
                        "fraction": float(np.mean(arr >= c))})
    return out


def robust_accuracy(store: Store, thresholds=DEFAULT_THRESHOLDS, kinds=SOUND_KINDS) -> list[dict[str, Any]]:
    """Rows (..., c, eps, n, accuracy): share of samples that are correct AND label-certified AND have a
    cosine bound >= c; c = -1 is the certified (label-only) accuracy; bounds of ``kinds`` (default the
    sound ones).  The smoothed certificate does not assess the label, so it never has rows here."""
    groups: dict[tuple, list[tuple]] = defaultdict(list)
    for ck, attr, norm, eps, method, kind, _s, _e, cos, lc, corr in _bound_rows(store):
        if kind == "smoothed" or kind not in kinds:
            continue
        groups[(ck, attr, norm, method, kind, eps)].append((-1.0 if cos is None else float(cos), bool(lc), bool(corr)))
    names = checkpoint_names(store)
    out = []
    for (ck, attr, norm, method, kind, eps), vals in sorted(groups.items()):
        cos = np.asarray([v[0] for v in vals])
        ok = np.asarray([v[1] and v[2] for v in vals])
        for c in (-1.0,) + tuple(thresholds):
            out.append({"checkpoint": names.get(ck, ck[:12]), "attribution": attr, "norm": norm, "bound": method,
                        "kind": kind, "c": float(c), "eps": eps, "n": len(vals),
                        "accuracy": float(np.mean(ok & (cos >= c)))})
    return out


def bound_vs_attack(store: Store) -> list[dict[str, Any]]:
    """Per sample and bound: the bound and the best label-keeping attack (Euclidean and cosine) on each
    function attacked; ``paired`` marks the attacks on the function the bound is about (SPEC 9.3)."""
    best = best_attacks(store)
    names = checkpoint_names(store)
    infos = store.unit_info()
    by_sample: dict[tuple, list[tuple[str, dict]]] = defaultdict(list)
    for key, v in best.items():
        by_sample[key[:5]].append((key[5], v))
    out = []
    for ck, attr, norm, eps, method, kind, sample, e, cos, _lc, _corr in _bound_rows(store):
        pair = bound_pairing(kind, infos.get((ck, method, 0), {}))
        for net, b in by_sample.get((ck, attr, norm, eps, sample), ()):
            if b["euclidean"] is None:
                continue
            out.append({"checkpoint": names.get(ck, ck[:12]), "attribution": attr, "norm": norm, "bound": method,
                        "kind": kind, "eps": eps, "sample": sample, "measured_on": net, "paired": net == pair,
                        "attack_euclidean": b["euclidean"], "bound_euclidean": math.inf if e is None else e,
                        "attack_cosine": b["cosine"], "bound_cosine": -1.0 if cos is None else cos})
    return out


def violation_rates(store_path) -> dict[tuple, float]:
    """(checkpoint, attribution, norm, bound) -> pooled violation rate over eps (from compare)."""
    comp = compare(store_path)
    acc: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for r in comp.rows:
        key = (r["checkpoint"], r["attribution"], r["norm"], r["bound"])
        acc[key][0] += int(r["violations"])
        acc[key][1] += int(r["tested"])
    return {k: (v / t if t else math.nan) for k, (v, t) in acc.items()}


def attack_strength(store: Store) -> list[dict[str, Any]]:
    """Rows (checkpoint, attribution, norm, attack, eps, n, topk_intersection, kendall, cosine): means
    over samples of the per-sample worst value over restarts (label-keeping runs only; attacks on the
    attribution g: the smoothed attack, measured on h, is in the bound-vs-attack figure)."""
    cur = store.conn.execute(
        "SELECT ckpt, attribution, norm, method, eps, sample, MIN(topk_intersection), MIN(kendall), MIN(cosine) "
        "FROM results WHERE family='attack' AND label_kept=1 AND kind NOT IN ('pgd', 'smoothed') "
        "GROUP BY ckpt, attribution, norm, method, eps, sample")
    groups: dict[tuple, list[tuple]] = defaultdict(list)
    for ck, attr, norm, method, eps, _s, t, k, c in cur:
        groups[(ck, attr, norm, method, eps)].append((t, k, c))
    names = checkpoint_names(store)
    out = []
    for (ck, attr, norm, method, eps), vals in sorted(groups.items()):
        row = {"checkpoint": names.get(ck, ck[:12]), "attribution": attr, "norm": norm, "attack": method,
               "eps": eps, "n": len(vals)}
        for i, (col, _label) in enumerate(STRENGTH_METRICS):
            xs = [v[i] for v in vals if v[i] is not None]
            row[col] = float(np.mean(xs)) if xs else math.nan
        out.append(row)
    return out


# --------------------------------------------------------------------------- figures

def _slug(*parts) -> str:
    text = "__".join(str(p) for p in parts)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def _norm_symbol(norm: str) -> str:
    return "ℓ∞" if norm == "inf" else f"ℓ{norm}"


def _setting_title(setting: tuple) -> str:
    ck, attr, norm = setting
    return f"{ck}: {attr}, {_norm_symbol(norm)} ball"


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for r in rows:
            w.writerow([repr(r[c]) if isinstance(r[c], float) else r[c] for c in columns])


def _save(fig, out: Path, name: str, rows, columns, kind: str, title: str, setting: tuple) -> Figure:
    png, svg, csv_path = out / f"{name}.png", out / f"{name}.svg", out / f"{name}.csv"
    fig.savefig(png, dpi=110, bbox_inches="tight")
    fig.savefig(svg, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    _write_csv(csv_path, rows, columns)
    return Figure(kind=kind, title=title, setting=setting, png=png, svg=svg, csv=csv_path)


def _by_setting(rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list] = defaultdict(list)
    for r in rows:
        out[(r["checkpoint"], r["attribution"], r["norm"])].append(r)
    return dict(sorted(out.items()))


def _panels(n: int, width: float = 4.2, height: float = 3.4):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False, constrained_layout=True)
    return fig, list(axes[0])


def _eps_axis(ax, eps_values, norm: str) -> None:
    """x axis of eps: logarithmic when the radii are positive and span a decade or more."""
    from matplotlib.ticker import FixedLocator, NullLocator

    values = sorted(set(eps_values))
    ax.set_xlabel(f"ε ({_norm_symbol(norm)} radius)")
    if values and values[0] > 0 and values[-1] / values[0] >= 10:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_locator(FixedLocator(values))
    ax.set_xticklabels([f"{v:g}" for v in values])
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(alpha=0.3)


def _threshold_curves(rows, out: Path, value: str, kind: str, ylabel: str, prefix: str, what: str,
                      rates: dict[tuple, float] | None = None) -> list[Figure]:
    """One figure per setting, one panel per bound.  ``rates`` given: these are ESTIMATES (practical
    bound): dashed lines, the measured violation rate in the legend and in the CSV."""
    estimated = rates is not None
    figs = []
    for setting, srows in _by_setting(rows).items():
        bounds = sorted({r["bound"] for r in srows}, key=lambda b: (_kind_rank(srows, b), b))
        fig, axes = _panels(len(bounds), width=3.8)
        for ax, bound in zip(axes, bounds):
            brows = [r for r in srows if r["bound"] == bound]
            rate = rates.get(setting + (bound,), math.nan) if estimated else None
            if estimated:
                for r in brows:
                    r["violation_rate"] = rate
            note = ("; violated on " + ("untested" if rate is None or math.isnan(rate) else f"{100 * rate:.0f}%")
                    + " of attacked samples") if estimated else ""
            for i, c in enumerate(sorted({r["c"] for r in brows})):
                pts = sorted((r["eps"], r[value]) for r in brows if r["c"] == c)
                noun = "cosine estimate" if estimated else "cosine bound"
                label = ("label " + ("estimated" if estimated else "certified") + " (any cosine)" if c < -0.5
                         else f"{noun} ≥ {c:g}")
                style = "--" if (c < -0.5 or estimated) else "-"
                if estimated and c < -0.5:
                    style = ":"
                # shrinking markers of different shapes keep coinciding curves visible
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="osD^v*"[i % 6],
                        markersize=max(3.0, 8.0 - 1.2 * i), label=label + (note if i == 0 else ""),
                        color="black" if c < -0.5 else f"C{i}", alpha=0.85 if estimated else 1.0)
            head = f"{bound} bound" + (" — ESTIMATE, not sound" if estimated else "")
            if not estimated and brows[0]["kind"] == "smoothed":
                head += " (on the smoothed h; each with prob. ≥ 1 − α)"
            ax.set_title(head + (f"\nmeasured violation rate {note.split('on ')[1]}" if estimated else ""),
                         fontsize=9)
            ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel(ylabel)
            _eps_axis(ax, [r["eps"] for r in brows], setting[2])
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3 if estimated else 5),
                   fontsize=8)
        title = f"{_setting_title(setting)}\n{what}"
        fig.suptitle(title, fontsize=11)
        cols = ["checkpoint", "attribution", "norm", "bound", "kind", "c", "eps", "n", value]
        if estimated:
            cols.append("violation_rate")
        figs.append(_save(fig, out, _slug(prefix, *setting), srows, cols, kind, title, setting))
    return figs


def _kind_rank(rows, bound) -> int:
    kind = next(r["kind"] for r in rows if r["bound"] == bound)
    return {"certified": 0, "complete": 0, "practical": 1, "smoothed": 2}.get(kind, 3)


def plot_certified_fraction(store: Store, out: Path, thresholds=DEFAULT_THRESHOLDS) -> list[Figure]:
    return _threshold_curves(certified_fraction(store, thresholds), out, "fraction", "certified_fraction",
                             "certified fraction of samples", "certified_fraction",
                             "sound certificates only: fraction of samples whose cosine lower bound is ≥ c, vs ε "
                             "(smoothed: with probability 1 − α)")


def plot_robust_accuracy(store: Store, out: Path, thresholds=DEFAULT_THRESHOLDS) -> list[Figure]:
    return _threshold_curves(robust_accuracy(store, thresholds), out, "accuracy", "robust_accuracy",
                             "certified robust accuracy", "robust_accuracy",
                             "sound certificates only: correct, label certified and cosine bound ≥ c, vs ε")


def plot_estimated(store: Store, store_path, out: Path, thresholds=DEFAULT_THRESHOLDS) -> list[Figure]:
    """The practical bound's curves: estimated fraction and estimated robust accuracy (dashed)."""
    rates = violation_rates(store_path)
    return (_threshold_curves(certified_fraction(store, thresholds, kinds=ESTIMATE_KINDS), out, "fraction",
                              "estimated_fraction", "estimated fraction of samples", "estimated_fraction",
                              "ESTIMATE from the first-order (not sound) bound: fraction with cosine estimate ≥ c",
                              rates=rates)
            + _threshold_curves(robust_accuracy(store, thresholds, kinds=ESTIMATE_KINDS), out, "accuracy",
                                "estimated_accuracy", "estimated robust accuracy", "estimated_accuracy",
                                "ESTIMATE from the first-order (not sound) bound: correct, linearised label test, "
                                "cosine estimate ≥ c", rates=rates))


def plot_bound_vs_attack(store: Store, out: Path) -> list[Figure]:
    import matplotlib.pyplot as plt

    rows = bound_vs_attack(store)
    figs = []
    for setting, all_rows in _by_setting(rows).items():
        srows = [r for r in all_rows if r["paired"]]
        bounds = sorted({r["bound"] for r in srows}, key=lambda b: (_kind_rank(srows, b), b))
        # a practical bound about a surrogate: one more panel with the real network's deviations
        extra = sorted({r["bound"] for r in all_rows if r["kind"] == "practical" and not r["paired"]
                        and r["measured_on"] == "real"})
        panels = [(b, True) for b in bounds] + [(b, False) for b in extra]
        if not panels:
            continue
        fig, axes = _panels(len(panels), width=4.2, height=4.0)
        eps_values = sorted({r["eps"] for r in all_rows})
        colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(eps_values), 1)))
        for ax, (bound, paired) in zip(axes, panels):
            brows = [r for r in all_rows if r["bound"] == bound and (
                r["paired"] if paired else (not r["paired"] and r["measured_on"] == "real"))]
            xs = np.asarray([r["attack_euclidean"] for r in brows], dtype=float)
            ys = np.asarray([r["bound_euclidean"] for r in brows], dtype=float)
            finite = np.isfinite(ys)
            pos = np.concatenate([xs[finite], ys[finite]])
            pos = pos[pos > 0]
            lo, hi = (float(pos.min()), float(pos.max())) if pos.size else (0.0, 1.0)
            use_log = bool(pos.size) and hi / lo > 20
            if use_log:
                ax.set_xscale("log")
                ax.set_yscale("log")
                lo, hi = lo / 1.5, hi * 1.5
            else:
                lo, hi = 0.0, max(hi, 1e-12) * 1.05
            # zeros (an attack that did not move the attribution) cannot sit on a log axis: draw them on
            # the left / bottom edge with a triangle
            at_edge = finite & ((xs <= 0) | (ys <= 0)) if use_log else np.zeros_like(finite)
            xs_plot = np.where(at_edge & (xs <= 0), lo, xs)
            ys_plot = np.where(at_edge & (ys <= 0), lo, ys)
            for color, eps in zip(colors, eps_values):
                in_eps = np.asarray([r["eps"] == eps for r in brows])
                sel = in_eps & finite & ~at_edge
                ax.scatter(xs_plot[sel], ys_plot[sel], s=14, color=color, alpha=0.8, label=f"ε = {eps:g}")
                edge = in_eps & at_edge
                if edge.any():
                    ax.scatter(xs_plot[edge], ys_plot[edge], s=22, marker="<", color=color, alpha=0.8, clip_on=False)
            ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="bound = attack")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            notes = []
            if int(at_edge.sum()):
                notes.append(f"{int(at_edge.sum())} zero attacks at the left edge (◀)")
            if int((~finite).sum()):
                notes.append(f"{int((~finite).sum())} infinite bounds not shown")
            kind = next(r["kind"] for r in brows)
            net = brows[0]["measured_on"]
            if paired:
                head = f"{bound} bound vs attacks on {net}"
            else:
                head = (f"{bound} bound vs the REAL ReLU net (not a violation):\nhow far the surrogate's "
                        "first-order model is from the ReLU saliency")
            ax.set_title(head + ("\n" + "; ".join(notes) if notes else ""), fontsize=8)
            ax.set_xlabel("best attack ‖h(x') − h(x)‖₂" if kind == "smoothed" else "best attack ‖g(x') − g(x)‖₂")
            ax.set_ylabel("bound on ‖g(x') − g(x)‖₂")
            ax.grid(alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize=8)
        title = (f"{_setting_title(setting)}\nbound vs best attack on the function it bounds, per sample "
                 "(below the diagonal = violation)")
        fig.suptitle(title, fontsize=11)
        cols = ["checkpoint", "attribution", "norm", "bound", "kind", "eps", "sample", "measured_on", "paired",
                "attack_euclidean", "bound_euclidean", "attack_cosine", "bound_cosine"]
        shown = [r for r in all_rows if r["paired"] or (r["bound"] in extra and r["measured_on"] == "real")]
        figs.append(_save(fig, out, _slug("bound_vs_attack", *setting), shown, cols, "bound_vs_attack",
                          title, setting))
    return figs


def plot_attack_strength(store: Store, out: Path) -> list[Figure]:
    rows = attack_strength(store)
    figs = []
    for setting, srows in _by_setting(rows).items():
        fig, axes = _panels(len(STRENGTH_METRICS), width=4.0)
        attacks = sorted({r["attack"] for r in srows})
        for ax, (col, label) in zip(axes, STRENGTH_METRICS):
            for attack in attacks:
                pts = sorted((r["eps"], r[col]) for r in srows if r["attack"] == attack)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=attack)
            ax.set_ylabel(f"mean {label}")
            ax.set_title(f"{label} (lower = stronger attack)", fontsize=10)
            _eps_axis(ax, [r["eps"] for r in srows], setting[2])
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=8)
        title = f"{_setting_title(setting)}\nattack strength vs ε (worst over restarts, mean over samples)"
        fig.suptitle(title, fontsize=11)
        cols = ["checkpoint", "attribution", "norm", "attack", "eps", "n"] + [c for c, _ in STRENGTH_METRICS]
        figs.append(_save(fig, out, _slug("attack_strength", *setting), srows, cols, "attack_strength",
                          title, setting))
    return figs


def write_figures(store_path: str | Path, out: str | Path, thresholds=DEFAULT_THRESHOLDS) -> list[Figure]:
    """Every figure of the report (PNG, SVG, CSV) into ``out``; returns what was written."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with Store(store_path, readonly=True) as store:
        return (plot_certified_fraction(store, out, thresholds) + plot_robust_accuracy(store, out, thresholds)
                + plot_estimated(store, store_path, out, thresholds)
                + plot_bound_vs_attack(store, out) + plot_attack_strength(store, out))
