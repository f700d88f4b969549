"""``index.html``: the compare table and every figure of a report, in one static page."""
from __future__ import annotations

import html
import os
import time
from collections import defaultdict
from pathlib import Path

from ..campaign.compare import COLUMNS, SOUND_KINDS, Comparison, format_value, meaning
from .curves import Figure

_SECTIONS = (
    ("certified_fraction", "Certified fraction vs eps (sound certificates only)",
     ("Fraction of samples whose lower bound on cos(g(x), g(x')) over the whole ball is at least c, from the "
      "sound certificates: certified (and complete) bounds, and the smoothed certificate, which holds with "
      "probability 1 - alpha per sample and is about the smoothed attribution h. The practical bound is not "
      "sound and is not drawn here (see the estimated curves).")),
    ("robust_accuracy", "Certified attribution-robust accuracy vs eps (sound certificates only)",
     ("Correct prediction AND label certified on the ball AND cosine bound >= c (dashed: label only). "
      "The smoothed certificate does not assess the label and is not shown.")),
    ("estimated_fraction", "Estimated fraction vs eps (practical bound: an estimate, not a certificate)",
     ("The same curves from the first-order practical bound (Wang & Kong 2023), drawn dashed. It is not sound: "
      "the legend gives its measured violation rate against attacks on the network it describes.")),
    ("estimated_accuracy", "Estimated attribution-robust accuracy vs eps (practical bound)",
     "Correct prediction, linearised label test and cosine estimate >= c: an estimate, not a certificate."),
    ("bound_vs_attack", "Bound vs best attack on the function it bounds",
     ("One point per sample: the best label-keeping attack (x) against the bound (y), each bound against the "
      "attacks measured on the function it bounds (certified: the real network; practical: the network whose "
      "Taylor model it is; smoothed: the smoothed attribution h, Monte Carlo point estimates). Points below the "
      "diagonal are violations: a bug for a certified bound, a measured rate for the practical one. For a "
      "practical bound on a ReLU net, an extra panel shows the real network's deviations: how far the "
      "surrogate's first-order model is from the ReLU net's saliency (never counted as a violation).")),
    ("attack_strength", "Attack strength vs eps",
     "Mean over samples of the worst value over restarts reached by each attack (lower = stronger)."),
)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f0f0f0; }
td.txt { text-align: left; }
tr.bad td { background: #fdd; }
tr.warn td { background: #fff3cd; }
figure { margin: 1em 0 2em 0; }
img { max-width: 100%; border: 1px solid #eee; }
.meta { color: #666; font-size: 13px; }
"""


def _rel(path: Path, base: Path) -> str:
    return html.escape(os.path.relpath(path, base).replace(os.sep, "/"), quote=True)


def _table(comp: Comparison) -> str:
    if not comp.rows:
        return "<p>No bounds in this store: nothing to compare.</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = []
    for r in comp.rows:
        cls = ""
        if r["violations"] or r["label_violations"]:
            cls = ' class="bad"' if r["kind"] in SOUND_KINDS else ' class="warn"'
        cells = "".join(
            f'<td class="txt">{html.escape(str(r[c]))}</td>' if isinstance(r[c], str)
            else f"<td>{html.escape(format_value(r[c]))}</td>" for c in COLUMNS)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def write_index(out: str | Path, figures: list[Figure], comp: Comparison, *, title: str = "certattr report",
                store: str | None = None, notes: list[str] | None = None, tsv: Path | None = None) -> Path:
    """Write ``out/index.html`` with the compare table and the figures (PNG shown, SVG and CSV linked)."""
    out = Path(out)
    parts = [(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
              f"<style>{_CSS}</style></head><body>"), f"<h1>{html.escape(title)}</h1>"]
    meta = [f"generated {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    if store:
        meta.append(f"store {html.escape(str(store))}")
    parts.append(f"<p class='meta'>{' &middot; '.join(meta)}</p>")
    for note in notes or []:
        parts.append(f"<p>{html.escape(note)}</p>")
    parts.append("<h2>Bounds vs attacks</h2>")
    parts.append("<p>Each bound is checked against attacks on the function it bounds: certified &harr; the real "
                 "network; practical &harr; the network whose first-order model it is (the softplus surrogate "
                 "with the same beta for a ReLU net, the model itself for a smooth net); smoothed &harr; an attack "
                 "on the smoothed attribution h, evaluated with an independent larger Monte Carlo sample and "
                 "counted only beyond the Monte Carlo error. Deviations measured on other functions are shown "
                 "(other_exceed_rate) and never counted as violations.</p>")
    items = []
    for kind in sorted({r["kind"] for r in comp.rows}):
        n, tested = comp.violated_pairs(kind), comp.tested_pairs(kind)
        rate = f"violation rate {n / tested:.3g} ({n} of {tested} tested samples)" if tested else "not tested"
        first = next((r for r in comp.rows if r["kind"] == kind and r["tested"]), None)
        what = meaning(kind, "the network it describes", first.get("alpha")) if first else "no paired attack"
        strong = kind in SOUND_KINDS and n
        items.append(f"<li>{'<b>' if strong else ''}{html.escape(kind)}: {html.escape(rate)}; "
                     f"{html.escape(what)}{' &mdash; a soundness bug' if strong else ''}{'</b>' if strong else ''}</li>")
    parts.append(f"<ul>{''.join(items)}</ul>")
    parts.append("<p class='meta'>Medians over samples; tightness = bound / best paired attack (Euclidean); "
                 "violation_rate = violated samples / samples with a paired attack. "
                 "Red rows: a sound bound violated (a bug); yellow: a practical or smoothed bound exceeded."
                 + (f" Full table: <a href='{_rel(tsv, out)}'>{html.escape(tsv.name)}</a>." if tsv else "")
                 + "</p>")
    parts.append(_table(comp))
    by_kind: dict[str, list[Figure]] = defaultdict(list)
    for f in figures:
        by_kind[f.kind].append(f)
    for kind, heading, text in _SECTIONS:
        if not by_kind.get(kind):
            continue
        parts.append(f"<h2>{html.escape(heading)}</h2><p>{html.escape(text)}</p>")
        for f in by_kind[kind]:
            parts.append(
                f"<figure><img src='{_rel(f.png, out)}' alt='{html.escape(f.title, quote=True)}'>"
                f"<figcaption>{html.escape(f.title)} &mdash; <a href='{_rel(f.svg, out)}'>SVG</a> &middot; "
                f"<a href='{_rel(f.csv, out)}'>CSV</a></figcaption></figure>")
    if not figures:
        parts.append("<p>No figures: the store has no bound or attack rows.</p>")
    parts.append("</body></html>")
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
