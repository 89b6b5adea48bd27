"""Read runs back (what runner.recording.record wrote), select them, pick a reference, compare two runs.

A Run is one run folder: its Summary and its config as flat `key -> text` (group choices such as
`backward` and dotted keys such as `backward.accumulation`), without the keys the schema declares
operational (they never make two runs different experiments).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from runner.config.schema import ignored_by_comparison
from runner.recording import record
from runner.recording.record import Summary

ACCUMULATION_KEY = "backward.accumulation"
# torch.testing's defaults for float32; float64 gets a tolerance far tighter than float32 rounding.
TOLERANCES = {"float32": (1.3e-6, 1e-5), "float64": (1e-7, 1e-7)}


@dataclass
class Run:
    path: Path
    summary: Summary
    sweep: str
    keys: Dict[str, str] = field(default_factory=dict)  # choices and flattened config, as strings

    @property
    def status(self) -> str:
        return self.summary.status

    def matches(self, selector: Dict[str, Any]) -> bool:
        for key, wanted in selector.items():
            options = wanted if isinstance(wanted, (list, tuple)) else [wanted]
            if not any(same_value(self.keys.get(key), o) for o in options):
                return False
        return True


def as_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def same_value(text: Optional[str], wanted: Any) -> bool:
    """Config values compare as numbers when both sides are numbers (0 == 0.0), else as text."""
    if text is None:
        return False
    wanted = as_text(wanted)
    try:
        return float(text) == float(wanted)
    except ValueError:
        return text == wanted


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, str]:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = as_text(value)
    return flat


def describe(selector: Dict[str, Any]) -> str:
    return " ".join(f"{k}={as_text(v)}" for k, v in selector.items()) or "all runs"


def _launch_order(path: Path) -> tuple:
    """Job folders in launch order: 2_... before 10_..."""
    head = path.parent.name.split("_", 1)[0]
    return (str(path.parent.parent), int(head) if head.isdigit() else -1, str(path))


def load_run(run_dir: Path) -> Run:
    try:
        summary = record.read_summary(run_dir)
    except (OSError, ValueError, TypeError):
        summary = Summary(status="unreadable", error=f"cannot read the summary of {run_dir}")
    run_dir = Path(run_dir)
    ignored = ignored_by_comparison()
    keys = {k: as_text(v) for k, v in {**summary.choices, **flatten(summary.config)}.items()
            if not any(k == i or k.startswith(i + ".") for i in ignored)}
    if summary.accumulation is not None and ACCUMULATION_KEY in keys:  # what the run used (full: 1)
        keys[ACCUMULATION_KEY] = as_text(summary.accumulation)
    return Run(run_dir, summary, str(run_dir.parent) if record.is_sweep(run_dir.parent) else "", keys)


def find_runs(paths: Iterable[Path]) -> List[Run]:
    """Every run at or under each path (a run folder, a sweep folder or any folder above them)."""
    runs = []
    for base in map(Path, paths):
        if not base.exists():
            raise FileNotFoundError(f"{base}: no such file or directory")
        runs += [load_run(p.parent) for p in sorted(record.summary_files(base), key=_launch_order)]
    return runs


def varying_keys(runs: List[Run]) -> List[str]:
    """Keys whose value differs between runs; choices (model, loss, ...) first."""
    all_keys = sorted({k for r in runs for k in r.keys})
    varying = [k for k in all_keys if len({r.keys.get(k) for r in runs}) > 1]
    # A group's name field (backward.name) repeats its choice (backward): keep the choice.
    varying = [k for k in varying if not (k.endswith(".name") and k[:-5] in varying)]
    return sorted(varying, key=lambda k: ("." in k, k))


def parse_selector(items: Iterable[str]) -> Dict[str, str]:
    selector = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--reference {item}: expected key=value, e.g. backward=full")
        selector[key] = value
    return selector


def twin(run: Run, change: Dict[str, Any], runs: List[Run]) -> Optional[Run]:
    """The finished run that differs from `run` only in `change`'s keys, set to its values: what
    that one change does, everything else equal (a claim's `against`)."""
    wanted = {**{k: v for k, v in run.keys.items() if k not in change}, **change}
    return next((r for r in runs if r is not run and r.status == "ok" and r.matches(wanted)), None)


def pick_reference(runs: List[Run], selector: Optional[Dict[str, Any]] = None) -> Optional[Run]:
    """The run others are compared with: the first finished run matching `selector` (default:
    backward=full, else the first run)."""
    candidates = [r for r in runs if r.matches(selector)] if selector else \
        [r for r in runs if r.keys.get("backward") == "full"] or runs
    ok = [r for r in candidates if r.status == "ok"]
    return (ok or candidates or [None])[0]


def load_parameters(run: Run):
    state = record.load_params(run.path)
    names = run.summary.param_names or list(state)
    return {n: state[n] for n in names if n in state}


def load_ema_parameters(run: Run):
    """The averaged weights (trainer.ema's ema_weights.pt), named as the parameters."""
    state = record.load_ema_weights(run.path)
    if state is None:
        raise ValueError(f"{run.path.name} kept no moving average (trainer.ema=0): no {record.EMA_WEIGHTS}")
    names = run.summary.param_names or list(state)
    return {n: state[n] for n in names if n in state}


DTYPE_KEY = "trainer.dtype"
ORACLE_DTYPE = "float64"


def find_oracle(runs: List[Run], reference: Optional[Run]) -> Optional[Run]:
    """The float64 run of the reference's configuration (every other key equal), or None.

    Its distance to the reference is how far the reference itself is from exact arithmetic: the
    honest scale for calling another run's distance to the reference small (`within_drift`)."""
    if reference is None:
        return None
    if reference.keys.get(DTYPE_KEY) == ORACLE_DTYPE:
        return reference
    same = {k: v for k, v in reference.keys.items() if k != DTYPE_KEY}
    return next((r for r in runs if r.status == "ok" and r.keys.get(DTYPE_KEY) == ORACLE_DTYPE
                 and {k: v for k, v in r.keys.items() if k != DTYPE_KEY} == same), None)


@dataclass
class Verdict:
    verdict: str  # reference | identical | equivalent | differs | differs (expected: why) | error
    max_abs_diff: float
    tolerance: str  # which comparison the verdict used
    # The first optimizer step's gradients (first_grad.pt): ||g - g_ref|| / ||g_ref||, taken from
    # identical parameters, so free of training's amplification of a difference.
    grad_rel_diff: float = math.nan
    # Against the float64 oracle of the reference (find_oracle), where the runs hold one.
    grad_diff_to_oracle: float = math.nan  # ||g - g_oracle|| / ||g_oracle||
    diff_to_oracle: float = math.nan  # max |θ - θ_oracle|
    # trainer.ema: max |θ_ema - θ_ema_ref| of the averaged weights, where both runs keep one.
    ema_max_abs_diff: float = math.nan


def _cached(cache: Dict[Any, Any], run: Run, what: str, load):
    if (run.path, what) not in cache:
        cache[(run.path, what)] = load(run)
    return cache[(run.path, what)]


def first_grad(run: Run, cache: Dict[Any, Any]):
    return _cached(cache, run, "first_grad", lambda r: record.load_first_grad(r.path))


def parameters(run: Run, cache: Dict[Any, Any]):
    return _cached(cache, run, "params", load_parameters)


def ema_parameters(run: Run, cache: Dict[Any, Any]):
    return _cached(cache, run, "ema", load_ema_parameters)


# Which weights a verdict compares (a claim's `weights:`): the final ones or their moving average,
# each with its loader and its bit-exact hash in the summary.
WEIGHTS = {"params": (parameters, "param_sha256"), "ema": (ema_parameters, "ema_param_sha256")}


def _comparable(run: Run, other: Optional[Run], cache: Dict[Any, Any], load) -> Optional[tuple]:
    """(run's tensors, other's) by name as `load` reads them, or None where either run did not
    finish, a file is missing or unreadable, or the names or shapes differ."""
    if other is None or run.status != "ok" or other.status != "ok":
        return None
    try:
        mine, theirs = load(run, cache), load(other, cache)
    except (OSError, RuntimeError, ValueError):
        return None
    if not mine or not theirs or mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
        return None
    return mine, theirs


def grad_rel_diff(run: Run, other: Optional[Run], cache: Dict[Any, Any], factor: float = 1.0) -> float:
    """||g - f·g_other|| / ||f·g_other|| of the first gradients over every parameter (float64), or
    NaN where they cannot be compared (no first_grad.pt, other parameters). `factor` f: 1, or the
    scale a bug is expected to put on the gradient (1/world, say)."""
    pair = _comparable(run, other, cache, first_grad)
    if pair is None:
        return math.nan
    import torch

    mine, theirs = pair
    diff = torch.sqrt(sum(((mine[k].double() - factor * theirs[k].double()) ** 2).sum() for k in mine))
    norm = torch.sqrt(sum(((factor * theirs[k].double()) ** 2).sum() for k in theirs))
    return float(diff / norm) if norm > 0 else (0.0 if diff == 0 else math.inf)


def max_param_diff(run: Run, other: Optional[Run], cache: Dict[Any, Any], load=parameters) -> float:
    """max |θ - θ_other| over every parameter (as `load` reads them: the final parameters, or
    ema_parameters), or NaN where they cannot be compared."""
    pair = _comparable(run, other, cache, load)
    if pair is None:
        return math.nan
    mine, theirs = pair
    return max((float((mine[k].double() - theirs[k].double()).abs().max()) for k in mine if mine[k].numel()),
               default=0.0)


def compare_to(run: Run, reference: Optional[Run], cache: Dict[Any, Any], oracle: Optional[Run] = None,
               weights: str = "params") -> Verdict:
    """The verdict against the reference (max |Δθ|, saying which tolerance it used) on `weights`
    (params, or ema: the moving averages), the first gradients' relative difference, the moving
    averages' distance, and the distances to the float64 `oracle` where given."""
    verdict = _verdict(run, reference, cache, weights)
    verdict.ema_max_abs_diff = max_param_diff(run, reference, cache, ema_parameters)
    verdict.grad_rel_diff = 0.0 if reference is not None and run.path == reference.path and run.status == "ok" \
        else grad_rel_diff(run, reference, cache)
    if oracle is not None:
        verdict.grad_diff_to_oracle = grad_rel_diff(run, oracle, cache)
        verdict.diff_to_oracle = max_param_diff(run, oracle, cache)
    return verdict


def _verdict(run: Run, reference: Optional[Run], cache: Dict[Any, Any], weights: str = "params") -> Verdict:
    dtype = run.summary.dtype or "float32"
    rtol, atol = TOLERANCES.get(dtype, TOLERANCES["float32"])
    tolerance = f"{dtype} rtol={rtol:g} atol={atol:g}"
    if reference is None or run.status != "ok" or reference.status != "ok":
        return Verdict("error", math.nan, tolerance)
    if run.path == reference.path:
        return Verdict("reference", 0.0, tolerance)
    load, sha_key = WEIGHTS[weights]
    sha = getattr(run.summary, sha_key)
    if sha and sha == getattr(reference.summary, sha_key):
        return Verdict("identical", 0.0, tolerance)
    try:
        mine, theirs = load(run, cache), load(reference, cache)
    except (OSError, RuntimeError, ValueError) as exc:
        return Verdict("error", math.nan, f"{weights} unreadable: {exc}")
    if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
        return Verdict("differs", math.nan, "different parameters (not comparable)")
    import torch

    diffs, close = [], True
    for name in mine:
        a, b = mine[name].double(), theirs[name].double()
        diffs.append(float((a - b).abs().max()) if a.numel() else 0.0)
        close = close and bool(torch.all((a - b).abs() <= atol + rtol * b.abs()))
    if close:
        return Verdict("equivalent", max(diffs, default=0.0), tolerance)
    # Said before training by the coupling probe: BatchNorm's batch statistics, dropout's masks.
    reason = run.summary.expected_difference() or reference.summary.expected_difference()
    return Verdict(f"differs (expected: {reason})" if reason else "differs", max(diffs, default=0.0), tolerance)
