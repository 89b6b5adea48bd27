"""Declared claims of an experiment and their verdicts.

An experiment lists what it expects under `claims:`. Each claim selects runs by config values
(`runs: {backward: [sum, accumulate], backward.scale: size}`) and states one of:
equivalent / identical / differs (final parameters against the run `reference:` selects),
fails (status error, with `message` in the error), succeeds, and smaller / about (a summary
`metric`, e.g. peak_saved_bytes, against `factor` times the reference's; `about` within `rel`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from runner.compare import Run, as_text, compare_to, pick_reference


def summary_metric(run: Run, column: str) -> Optional[float]:
    value = run.summary.get(column)
    return float(value) if isinstance(value, (int, float)) else None


@dataclass
class ClaimResult:
    name: str
    kind: str
    holds: bool
    detail: str


def _describe(selector: Dict[str, Any]) -> str:
    return " ".join(f"{k}={as_text(v)}" for k, v in selector.items()) or "all runs"


def evaluate_claim(claim: Dict[str, Any], runs: List[Run], cache: Dict[Path, Any]) -> ClaimResult:
    """Kinds: equivalent, identical, differs (parameters against `reference`), fails (status error,
    error text containing `message`), succeeds, smaller / about (a summary `metric` against
    `factor` times the reference's: smaller than it, or within `rel` of it)."""
    kind = claim.get("kind", "")
    selector = dict(claim.get("runs") or {})
    name = claim.get("name") or f"{kind}: {_describe(selector)}"
    chosen = [r for r in runs if r.matches(selector)]
    if not chosen:
        return ClaimResult(name, kind, False, f"no run matches {_describe(selector)}")
    if kind in ("fails", "succeeds"):
        message = claim.get("message", "")
        wrong = [r for r in chosen if (r.status != "error" or message not in (r.summary.get("error") or ""))] \
            if kind == "fails" else [r for r in chosen if r.status != "ok"]
        detail = f"{len(chosen) - len(wrong)}/{len(chosen)} runs {kind[:-1]}" + (f" with '{message}'" if message else "")
        return ClaimResult(name, kind, not wrong, detail)
    ref_selector = dict(claim.get("reference") or {})
    reference = pick_reference([r for r in runs if r not in chosen] or runs, ref_selector or None)
    if reference is None or (ref_selector and not reference.matches(ref_selector)):
        return ClaimResult(name, kind, False, f"no reference run matches {_describe(ref_selector)}")
    if kind in ("equivalent", "identical", "differs"):
        verdicts = [compare_to(r, reference, cache) for r in chosen]
        wanted = {"equivalent": {"equivalent", "identical", "reference"}, "identical": {"identical", "reference"},
                  "differs": {"differs"}}[kind]
        holds = all(v["verdict"] in wanted for v in verdicts)
        worst = max((v["max_abs_diff"] for v in verdicts), default=math.nan) if kind != "differs" \
            else min((v["max_abs_diff"] for v in verdicts), default=math.nan)
        label = "max" if kind != "differs" else "min"
        return ClaimResult(name, kind, holds, f"{len(chosen)} runs vs {_describe(ref_selector) or 'reference'}: "
                           f"{label} |Δθ| {worst:.3g} ({verdicts[0]['tolerance']}); verdicts "
                           f"{sorted({v['verdict'] for v in verdicts})}")
    if kind in ("smaller", "about"):
        metric = claim.get("metric", "peak_saved_bytes")
        ref_value = summary_metric(reference, metric)
        values = [summary_metric(r, metric) for r in chosen]
        if ref_value is None or any(v is None for v in values):
            return ClaimResult(name, kind, False, f"{metric} missing")
        if kind == "smaller":
            factor = float(claim.get("factor", 1.0))
            holds = all(v < factor * ref_value for v in values)
            return ClaimResult(name, kind, holds, f"{metric} {max(values):g} vs {factor:g} x {ref_value:g}")
        rel, factor = float(claim.get("rel", 0.05)), float(claim.get("factor", 1.0))
        target = factor * ref_value
        holds = all(abs(v - target) <= rel * abs(target) for v in values)
        return ClaimResult(name, kind, holds, f"{metric} {sorted(set(values))} within {rel:g} of "
                           f"{factor:g} x {ref_value:g}")
    return ClaimResult(name, kind, False, f"unknown claim kind {kind!r}: expected equivalent, identical, "
                       "differs, fails, succeeds, smaller or about")


def claims_of(runs: List[Run]) -> List[Dict[str, Any]]:
    """The claims declared in the runs' configs (an experiment's `claims:`), without repeats."""
    seen, claims = set(), []
    for run in runs:
        for claim in (run.summary.get("config") or {}).get("claims") or []:
            key = repr(sorted(claim.items(), key=lambda kv: kv[0]))
            if key not in seen:
                seen.add(key)
                claims.append(claim)
    return claims


def evaluate_claims(claims: List[Dict[str, Any]], runs: List[Run]) -> List[ClaimResult]:
    cache: Dict[Path, Any] = {}
    return [evaluate_claim(c, runs, cache) for c in claims]


def unexpected_failures(runs: List[Run], claims: List[Dict[str, Any]]) -> List[Run]:
    """Runs that did not finish ok and that no `fails` claim expects."""
    expected = [c for c in claims if c.get("kind") == "fails"]
    return [r for r in runs if r.status != "ok"
            and not any(r.matches(dict(c.get("runs") or {})) for c in expected)]
