"""``certattr report results.sqlite --out DIR``: certification curves and an index.html."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="draw certification curves and an HTML report from a results store",
        description="Figures (PNG + SVG, with the plotted numbers as CSV beside each): certified fraction "
                    "vs eps, certified attribution-robust accuracy vs eps, bound vs best attack per sample, "
                    "attack strength vs eps; and DIR/index.html with the compare table.")
    p.add_argument("store", help="results store (SQLite) written by `certattr campaign`")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--cos", type=float, nargs="+", default=None, metavar="C",
                   help="cosine thresholds c of the curves (default 0.5 0.8 0.9 0.95)")
    p.add_argument("--title", default="certattr report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import CertattrError
    from ..report import DEFAULT_THRESHOLDS, make_report

    if not Path(args.store).is_file():
        raise CertattrError(f"results store {args.store!r} not found")
    thresholds = tuple(args.cos) if args.cos else DEFAULT_THRESHOLDS
    for c in thresholds:
        if not -1.0 <= c <= 1.0:
            raise CertattrError(f"--cos thresholds must lie in [-1, 1], got {c}")
    index = make_report(args.store, args.out, thresholds=thresholds, title=args.title)
    print(f"report: {index}")
    return 0
