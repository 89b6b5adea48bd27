"""Runs -> a comparison table, a picture and verdicts; the compare command line.

    python -m runner.compare PATH [PATH ...] [--reference backward=full] [--out table.csv]
                             [--format table|markdown|csv] [--claims FILE.yaml]

PATH is a run directory, a sweep directory or any folder above them. Reads only what
runner.recording.record wrote, through runner.analysis.runs. Exit 0 when every claim holds (and every run that is
not claimed to fail finished), 1 otherwise, 2 for bad paths.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

from runner.analysis.claims import ClaimResult, SweepVerdicts, sweep_verdicts
from runner.analysis.pictures import draw
from runner.analysis.replicates import (
    IMPACT_METRICS,
    SEED_KEY,
    SPREAD_FIGURES,
    configuration,
    crosses_seeds,
    groups,
    impact,
    same_seed_reference,
    spread,
)
from runner.analysis.runs import (
    ACCUMULATION_KEY,
    DTYPE_KEY,
    ORACLE_DTYPE,
    Run,
    compare_to,
    find_oracle,
    find_runs,
    parse_selector,
    pick_reference,
    varying_keys,
)
from runner.recording import record

# Columns that are not config keys (in the order shown); the varying config keys come first.
DISPLAY = list(record.SHOWN_COLUMNS)
HIDDEN = record.HIDDEN_COLUMNS


def build_table(runs: List[Run], reference: Optional[Run]):
    """One row per run: the varying config keys, outcome, checksums, verdict and cost."""
    import pandas as pd

    varying = varying_keys(runs)
    # Keys that are constant inside each sweep but differ between sweeps (float32 vs float64,
    # cpu vs cuda, ...) say which sweep a run is from: runs equal in every other key line up.
    sweeps = {r.sweep for r in runs}
    across = [k for k in varying if len(sweeps) > 1 and
              all(len({r.keys.get(k) for r in runs if r.sweep == s}) == 1 for s in sweeps)]
    cache: Dict[Any, Any] = {}
    oracles: Dict[Any, Optional[Run]] = {}  # a reference's float64 run, found once per reference
    rows = []
    for run in runs:
        row: Dict[str, Any] = {key: run.keys.get(key) for key in varying}
        row.update({key: getattr(run.summary, key) for key in record.COMPARED_KEYS})
        paired = same_seed_reference(run, reference, runs)  # seeds are replicates: same seed, same reference
        # A float64 run of the reference's configuration, if any: its oracle.
        key = paired.path if paired is not None else None
        if key not in oracles:
            oracles[key] = find_oracle(runs, paired)
        row.update(asdict(compare_to(run, paired, cache, oracles[key])))
        row.update(param_sha256=(run.summary.param_sha256 or "")[:12],
                   config_key=",".join(f"{k}={run.keys.get(k)}" for k in varying if k not in across),
                   sweep=run.sweep, run_dir=str(run.path))
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table) and table["sweep"].nunique() > 1:
        # Same config in several sweeps: put them next to each other.
        table = table.sort_values(["config_key", "sweep"], kind="stable").reset_index(drop=True)
    return table


def build_replicates(table, runs: List[Run], reference: Optional[Run]):
    """replicates.csv: one row per configuration without the seed (the varying keys but `seed`),
    n, mean, std, min and max of the compared figures, and the impact on the final loss and the
    held-out metric against the reference configuration, in its seed-to-seed σ."""
    import pandas as pd

    figures = table.set_index("run_dir")
    grouped = groups(runs)
    reference_runs = grouped.get(configuration(reference), []) if reference is not None else []
    varying = [k for k in varying_keys(runs) if k != SEED_KEY]
    rows = []
    for members in grouped.values():
        row: Dict[str, Any] = {key: members[0].keys.get(key) for key in varying}
        row["n"] = len(members)
        for figure in SPREAD_FIGURES:
            values = [figures.at[str(r.path), figure] for r in members if str(r.path) in figures.index]
            stats = spread([float(v) for v in values if v is not None and not pd.isna(v)])
            row.update({f"{figure}_{name}": value for name, value in stats.items() if name != "n"})
        for metric, column in zip(IMPACT_METRICS, ("impact", "impact_eval")):
            found = impact(members, reference_runs, metric)
            row[column] = found.value
            if metric == IMPACT_METRICS[0]:
                row["impact_verdict"], row["impact_seeds"] = found.verdict, found.seeds
        rows.append(row)
    return pd.DataFrame(rows)


def print_replicates(replicates) -> None:
    """The replicates' table on the terminal: mean ± std over the seeds, and the impact."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=240)
    keys = [c for c in replicates.columns if c != "n" and not c.startswith((*SPREAD_FIGURES, "impact"))]
    view = Table(title="replicates: mean ± std over seeds; impact in the reference's seed σ")
    for column in keys + ["n", *SPREAD_FIGURES, "impact"]:
        view.add_column(column, overflow="fold")
    for _, row in replicates.iterrows():
        spreads = [f"{_fmt(row[f'{f}_mean'], 4)} ± {_fmt(row[f'{f}_std'], 2)}".strip(" ±") for f in SPREAD_FIGURES]
        shown = "" if pd_isna(row["impact"]) or row["impact_verdict"] == "reference" else f"{row['impact']:+.3g}σ "
        view.add_row(*[escape(_fmt(row[k])) for k in keys], str(row["n"]), *spreads,
                     escape(f"{shown}{row['impact_verdict']}"))
    console.print(view)


