"""Runs -> a comparison table and verdicts against a reference (claims: runner/claims.py).

    python -m runner.compare PATH [PATH ...] [--reference backward=full] [--out table.csv]
                             [--format table|markdown|csv] [--claims FILE.yaml]

PATH is a run directory, a sweep directory or any folder above them. Reads only what
runner/record.py wrote (summary.json, params.pt, metrics.csv). Exit 0 when every claim holds
(and every run that is not claimed to fail finished), 1 otherwise, 2 for bad paths.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from runner import record

# torch.testing's defaults for float32; float64 gets a tolerance far tighter than float32 rounding.
TOLERANCES = {"float32": (1.3e-6, 1e-5), "float64": (1e-7, 1e-7)}
# Config keys that never make two runs different experiments.
IGNORED_KEYS = ("claims", "trainer.progress", "trainer.log_every", "trainer.resume",
                "trainer.checkpoint_every", "trainer.threads", "trainer.memory")


@dataclass
class Run:
    path: Path
    summary: Dict[str, Any]
    sweep: str
    keys: Dict[str, str] = field(default_factory=dict)  # choices and flattened config, as strings

    @property
    def status(self) -> str:
        return self.summary.get("status", "unknown")

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


def _natural(path: Path) -> tuple:
    """Job folders in launch order: 2_... before 10_..."""
    head = path.parent.name.split("_", 1)[0]
    return (str(path.parent.parent), int(head) if head.isdigit() else -1, str(path))


def find_runs(paths: Iterable[Path]) -> List[Run]:
    runs = []
    for base in map(Path, paths):
        if not base.exists():
            raise FileNotFoundError(f"{base}: no such file or directory")
        summaries = [base / record.SUMMARY] if (base / record.SUMMARY).exists() \
            else sorted(base.rglob(record.SUMMARY), key=_natural)
        for path in summaries:
            run_dir = path.parent
            try:
                summary = record.read_summary(run_dir)
            except (OSError, ValueError):
                summary = {"status": "unreadable", "error": f"cannot read {path}"}
            sweep = str(run_dir.parent) if (run_dir.parent / "multirun.yaml").exists() else ""
            keys = dict(summary.get("choices") or {})
            keys.update(flatten(summary.get("config") or {}))
            keys = {k: as_text(v) for k, v in keys.items()
                    if not any(k == i or k.startswith(i + ".") for i in IGNORED_KEYS)}
            runs.append(Run(run_dir, summary, sweep, keys))
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
    candidates = [r for r in runs if r.matches(selector)] if selector else \
        [r for r in runs if r.keys.get("backward") == "full"] or runs
    ok = [r for r in candidates if r.status == "ok"]
    return (ok or candidates or [None])[0]


def load_parameters(run: Run):
    state = record.load_params(run.path)
    names = run.summary.get("param_names") or list(state)
    return {n: state[n] for n in names if n in state}


def compare_to(run: Run, reference: Optional[Run], cache: Dict[Path, Any]) -> Dict[str, Any]:
    """max |Δθ| against the reference and the verdict, saying which tolerance it used."""
    dtype = run.summary.get("dtype", "float32")
    rtol, atol = TOLERANCES.get(dtype, TOLERANCES["float32"])
    result = {"max_abs_diff": math.nan, "verdict": "error", "tolerance": f"{dtype} rtol={rtol:g} atol={atol:g}"}
    if reference is None or run.status != "ok" or reference.status != "ok":
        return result
    if run.path == reference.path:
        return {**result, "max_abs_diff": 0.0, "verdict": "reference"}
    if run.summary.get("param_sha256") and run.summary.get("param_sha256") == reference.summary.get("param_sha256"):
        return {**result, "max_abs_diff": 0.0, "verdict": "identical"}
    try:
        mine = cache.setdefault(run.path, load_parameters(run))
        theirs = cache.setdefault(reference.path, load_parameters(reference))
    except (OSError, RuntimeError, ValueError) as exc:
        return {**result, "verdict": "error", "tolerance": f"params.pt unreadable: {exc}"}
    if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
        return {**result, "verdict": "differs", "tolerance": "different parameters (not comparable)"}
    import torch

    diffs, close = [], True
    for name in mine:
        a, b = mine[name].double(), theirs[name].double()
        diffs.append(float((a - b).abs().max()) if a.numel() else 0.0)
        close = close and bool(torch.all((a - b).abs() <= atol + rtol * b.abs()))
    return {**result, "max_abs_diff": max(diffs, default=0.0), "verdict": "equivalent" if close else "differs"}


def build_table(runs: List[Run], reference: Optional[Run]):
    """One row per run: the varying config keys, outcome, checksums, verdict and cost."""
    import pandas as pd

    varying = varying_keys(runs)
    # Keys that are constant inside each sweep but differ between sweeps (float32 vs float64,
    # cpu vs cuda, ...) say which sweep a run is from: runs equal in every other key line up.
    sweeps = {r.sweep for r in runs}
    across = [k for k in varying if len(sweeps) > 1 and
              all(len({r.keys.get(k) for r in runs if r.sweep == s}) == 1 for s in sweeps)]
    cache: Dict[Path, Any] = {}
    rows = []
    for run in runs:
        s = run.summary
        row = {key: run.keys.get(key) for key in varying}
        row.update({
            "status": run.status,
            "final_loss": s.get("final_loss"),
            "eval_metric": s.get("eval_metric"),
            "eval_value": s.get("eval_value"),
            "param_sum": s.get("param_sum"),
            "param_sha256": (s.get("param_sha256") or "")[:12],
            **compare_to(run, reference, cache),
            "peak_saved_bytes": s.get("peak_saved_bytes"),
            "time_per_step_s": s.get("time_per_step_s"),
            "steps_done": s.get("steps_done"),
            "error": s.get("error"),
            "config_key": ",".join(f"{k}={run.keys.get(k)}" for k in varying if k not in across),
            "sweep": run.sweep,
            "run_dir": str(run.path),
        })
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table) and table["sweep"].nunique() > 1:
        # Same config in several sweeps: put them next to each other.
        table = table.sort_values(["config_key", "sweep"], kind="stable").reset_index(drop=True)
    return table


# ---- output -------------------------------------------------------------------------------------

DISPLAY = ["status", "final_loss", "eval_value", "param_sum", "param_sha256", "max_abs_diff", "verdict",
           "peak_saved_bytes", "time_per_step_s", "error"]


def display_columns(table) -> List[str]:
    varying = [c for c in table.columns if c not in DISPLAY and c not in
               ("eval_metric", "tolerance", "steps_done", "config_key", "sweep", "run_dir")]
    sweeps = ["sweep"] if "sweep" in table and table["sweep"].nunique() > 1 else []
    return sweeps + varying + DISPLAY


def _fmt(value: Any, digits: int = 6) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{int(value)}" if value.is_integer() and abs(value) >= 1 else f"{value:.{digits}g}"
    return str(value)


def to_markdown(table, claims: list) -> str:
    columns = display_columns(table)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]).replace("|", "\\|") for c in columns) + " |")
    if claims:
        lines += ["", "| claim | kind | verdict | detail |", "|---|---|---|---|"]
        lines += [f"| {c.name} | {c.kind} | {'holds' if c.holds else 'FAILS'} | {c.detail.replace('|', chr(92) + '|')} |"
                  for c in claims]
    return "\n".join(lines) + "\n"


def print_rich(table, claims: list, title: str = "comparison") -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=240)
    view = Table(title=title)
    columns = display_columns(table)
    for column in columns:
        view.add_column(column, overflow="fold")
    colours = {"ok": "green", "reference": "cyan", "identical": "green", "equivalent": "green",
               "differs": "yellow", "error": "red", "diverged": "red", "interrupted": "yellow"}
    for _, row in table.iterrows():
        cells = []
        for c in columns:
            text = _fmt(row[c], 4)
            colour = colours.get(text) if c in ("status", "verdict") else None
            cells.append(f"[{colour}]{text}[/]" if colour else text)
        view.add_row(*cells)
    console.print(view)
    for c in claims:
        mark = "[green]holds[/]" if c.holds else "[red]FAILS[/]"
        console.print(f"{mark}  {c.name}  [dim]{c.detail}[/]", soft_wrap=True)


def write_csv(table, path: Path) -> None:
    text = table.to_csv(index=False)
    record.atomic_write_bytes(Path(path), text.encode())


def loss_curves(runs: List[Run], path: Path, labels: Dict[Path, str]) -> None:
    """loss against step, one line per run (matplotlib, imported only here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for run in runs:
        metrics_path = run.path / record.METRICS
        if not metrics_path.exists():
            continue
        metrics = pd.read_csv(metrics_path)
        if len(metrics):
            ax.plot(metrics["step"], metrics["loss"], label=labels.get(run.path, run.path.name), linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("loss curves")
    if ax.lines:
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def run_labels(table) -> Dict[Path, str]:
    varying = [c for c in display_columns(table) if c not in DISPLAY]
    return {Path(row["run_dir"]): ", ".join(f"{c}={row[c]}" for c in varying) or Path(row["run_dir"]).name
            for _, row in table.iterrows()}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run directories, sweep directories or folders of sweeps")
    parser.add_argument("--reference", nargs="*", default=[], metavar="KEY=VALUE",
                        help="select the reference run (default: backward=full, else the first run)")
    parser.add_argument("--out", type=Path, help="write the table as CSV to this file")
    parser.add_argument("--format", choices=["table", "markdown", "csv"], default="table")
    parser.add_argument("--claims", type=Path, help="a YAML file with a `claims:` list to check")
    args = parser.parse_args(argv)
    from runner.claims import claims_of, evaluate_claims, unexpected_failures

    try:
        runs = find_runs(args.paths)
        selector = parse_selector(args.reference)
        claims = claims_of(runs)
        if args.claims:
            from omegaconf import OmegaConf

            claims += OmegaConf.to_container(OmegaConf.load(args.claims)).get("claims", [])
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: no runs (no summary.json) under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    reference = pick_reference(runs, selector or None)
    if selector and (reference is None or not reference.matches(selector)):
        print(f"error: --reference {' '.join(args.reference)} matches no run", file=sys.stderr)
        return 2
    table = build_table(runs, reference)
    results = evaluate_claims(claims, runs)
    if args.out:
        write_csv(table, args.out)
    if args.format == "markdown":
        sys.stdout.write(to_markdown(table, results))
    elif args.format == "csv":
        sys.stdout.write(table.to_csv(index=False))
    else:
        print_rich(table, results, title=f"{len(runs)} runs, reference {reference.path if reference else '-'}")
    failed = unexpected_failures(runs, claims)
    return 0 if all(r.holds for r in results) and not failed else 1


if __name__ == "__main__":
    sys.exit(main())


JOB_COLUMNS = ["job", "overrides", "status", "final_loss", "eval_metric", "eval_value", "param_sum",
               "param_sha256", "peak_saved_bytes", "time_per_step_s", "steps_done", "error", "run_dir"]


def append_job_row(sweep_dir: Path, run_dir: Path) -> None:
    """One finished job's row, appended to comparison.csv while the sweep runs (cheap: no pandas,
    no params.pt). The end of the sweep rewrites the file as the full comparison."""
    summary = record.read_summary(run_dir) if (run_dir / record.SUMMARY).exists() else \
        {"status": "error", "error": "the job wrote no summary.json"}
    row = {**{c: summary.get(c) for c in JOB_COLUMNS}, "job": run_dir.name,
           "overrides": " ".join(summary.get("overrides") or []), "run_dir": str(run_dir),
           "param_sha256": (summary.get("param_sha256") or "")[:12]}
    path = Path(sweep_dir) / "comparison.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=JOB_COLUMNS, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerow({k: "" if v is None else v for k, v in row.items()})


def summarise_sweep(sweep_dir: Path) -> int:
    """The end of a sweep: comparison.csv with verdicts, the table, the claims, loss_curves.png.
    Returns the sweep's exit code: 1 when a claim fails or a job failed unexpectedly."""
    from runner.claims import claims_of, evaluate_claims, unexpected_failures

    runs = find_runs([sweep_dir])
    if not runs:
        return 0
    reference = pick_reference(runs)
    table = build_table(runs, reference)
    write_csv(table, Path(sweep_dir) / "comparison.csv")
    claims = claims_of(runs)
    results = evaluate_claims(claims, runs)
    print_rich(table, results, title=f"sweep {sweep_dir} ({len(runs)} jobs)")
    loss_curves(runs, Path(sweep_dir) / "loss_curves.png", run_labels(table))
    failed = unexpected_failures(runs, claims)
    for run in failed:
        print(f"job failed: {run.path.name}: {run.summary.get('error')}", file=sys.stderr)
    return 0 if all(r.holds for r in results) and not failed else 1
