"""Campaigns: a validated TOML grid (spec), a resumable SQLite results store, runners (local process
pool, Ray) and the bound-versus-attack comparison.

    from certattr.campaign import load_spec, run_campaign, compare
    spec = load_spec("benchmarks/campaigns/smoke.toml")
    run_campaign(spec, "results.sqlite", workers=2)
    table = compare("results.sqlite")
"""
from __future__ import annotations

from .compare import Comparison, compare
from .runner import RunSummary, run_campaign
from .spec import CampaignSpec, MethodSpec, load_spec, parse_spec
from .store import Store

__all__ = [
           "CampaignSpec",
           "Comparison",
           "MethodSpec",
           "RunSummary",
           "Store",
           "compare",
           "load_spec",
           "parse_spec",
           "run_campaign",
]