def pd_isna(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# ---- output -------------------------------------------------------------------------------------

def display_columns(table) -> List[str]:
    varying = [c for c in table.columns if c not in DISPLAY and c not in HIDDEN]
    sweeps = ["sweep"] if "sweep" in table and table["sweep"].nunique() > 1 else []
    # The oracle columns only where the runs hold an oracle (a float64 run of the reference's config),
    # the EMA's only where runs keep one (trainer.ema).
    return sweeps + varying + [c for c in DISPLAY if c in table.columns
                               and not (c in record.ORACLE_COLUMNS + record.EMA_COLUMNS and table[c].isna().all())]


def _fmt(value: Any, digits: int = 6) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{int(value)}" if value.is_integer() and abs(value) >= 1 else f"{value:.{digits}g}"
    return str(value)


def to_markdown(table, claims: List[ClaimResult]) -> str:
    columns = display_columns(table)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]).replace("|", "\\|") for c in columns) + " |")
    if claims:
        lines += ["", "| claim | kind | verdict | detail |", "|---|---|---|---|"]
        lines += [f"| {c.name} | {c.kind} | {'holds' if c.holds else 'FAILS'} | {c.detail.replace('|', chr(92) + '|')} |"
                  for c in claims]
    return "\n".join(lines) + "\n"


def print_rich(table, verdicts: SweepVerdicts, title: str = "comparison") -> None:
    from rich.console import Console
    from rich.markup import escape
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
            text = escape(_fmt(row[c], 4))  # an error text may hold brackets that rich reads as markup
            colour = colours.get(text.split(" (")[0]) if c in ("status", "verdict") else None
            cells.append(f"[{colour}]{text}[/]" if colour else text)
        view.add_row(*cells)
    console.print(view)
    for line in verdict_lines(table, verdicts.reference):
        console.print(line, soft_wrap=True, highlight=False, markup=False)
    for c in verdicts.claims:
        mark = "[green]holds[/]" if c.holds else "[red]FAILS[/]"
        console.print(f"{mark}  {escape(c.name)}  [dim]{escape(c.detail)}[/]", soft_wrap=True)
    for run in verdicts.failed:
        print(f"job failed: {run.path.name}: {run.summary.error}", file=sys.stderr)


def verdict_lines(table, reference: Optional[Run]) -> List[str]:
    """A verdict per run against the reference, with the reason and the memory it held."""
    if reference is None or not len(table):
        return []
    labels = run_labels(table)
    rows = {Path(row["run_dir"]): row for _, row in table.iterrows()}
    ref_bytes = rows[reference.path][record.MEMORY_COLUMN] if reference.path in rows else None
    lines = [f"against {labels.get(reference.path, reference.path.name)}:"]
    for path, row in rows.items():
        if path == reference.path:
            continue
        if row["verdict"] == "error":
            lines.append(f"  {labels[path]}: error, {row['error']}")
            continue
        memory = ""
        if _number(row[record.MEMORY_COLUMN]) and _number(ref_bytes):
            memory = f"; held {int(row[record.MEMORY_COLUMN]):,} B, {row[record.MEMORY_COLUMN] / ref_bytes:.2f}x"
        grad = f", first gradient {row['grad_rel_diff']:.3g} apart" if _finite(row["grad_rel_diff"]) else ""
        lines.append(f"  {labels[path]}: {row['verdict']}, max |Δθ| {row['max_abs_diff']:.3g}{grad}{memory}")
    return lines


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)) and value > 0


def run_labels(table) -> Dict[Path, str]:
    """Legend labels: the keys that vary, and nothing else."""
    varying = [c for c in display_columns(table) if c not in DISPLAY]
    labels = {}
    for _, row in table.iterrows():
        label = ", ".join(f"{c}={row[c]}" for c in varying) or Path(row["run_dir"]).name
        labels[Path(row["run_dir"])] = label if len(label) <= 80 else label[:77] + "..."
    return labels


