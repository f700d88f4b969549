"""``certattr compare results.sqlite``: bounds against the best attacks, violations and tightness.

Exit status 3 when a CERTIFIED bound was ever beaten by an attack (a soundness bug); practical-bound
violations (expected: the first-order bound is not sound) only print a warning.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_CERTIFIED_VIOLATION = 3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="compare bounds with the best attacks in a results store",
        description="Per (checkpoint, attribution, norm, eps, bound): samples, attack runs, best attack "
                    "(max Euclidean / min cosine over label-keeping attacks), bound, violations and the "
                    "tightness ratio bound / best attack (p10, median, p90). Exits 3 if a certified "
                    "bound was violated.")
    p.add_argument("store", help="results store (SQLite) written by `certattr campaign`")
    p.add_argument("--out", default=None, help="also write the full table as TSV to this file")
    p.add_argument("--max-violations", type=int, default=10, help="violations to list (default 10)")
    p.set_defaults(func=run)


def report_violations(comp, limit: int, stream=None) -> int:
    """Print warnings / errors about violations; return the exit code (3 on a certified violation)."""
    stream = stream or sys.stderr
    from ..campaign.compare import format_value

    code = 0
    for kind in ("certified", "practical", "smoothed"):
        viol = [v for v in comp.violations if v.kind == kind]
        if not viol:
            continue
        samples = comp.violated_pairs(kind)
        if kind == "certified":
            print(f"ERROR: certified bound violated on {samples} (sample, setting) pairs: the bound is "
                  "sound by construction, so this is a bug", file=stream)
            code = EXIT_CERTIFIED_VIOLATION
        elif kind == "practical":
            print(f"warning: practical bound exceeded by attacks on {samples} (sample, setting) pairs "
                  "(expected now and then: the first-order bound is not sound)", file=stream)
        else:
            print(f"note: attacks on the raw attribution beat the smoothed certificate on {samples} pairs "
                  "(informational: the certificate is about the smoothed attribution)", file=stream)
        for v in viol[:limit] if kind == "certified" else []:
            print(f"  {v.checkpoint} {v.attribution} l{v.norm} eps={v.eps:g} {v.bound} sample {v.sample}: "
                  f"{v.what} attack {format_value(v.attack_value)} vs bound {format_value(v.bound_value)}",
                  file=stream)
    return code


def run(args: argparse.Namespace) -> int:
    from ..campaign.compare import compare, to_text, to_tsv
    from ..errors import CertattrError

    if not Path(args.store).is_file():
        raise CertattrError(f"results store {args.store!r} not found")
    comp = compare(args.store)
    if not comp.rows:
        print("no bound rows in the store: nothing to compare", file=sys.stderr)
    else:
        print(to_text(comp))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(to_tsv(comp), encoding="utf-8")
        print(f"table written to {args.out}", file=sys.stderr)
    return report_violations(comp, args.max_violations)
