"""``certattr campaign SPEC.toml --store results.sqlite``: run or resume a campaign grid."""
from __future__ import annotations

import argparse
import json
import sys

from ._common import add_device, resolve_device


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "campaign", help="run (or resume) a campaign of attacks and bounds into a results store",
        description="Run the grid of a campaign TOML spec (checkpoints x samples x attributions x norms x eps "
                    "x attacks/bounds) and store one row per attack run / bound per sample in SQLite. "
                    "Rerunning skips what is stored, so an interrupted campaign resumes where it stopped.")
    p.add_argument("spec", help="campaign spec (TOML), e.g. benchmarks/campaigns/smoke.toml")
    p.add_argument("--store", required=True, help="results store (SQLite file; created if missing)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel workers (local processes or Ray tasks; default one per core, at most 8; "
                        "1 = in this process); torch threads per worker = cores // workers")
    p.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local process pool (default) or Ray")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster address (e.g. ray://head:10001 or auto; default $RAY_ADDRESS, else a "
                        "private local Ray on 127.0.0.1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default cores // workers; on a busy machine 1 thread per "
                        "worker avoids OpenMP oversubscription)")
    p.add_argument("--dry-run", action="store_true", help="validate the spec and print the grid, run nothing")
    p.add_argument("--max-units", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..campaign.runner import describe, run_campaign
    from ..campaign.spec import load_spec

    spec = load_spec(args.spec)
    if args.dry_run:
        print(json.dumps(describe(spec), indent=2))
        return 0
    resolve_device(args.device)
    summary = run_campaign(spec, args.store, workers=args.workers, backend=args.backend, device=args.device,
                           progress=not args.no_progress, ray_address=args.ray_address, threads=args.threads,
                           max_units=args.max_units, log=lambda m: print(m, file=sys.stderr))
    done = summary.rows_before + summary.rows_written
    print(f"campaign {spec.name!r}: wrote {summary.rows_written} rows in {summary.units_run} units "
          f"({summary.seconds:.1f} s); store {args.store} holds {done}/{summary.total_rows} rows"
          + ("" if summary.complete else " (incomplete: rerun to resume)"))
    return 0
