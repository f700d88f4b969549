"""Reports from a results store: certification curves (PNG + SVG + CSV) and an index.html with the
compare table.  Reads the store only.

    from certattr.report import make_report
    index = make_report("results.sqlite", "report/")
"""
from __future__ import annotations

from pathlib import Path

from .curves import DEFAULT_THRESHOLDS, Figure, write_figures
from .html import write_index


def make_report(store_path: str | Path, out: str | Path, *, thresholds=DEFAULT_THRESHOLDS,
                title: str = "certattr report", notes: list[str] | None = None) -> Path:
    """Write every figure and ``out/index.html`` (with the compare table, also as ``compare.tsv``)."""
    from ..campaign.compare import compare, to_tsv

    out = Path(out)
    figures = write_figures(store_path, out, thresholds)
    comp = compare(store_path)
    tsv = out / "compare.tsv"
    tsv.write_text(to_tsv(comp), encoding="utf-8")
    return write_index(out, figures, comp, title=title, store=str(store_path), notes=notes, tsv=tsv)


__all__ = ["DEFAULT_THRESHOLDS", "Figure", "make_report", "write_figures", "write_index"]
