"""Declared claims of an experiment, their verdicts, and a sweep's exit code.

An experiment lists what it expects under `claims:`. Each claim selects runs by config values
(`runs: {backward: [sum, accumulate], backward.scale: size}`) and states one of:
equivalent / identical / differs (final parameters against the run `reference:` selects, or with
`weights: ema` their moving averages, trainer.ema),
within_drift (the distance to the reference at most `factor` times the reference's own distance
to its float64 oracle), grad_scaled (the first gradient is `factor` times the reference's, within
`rel`: a bug that scales the gradient, 1/world of it say), impact (a configuration's mean paired
difference of `metric` from the reference's over seeds, in the reference's seed σ: `at_least`,
`at_most` in size, or `below` for a metric a bug lowers; runner.analysis.replicates), fails (status
error, with `message` in the error), succeeds, summary (a summary `key` equals `value` in every run:
ranks_agree true, say), and smaller / about (a `metric` against `factor` times the reference's; `about` within `rel`). A
metric is a summary key (peak_saved_bytes, time_per_step_s) or a comparison column
(grad_rel_diff, grad_diff_to_oracle, ...: against the sweep's reference and its oracle; with
`against: {loss.normalize: tokens}`, each run against its twin that differs only in those keys,
so that a claim compares what one change does under two conditions: SGD against AdamW, say).

`sweep_verdicts` is the one place that turns runs (and extra claims) into verdicts and an exit
code: the sweep's end, `python -m runner.compare` and the report all call it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List

from runner.analysis.replicates import (
    configuration,
    groups,
    impact,
    same_seed_reference,
)
from runner.analysis.runs import (
    WEIGHTS,
    Run,
    compare_to,
    describe,
    find_oracle,
    grad_rel_diff,
    pick_reference,
    twin,
)
from runner.recording.record import SUMMARY_KEYS

# Comparison columns a `smaller` / `about` claim may name as its metric (runner.analysis.runs.Verdict).
COMPARISON_METRICS = ("max_abs_diff", "grad_rel_diff", "grad_diff_to_oracle", "diff_to_oracle", "ema_max_abs_diff")
# within_drift's distances: final parameters (max |Δθ|) or the first gradient (relative).
DRIFT_MEASURES = {"params": "max_abs_diff", "first_grad": "grad_rel_diff"}


@dataclass
class ClaimResult:
    name: str
    kind: str
    holds: bool
    detail: str


def evaluate_claim(claim: Dict[str, Any], runs: List[Run], cache: Dict[Any, Any],
                   sweep_reference: Any = None) -> ClaimResult:
    """Kinds: equivalent, identical, differs (parameters against `reference`), within_drift,
    grad_scaled, impact (runs paired by seed), fails (status error, error text containing
    `message`), succeeds, summary (`key` is `value`), smaller / about (a `metric` against `factor`
    times the reference's: smaller than it, or within `rel` of it).
    `sweep_reference`: the run the comparison columns are measured against."""
    kind = claim.get("kind", "")
    selector = dict(claim.get("runs") or {})
    name = claim.get("name") or f"{kind}: {describe(selector)}"
    chosen = [r for r in runs if r.matches(selector)]
    if not chosen:
        return ClaimResult(name, kind, False, f"no run matches {describe(selector)}")
    if kind in ("fails", "succeeds"):
        message = claim.get("message", "")
        wrong = [r for r in chosen if (r.status != "error" or message not in (r.summary.error or ""))] \
            if kind == "fails" else [r for r in chosen if r.status != "ok"]
        detail = f"{len(chosen) - len(wrong)}/{len(chosen)} runs {kind[:-1]}" + (f" with '{message}'" if message else "")
        return ClaimResult(name, kind, not wrong, detail)
    if kind == "summary":
        key, value = claim.get("key", ""), claim.get("value")
        if key not in SUMMARY_KEYS:
            return ClaimResult(name, kind, False, f"key {key!r} is not a summary key")
        found = [getattr(r.summary, key) for r in chosen]
        holds = all(f == value for f in found)
        return ClaimResult(name, kind, holds, f"{key} = {sorted(set(map(str, found)))} in {len(chosen)} runs, "
                           f"expected {value}")
    ref_selector = dict(claim.get("reference") or {})
    # The reference is another run where one matches; else it may be among the chosen (it then
    # counts as holding an equivalent or identical claim and never a differs claim).
    def fits(run) -> bool:
        return run is not None and (not ref_selector or run.matches(ref_selector))

    reference = next(filter(fits, (pick_reference(pool, ref_selector or None)
                                   for pool in ([r for r in runs if r not in chosen], runs))), None)
    if reference is None:
        return ClaimResult(name, kind, False, f"no reference run matches {describe(ref_selector)}")
    def paired(run):  # seeds are replicates: each run against the reference's run at its seed
        return same_seed_reference(run, reference, runs)

    if kind in ("equivalent", "identical", "differs"):
        weights = claim.get("weights", "params")  # ema: the moving averages of the weights (trainer.ema)
        if weights not in WEIGHTS:
            return ClaimResult(name, kind, False, f"weights {weights!r} is unknown: expected one of {sorted(WEIGHTS)}")
        verdicts = [compare_to(r, paired(r), cache, weights=weights) for r in chosen]
        wanted = {"equivalent": {"equivalent", "identical", "reference"}, "identical": {"identical", "reference"},
                  "differs": {"differs"}}[kind]
        holds = all(v.verdict.split(" (")[0] in wanted for v in verdicts)
        worst = max((v.max_abs_diff for v in verdicts), default=math.nan) if kind != "differs" \
            else min((v.max_abs_diff for v in verdicts), default=math.nan)
        label = ("max" if kind != "differs" else "min") + (" EMA" if weights == "ema" else "")
        return ClaimResult(name, kind, holds, f"{len(chosen)} runs vs {describe(ref_selector) or 'reference'}: "
                           f"{label} |Δθ| {worst:.3g} ({verdicts[0].tolerance}); verdicts "
                           f"{sorted({v.verdict for v in verdicts})}")
    if kind == "within_drift":
        return _within_drift(name, claim, chosen, reference, runs, cache)
    if kind == "grad_scaled":
        factor, rel = float(claim.get("factor", 1.0)), float(claim.get("rel", 1e-5))
        errors = [grad_rel_diff(r, paired(r), cache, factor) for r in chosen]
        holds = all(e <= rel for e in errors)  # NaN (no first gradient to compare) never holds
        return ClaimResult(name, kind, holds, f"{len(chosen)} runs: first gradient vs {factor:g} x the reference's, "
                           f"relative difference up to {max(errors):.3g} (at most {rel:g})")
    if kind == "impact":
        return _impact(name, claim, chosen, reference, runs)
    if kind in ("smaller", "about"):
        metric, against = claim.get("metric", ""), claim.get("against")
        if against and metric in COMPARISON_METRICS:
            def value_of(run):  # what one change does: each run against its twin (runs.twin)
                other = twin(run, dict(against), runs)
                value = getattr(compare_to(run, other, cache), metric) if other is not None else math.nan
                return None if math.isnan(value) else value
        elif metric in COMPARISON_METRICS:
            sweep_reference = sweep_reference or pick_reference(runs)
            oracle = find_oracle(runs, sweep_reference)

            def value_of(run):
                value = getattr(compare_to(run, same_seed_reference(run, sweep_reference, runs), cache, oracle),
                                metric)
                return None if math.isnan(value) else value
        else:
            def value_of(run):
                return run.summary.metric(metric)
        ref_value = value_of(reference)
        values = [value_of(r) for r in chosen]
        if ref_value is None or any(v is None for v in values):
            return ClaimResult(name, kind, False, f"metric {metric!r} is not known for these runs: expected a "
                               f"numeric summary key or one of {list(COMPARISON_METRICS)} (the oracle ones need "
                               "a float64 run of the reference's configuration)")
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
                       "differs, within_drift, grad_scaled, impact, fails, succeeds, summary, smaller or about")


def _impact(name: str, claim: Dict[str, Any], chosen: List[Run], reference: Run, runs: List[Run]) -> ClaimResult:
    """Each chosen configuration's impact on `metric` (final_loss by default) against the
    reference configuration, paired by seed, in the reference's seed-to-seed σ: at least
    `at_least` σ (a bug that costs), at most `at_most` σ in size (one that does not), or at most `below` σ (a
    metric the bug lowers: a held-out accuracy, or a loss that reads lower than the objective's)."""
    metric = claim.get("metric", "final_loss")
    at_least, at_most, below = claim.get("at_least"), claim.get("at_most"), claim.get("below")
    if at_least is None and at_most is None and below is None:
        return ClaimResult(name, "impact", False, "an impact claim needs at_least, at_most or below (in σ)")
    reference_runs = groups(runs).get(configuration(reference), [])
    found = [impact(members, reference_runs, metric) for members in groups(chosen).values()]
    holds = all(f.verdict not in ("unknown", "reference") and
                (at_least is None or f.value >= float(at_least)) and (at_most is None or abs(f.value) <= float(at_most))
                and (below is None or f.value <= float(below)) for f in found)
    bound = " and ".join(b for b in (f"at least {at_least}σ" if at_least is not None else "",
                                      f"at most {at_most}σ in size" if at_most is not None else "",
                                      f"at most {below}σ" if below is not None else "") if b)
    return ClaimResult(name, "impact", holds, f"{metric}: {', '.join(f.describe() for f in found)}; expected {bound}")


def _within_drift(name: str, claim: Dict[str, Any], chosen: List[Run], reference: Run, runs: List[Run],
                  cache: Dict[Any, Any]) -> ClaimResult:
    """Every chosen run's distance to the reference is at most `factor` x the reference's own
    distance to its float64 oracle: float32 rounding measured, not guessed (`measure`: params or
    first_grad)."""
    measure = claim.get("measure", "params")
    if measure not in DRIFT_MEASURES:
        return ClaimResult(name, "within_drift", False, f"measure {measure!r} is unknown: expected one of "
                           f"{sorted(DRIFT_MEASURES)}")
    oracle = find_oracle(runs, reference)
    if oracle is None:
        return ClaimResult(name, "within_drift", False, "no float64 run of the reference's configuration "
                           "(trainer.dtype=float64) to measure the reference's drift against")
    column, factor = DRIFT_MEASURES[measure], float(claim.get("factor", 1.0))
    drift = getattr(compare_to(reference, oracle, cache), column)
    distances = [getattr(compare_to(r, same_seed_reference(r, reference, runs), cache), column) for r in chosen]
    holds = not math.isnan(drift) and all(d <= factor * drift for d in distances)
    label = "max |Δθ|" if measure == "params" else "first-gradient relative difference"
    return ClaimResult(name, "within_drift", holds, f"{len(chosen)} runs: {label} to the reference up to "
                       f"{max(distances):.3g}, vs {factor:g} x the reference's {drift:.3g} from float64")


def claims_of(runs: List[Run]) -> List[Dict[str, Any]]:
    """The claims declared in the runs' configs (an experiment's `claims:`), without repeats."""
    seen, claims = set(), []
    for run in runs:
        for claim in run.summary.config.get("claims") or []:
            key = repr(sorted(claim.items(), key=lambda kv: kv[0]))
            if key not in seen:
                seen.add(key)
                claims.append(claim)
    return claims


def evaluate_claims(claims: List[Dict[str, Any]], runs: List[Run], reference: Any = None) -> List[ClaimResult]:
    cache: Dict[Any, Any] = {}
    return [evaluate_claim(c, runs, cache, reference) for c in claims]


def unexpected_failures(runs: List[Run], claims: List[Dict[str, Any]]) -> List[Run]:
    """Runs that did not finish ok and that no `fails` claim expects."""
    expected = [c for c in claims if c.get("kind") == "fails"]
    return [r for r in runs if r.status != "ok"
            and not any(r.matches(dict(c.get("runs") or {})) for c in expected)]


@dataclass
class SweepVerdicts:
    reference: Any  # the Run others are compared with, or None
    claims: List[ClaimResult] = field(default_factory=list)
    failed: List[Run] = field(default_factory=list)  # runs that failed with no claim expecting it

    @property
    def exit_code(self) -> int:
        """0 when every claim holds and every run not claimed to fail finished; else 1."""
        return 0 if all(c.holds for c in self.claims) and not self.failed else 1


def sweep_verdicts(runs: List[Run], extra_claims: Iterable[Dict[str, Any]] = (),
                   reference: Any = None) -> SweepVerdicts:
    """The claims the runs declare (plus `extra_claims`), their verdicts and the exit code."""
    claims = claims_of(runs) + list(extra_claims)
    reference = reference if reference is not None else pick_reference(runs)
    return SweepVerdicts(reference, evaluate_claims(claims, runs, reference), unexpected_failures(runs, claims))
