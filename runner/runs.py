"""Read runs back (what runner.record wrote), select them, pick a reference, compare two runs.

A Run is one run folder: its Summary and its config as flat `key -> text` (group choices such as
`backward` and dotted keys such as `backward.accumulation`), without the keys the schema declares
operational (they never make two runs different experiments).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from runner import record
from runner.record import Summary
from runner.schema import ignored_by_comparison

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


@dataclass
class Verdict:
    verdict: str  # reference | identical | equivalent | differs | differs (expected: why) | error
    max_abs_diff: float
    tolerance: str  # which comparison the verdict used


def compare_to(run: Run, reference: Optional[Run], cache: Dict[Path, Any]) -> Verdict:
    """max |Δθ| against the reference and the verdict, saying which tolerance it used."""
    dtype = run.summary.dtype or "float32"
    rtol, atol = TOLERANCES.get(dtype, TOLERANCES["float32"])
    tolerance = f"{dtype} rtol={rtol:g} atol={atol:g}"
    if reference is None or run.status != "ok" or reference.status != "ok":
        return Verdict("error", math.nan, tolerance)
    if run.path == reference.path:
        return Verdict("reference", 0.0, tolerance)
    if run.summary.param_sha256 and run.summary.param_sha256 == reference.summary.param_sha256:
        return Verdict("identical", 0.0, tolerance)
    try:
        mine = cache.setdefault(run.path, load_parameters(run))
        theirs = cache.setdefault(reference.path, load_parameters(reference))
    except (OSError, RuntimeError, ValueError) as exc:
        return Verdict("error", math.nan, f"{record.PARAMS} unreadable: {exc}")
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
