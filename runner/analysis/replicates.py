"""Seeds as replicates: runs that differ only in `seed` are one configuration measured several times.

- Pairing: a run is compared with the reference configuration's run at the same seed, never with
  another seed's (`same_seed_reference`).
- Spread: per configuration, n, mean, standard deviation, min and max of the figures a comparison
  reads (replicates.csv).
- Impact: does a difference matter beyond seed noise? The mean paired difference of a metric
  (final_loss, eval_value) between a configuration and the reference configuration over the seeds
  both ran, in units of the reference configuration's seed-to-seed standard deviation:
  `negligible` under 0.5σ, `visible` at or above, `unknown` with fewer than 3 paired seeds.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from runner.analysis.runs import Run

SEED_KEY = "seed"
NEGLIGIBLE_BELOW = 0.5  # σ of the reference configuration's seed-to-seed spread
MIN_SEEDS = 3  # fewer paired seeds than this: the spread itself is not known
# The figures replicates.csv summarises, and the metrics an impact is measured on.
SPREAD_FIGURES = ("final_loss", "eval_value", "max_abs_diff", "grad_rel_diff")
IMPACT_METRICS = ("final_loss", "eval_value")


def crosses_seeds(runs: List[Run]) -> bool:
    return len({r.keys.get(SEED_KEY) for r in runs}) > 1


def configuration(run: Run) -> Tuple[Tuple[str, str], ...]:
    """The run's configuration without its seed: what its replicates share."""
    return tuple(sorted((k, v) for k, v in run.keys.items() if k != SEED_KEY))


def same_seed_reference(run: Run, reference: Optional[Run], runs: List[Run]) -> Optional[Run]:
    """The reference configuration's run at `run`'s seed (the reference itself where the seeds
    agree, or where no run of the reference's configuration has that seed)."""
    if reference is None or run.keys.get(SEED_KEY) == reference.keys.get(SEED_KEY):
        return reference
    wanted, seed = configuration(reference), run.keys.get(SEED_KEY)
    twins = [r for r in runs if r.keys.get(SEED_KEY) == seed and configuration(r) == wanted]
    return next((r for r in twins if r.status == "ok"), twins[0] if twins else None)


@dataclass
class Impact:
    value: float  # mean paired difference / the reference configuration's seed std (NaN: unknown)
    seeds: int  # seeds both configurations finished
    verdict: str  # reference | negligible | visible | unknown

    def describe(self) -> str:
        shown = "" if math.isnan(self.value) else f"{self.value:+.3g}σ, "
        return f"{self.verdict} ({shown}{self.seeds} seeds)"


def _by_seed(runs: List[Run], metric: str) -> Dict[str, float]:
    values = {}
    for run in runs:
        value = run.summary.metric(metric) if run.status == "ok" else None
        if value is not None and math.isfinite(value):
            values[run.keys.get(SEED_KEY)] = value
    return values


def impact(runs: List[Run], reference_runs: List[Run], metric: str = "final_loss") -> Impact:
    """`runs` (one configuration's replicates) against `reference_runs` (the reference
    configuration's), paired by seed, on a summary metric."""
    if runs and reference_runs and configuration(runs[0]) == configuration(reference_runs[0]):
        return Impact(0.0, len(runs), "reference")
    mine, theirs = _by_seed(runs, metric), _by_seed(reference_runs, metric)
    paired = [mine[s] - theirs[s] for s in mine if s in theirs]
    if len(paired) < MIN_SEEDS or len(theirs) < 2:
        return Impact(math.nan, len(paired), "unknown")
    spread = statistics.stdev(theirs.values())
    mean = statistics.fmean(paired)
    value = mean / spread if spread > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    return Impact(value, len(paired), "negligible" if abs(value) < NEGLIGIBLE_BELOW else "visible")


def groups(runs: List[Run]) -> Dict[tuple, List[Run]]:
    """Configuration (without the seed) -> its replicates, one run per seed, in the runs' order.
    Jobs of one configuration at one seed are one training (full asked for k = 2 and k = 4 used 1,
    and a sweep reused the first): counting each would shrink the spread."""
    grouped: Dict[tuple, List[Run]] = {}
    for run in runs:
        members = grouped.setdefault(configuration(run), [])
        twin = next((i for i, m in enumerate(members) if m.keys.get(SEED_KEY) == run.keys.get(SEED_KEY)), None)
        if twin is None:
            members.append(run)
        elif members[twin].status != "ok" and run.status == "ok":
            members[twin] = run
    return grouped


def spread(values: List[float]) -> Dict[str, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"n": 0, "mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    return {"n": len(finite), "mean": statistics.fmean(finite),
            "std": statistics.stdev(finite) if len(finite) > 1 else math.nan, "min": min(finite), "max": max(finite)}