def draw_oracle_drift(table, sweep_dir: Path) -> Optional[Path]:
    """grad_diff_to_oracle.png: each configuration's first-gradient error against the float64
    oracle over the accumulation factor, log-log (left), and the same error relative to the
    configuration's own at the smallest k (right, linear), where small growth shows. Drawn where
    the sweep crosses backward.accumulation and holds an oracle; float64 runs (the oracle's
    family, ~1e-16) are left out. matplotlib is imported only here."""
    column = "grad_diff_to_oracle"
    if ACCUMULATION_KEY not in table or column not in table or not table[column].notna().any():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = table.dropna(subset=[column])
    if DTYPE_KEY in data:
        data = data[data[DTYPE_KEY].astype(str) != ORACLE_DTYPE]
    data = data[data[column] > 0].assign(k=lambda d: d[ACCUMULATION_KEY].astype(float))
    others = [c for c in display_columns(table) if c not in DISPLAY and c != ACCUMULATION_KEY
              and c in data and data[c].nunique() > 1]
    if not len(data):
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 7), layout="constrained")
    colours = plt.get_cmap("tab20").colors
    groups = data.groupby(others, sort=False) if others else [((), data)]
    for i, (key, group) in enumerate(groups):
        key = key if isinstance(key, tuple) else (key,)
        group = group.sort_values("k")
        label = ", ".join(f"{c}={v}" for c, v in zip(others, key)) or "runs"
        style = dict(marker="o", linewidth=1, color=colours[i % len(colours)], label=label)
        left.plot(group["k"], group[column], **style)
        right.plot(group["k"], group[column] / group[column].iloc[0], **style)
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("backward.accumulation (micro-batches per optimizer step)")
    left.set_yscale("log")
    left.set_ylabel("||g - g_float64|| / ||g_float64||, first optimizer step")
    left.set_title("first-gradient error against the float64 oracle")
    right.set_ylabel("error / the same configuration's error at the smallest k")
    right.set_title("growth with k")
    fig.legend(*left.get_legend_handles_labels(), fontsize=7, loc="outside lower center", ncol=2)
    path = record.save_figure(fig, sweep_dir, name=record.ORACLE_DRIFT)
    plt.close(fig)
    return path


# ---- a sweep, as it runs and when it ends --------------------------------------------------------

def append_job_row(sweep_dir: Path, run_dir: Path) -> None:
    """One finished job's row, added to comparison.csv while the sweep runs (cheap: no pandas,
    no params.pt). The end of the sweep rewrites the file as the full comparison."""
    summary = record.read_summary(run_dir) if record.has_summary(run_dir) else \
        record.Summary(status="error", error="the job wrote no summary")
    row = {key: getattr(summary, key) for key in record.COMPARED_KEYS}
    row.update(job=run_dir.name, overrides=" ".join(summary.overrides), run_dir=str(run_dir),
               param_sha256=(summary.param_sha256 or "")[:12])
    record.append_comparison_row(sweep_dir, list(record.JOB_COLUMNS), row)


def summarise_sweep(sweep_dir: Path) -> int:
    """The end of a sweep: comparison.csv with verdicts, the table, the claims, loss_curves.png.
    Returns the sweep's exit code (runner.analysis.claims.sweep_verdicts)."""
    runs = find_runs([sweep_dir])
    if not runs:
        return 0
    verdicts = sweep_verdicts(runs)
    table = build_table(runs, verdicts.reference)
    record.write_comparison(sweep_dir, table)
    print_rich(table, verdicts, title=f"sweep {sweep_dir} ({len(runs)} jobs)")
    if crosses_seeds(runs):
        replicates = build_replicates(table, runs, verdicts.reference)
        record.write_replicates(sweep_dir, replicates)
        print_replicates(replicates)
        print(f"replicates: {Path(sweep_dir) / record.REPLICATES}")
    picture = draw(runs, verdicts.reference, sweep_dir)
    print(f"comparison: {Path(sweep_dir) / record.COMPARISON}\npicture: {picture}")
    drift = draw_oracle_drift(table, sweep_dir)
    if drift is not None:
        print(f"picture: {drift}")
    return verdicts.exit_code


def read_claims_file(path: Path) -> List[Dict[str, Any]]:
    import yaml  # PyYAML, which Hydra brings

    data = yaml.safe_load(Path(path).read_text()) or {}
    claims = data.get("claims", []) if isinstance(data, dict) else None
    if not isinstance(claims, list):
        raise ValueError(f"--claims {path}: expected a YAML mapping with a `claims:` list")
    return claims


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run directories, sweep directories or folders of sweeps")
    parser.add_argument("--reference", nargs="*", default=[], metavar="KEY=VALUE",
                        help="select the reference run (default: backward=full, else the first run)")
    parser.add_argument("--out", type=Path, help="write the table as CSV to this file")
    parser.add_argument("--format", choices=["table", "markdown", "csv"], default="table")
    parser.add_argument("--claims", type=Path, help="a YAML file with a `claims:` list to check")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.paths)
        selector = parse_selector(args.reference)
        extra = read_claims_file(args.claims) if args.claims else []
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: no runs under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    reference = pick_reference(runs, selector or None)
    if selector and (reference is None or not reference.matches(selector)):
        print(f"error: --reference {' '.join(args.reference)} matches no run", file=sys.stderr)
        return 2
    verdicts = sweep_verdicts(runs, extra, reference)
    table = build_table(runs, reference)
    if args.out:
        record.write_table_csv(table, args.out)
    if args.format == "markdown":
        sys.stdout.write(to_markdown(table, verdicts.claims))
    elif args.format == "csv":
        sys.stdout.write(table.to_csv(index=False))
    else:
        print_rich(table, verdicts, title=f"{len(runs)} runs, reference {reference.path if reference else '-'}")
    return verdicts.exit_code


if __name__ == "__main__":
    sys.exit(main())
