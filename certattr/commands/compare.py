"""``certattr compare results.sqlite``: bounds against the best attacks, violations and tightness.

Each bound is compared with the attacks measured on the function it bounds (SPEC 9.3; see
:mod:`certattr.campaign.compare`).  Exit status 3 when a sound bound (certified, complete) was ever
beaten (a soundness bug); the practical bound's violation rate (first-order, not sound) and the
smoothed certificate's rate (to compare with its alpha) are printed.
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
    """Print one line per bound kind about its violations against the attacks on the function it bounds;
    return the exit code (3 when a sound bound, certified or complete, was violated)."""
    stream = stream or sys.stderr
    from ..campaign.compare import SOUND_KINDS, format_value

    code = 0
    kinds = sorted({r["kind"] for r in comp.rows} | {v.kind for v in comp.violations})
    for kind in kinds:
        n = comp.violated_pairs(kind)
        tested = comp.tested_pairs(kind)
        rate = f"rate {n / tested:.3g}" if tested else "no paired attack"
        if kind in SOUND_KINDS:
            if n:
                print(f"ERROR: {kind} bound violated on {n} of {tested} tested (sample, setting) pairs: the "
                      "bound is sound by construction, so this is a bug", file=stream)
                code = EXIT_CERTIFIED_VIOLATION
                for v in [v for v in comp.violations if v.kind == kind][:limit]:
                    print(f"  {v.checkpoint} {v.attribution} l{v.norm} eps={v.eps:g} {v.bound} sample {v.sample}: "
                          f"{v.what} attack {format_value(v.attack_value)} vs bound {format_value(v.bound_value)}",
                          file=stream)
            else:
                print(f"{kind} bound: 0 violations on {tested} tested (sample, setting) pairs", file=stream)
        elif kind == "practical":
            print(f"warning: practical bound exceeded on {n} of {tested} tested (sample, setting) pairs ({rate}) "
                  "by attacks on the network it describes (first-order, not sound)", file=stream)
        elif kind == "smoothed":
            alphas = sorted({f"{r['alpha']:g}" for r in comp.rows
                             if r["kind"] == "smoothed" and r.get("alpha") is not None})
            print(f"smoothed certificate: violated beyond the Monte Carlo error on {n} of {tested} tested pairs "
                  f"({rate}; expected <= alpha = {', '.join(alphas) or '?'})", file=stream)
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
