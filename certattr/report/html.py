"""``index.html``: the compare table and every figure of a report, in one static page."""
from __future__ import annotations

import html
import os
import time
from collections import defaultdict
from pathlib import Path

from ..campaign.compare import COLUMNS, Comparison, format_value
from .curves import Figure

_SECTIONS = (
    ("certified_fraction", "Certified fraction vs eps",
     "Fraction of samples whose lower bound on cos(g(x), g(x')) over the whole ball is at least c."),
    ("robust_accuracy", "Certified attribution-robust accuracy vs eps",
     ("Correct prediction AND label certified on the ball AND cosine bound >= c (dashed: label only). "
      "The smoothed certificate does not assess the label and is not shown.")),
    ("bound_vs_attack", "Bound vs best attack",
     ("One point per sample: the best label-keeping attack (x) against the bound (y). Points below the "
      "diagonal are violations: a bug for a certified bound, expected now and then for the practical one.")),
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
            cls = ' class="bad"' if r["kind"] == "certified" else ' class="warn"'
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
    n_cert = comp.violated_pairs("certified")
    n_prac = comp.violated_pairs("practical")
    parts.append("<h2>Bounds vs attacks</h2>")
    if n_cert:
        parts.append(f"<p><b>A certified bound was violated on {n_cert} (sample, setting) pairs: a soundness "
                     "bug.</b></p>")
    else:
        parts.append("<p>No attack beat a certified bound.</p>")
    if n_prac:
        parts.append(f"<p>Attacks exceeded the practical (first-order, not sound) bound on {n_prac} (sample, "
                     "setting) pairs.</p>")
    parts.append("<p class='meta'>Medians over samples; tightness = bound / best attack (Euclidean). "
                 "Red rows: certified bound violated; yellow: practical or smoothed bound exceeded."
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
