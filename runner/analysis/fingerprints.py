"""A fingerprint's verdicts on the terminal and its picture, from what runner.recording.record wrote
(fingerprint.csv, fingerprint_weights.csv): each step's micro-batch weights relative to the exact ones,
so that a bug is a bar off 1.0.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from runner.recording import record

EXACT_LINE = "#444444"


def print_verdicts(rows, title: str) -> None:
    """One line per probe, grouped by dimension: what was observed, whether it is the exact fix, the evidence."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=100)
    several = rows["loop"].nunique() > 1
    table = Table(title=title, show_lines=several)
    for column in (["loop"] if several else []) + ["dimension", "probe", "observed", "exact"]:
        table.add_column(column, overflow="fold")
    for _, row in rows.iterrows():
        exact = str(row["exact"]).lower() == "true"
        table.add_row(*([escape(str(row["loop"]))] if several else []), str(row["dimension"]), str(row["probe"]),
                      escape(str(row["observed"])), "[green]exact[/]" if exact else "[red]not exact[/]")
    console.print(table)
    print(f"evidence (weight error, residual, distance from the exact run): {record.FINGERPRINT}")
    for loop, mine in rows.groupby("loop", sort=False):
        wrong = sorted({d for d, e in zip(mine["dimension"], mine["exact"]) if str(e).lower() != "true"},
                       key=list(mine["dimension"]).index)
        verdict = "the exact fix on every probe" if not wrong else "not the exact fix: " + ", ".join(wrong)
        print(f"{loop}: {verdict}")


def draw(rows, weights, folder: Path, title: str = "") -> Optional[Path]:
    """fingerprint.png: a panel per loop and probe; bars are each micro-batch's weight / its exact weight, in
    stream order, steps separated by gaps; the line at 1.0 is the exact fix."""
    if weights is None or not len(weights):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loops = list(dict.fromkeys(weights["loop"]))
    probes = list(dict.fromkeys(rows["probe"]))
    observed = {(r["loop"], r["probe"]): str(r["observed"]) for _, r in rows.iterrows()}
    figure, axes = plt.subplots(len(loops), len(probes), figsize=(2.6 * len(probes), 1.9 * len(loops) + 0.8),
                                squeeze=False, constrained_layout=True)
    for i, loop in enumerate(loops):
        for j, probe in enumerate(probes):
            ax = axes[i][j]
            mine = weights[(weights["loop"] == loop) & (weights["probe"] == probe)]
            x, heights, colors, position, last_step = [], [], [], 0.0, None
            for _, w in mine.iterrows():
                if last_step is not None and w["step"] != last_step:
                    position += 0.6  # a gap between optimizer steps
                last_step = w["step"]
                ratio = w["weight"] / w["exact_weight"] if w["exact_weight"] else 0.0
                x.append(position)
                heights.append(ratio)
                colors.append("tab:blue" if abs(ratio - 1) < 1e-3 else "tab:red")
                position += 1.0
            ax.bar(x, heights, width=0.85, color=colors)
            ax.axhline(1.0, color=EXACT_LINE, linewidth=0.8, linestyle="--")
            ax.set_xticks([])
            ax.tick_params(labelsize=7)
            label = observed.get((loop, probe), "")
            ax.set_title(f"{probe}\n{label[:34]}", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"{str(loop)[:28]}\nweight / exact", fontsize=7)
    figure.suptitle(title or "each micro-batch's weight in its step, relative to the exact weight (1.0)",
                    fontsize=9)
    path = record.save_figure(figure, folder, name=record.FINGERPRINT_PICTURE)
    plt.close(figure)
    return path


def summarise(folders, into: Path, title: str) -> int:
    """Merge the jobs' fingerprints into `into` (a sweep's folder), print them and draw the picture.
    Returns 1 when a job's loop failed (an `error:` observation), else 0."""
    import pandas as pd

    read = [record.read_fingerprint(folder) for folder in folders]
    if not read:
        return 0
    rows = pd.concat([r for r, _ in read], ignore_index=True)
    weights = pd.concat([w for _, w in read if len(w)], ignore_index=True) if any(len(w) for _, w in read) else None
    if Path(into) not in [Path(f) for f in folders]:
        record.write_fingerprint(into, rows.to_dict("records"), [] if weights is None else weights.to_dict("records"))
    print_verdicts(rows, title)
    picture = draw(rows, weights, into)
    print(f"fingerprint: {Path(into) / record.FINGERPRINT}")
    if picture is not None:
        print(f"picture: {picture}")
    return 1 if rows["observed"].astype(str).str.startswith("error:").any() else 0


def _short(observed) -> str:
    """A table cell: "not observed", "not named" or "not run" without its reason (fingerprint.csv keeps it)."""
    text = str(observed)
    return text.split(":")[0] if text.startswith("not ") else text


def markdown(rows) -> str:
    """The loops' fingerprints as one markdown table: a row per loop (with its version), a column per probe
    (its dimension above it); a cell is what was observed, in bold where it is not the exact fix."""
    probes = list(dict.fromkeys(rows["probe"]))
    dimension = {r["probe"]: r["dimension"] for _, r in rows.iterrows()}
    lines = ["| loop | " + " | ".join(f"{dimension[p]}: {p}" for p in probes) + " |",
             "| --- |" + " --- |" * len(probes)]
    for (loop, version), mine in rows.groupby(["loop", "version"], sort=False):
        cells = {r["probe"]: (f"`{_short(r['observed'])}`" if str(r["exact"]).lower() == "true"
                              else f"**`{_short(r['observed'])}`**") for _, r in mine.iterrows()}
        shown = f"{loop} ({version})" if version and version != loop else str(loop)
        lines.append(f"| {shown} | " + " | ".join(cells.get(p, "") for p in probes) + " |")
    return "\n".join(lines) + "\n"


DOCS_BEGIN = "<!-- fingerprints: generated by `make fingerprints` (python -m runner.analysis.fingerprints --docs) -->"
DOCS_END = "<!-- end fingerprints -->"


def docs_block(rows, measured: str) -> str:
    """The generated part of docs/fingerprint.md: when (`measured`), on what, and the table."""
    from runner.analysis.machine import machine

    return (f"{DOCS_BEGIN}\nMeasured {measured} on {machine()}; seed 0. Bold: not the "
            f"exact fix.\n\n{markdown(rows)}{DOCS_END}")


def write_docs(rows, page: Path, measured: str) -> None:
    """Replace the generated block of `page` (between DOCS_BEGIN and DOCS_END) with this table."""
    text = Path(page).read_text()
    start, end = text.index(DOCS_BEGIN), text.index(DOCS_END) + len(DOCS_END)
    record.atomic_write_bytes(Path(page), (text[:start] + docs_block(rows, measured) + text[end:]).encode())


def main(argv=None) -> int:
    """python -m runner.analysis.fingerprints FOLDER [FOLDER ...] [--docs PAGE]: fingerprints (a run's or a
    sweep's) as one markdown table, printed, or written into PAGE's generated block."""
    import argparse

    import pandas as pd

    parser = argparse.ArgumentParser(prog="python -m runner.analysis.fingerprints", description=main.__doc__)
    parser.add_argument("folders", type=Path, nargs="+", help=f"folders holding {record.FINGERPRINT}")
    parser.add_argument("--docs", type=Path, help="a page with the generated block to rewrite")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.folders if not (f / record.FINGERPRINT).exists()]
    if missing:
        print(f"error: {', '.join(missing)} holds no {record.FINGERPRINT}", file=sys.stderr)
        return 2
    rows = pd.concat([record.read_fingerprint(folder)[0] for folder in args.folders], ignore_index=True)
    if args.docs is None:
        print(markdown(rows), end="")
        return 0
    import datetime

    newest = max((folder / record.FINGERPRINT).stat().st_mtime for folder in args.folders)
    try:
        write_docs(rows, args.docs, datetime.datetime.fromtimestamp(newest, datetime.timezone.utc).date().isoformat())
    except (OSError, ValueError) as exc:
        print(f"error: --docs {args.docs}: {exc} (expected a page with {DOCS_BEGIN} ... {DOCS_END})", file=sys.stderr)
        return 2
    print(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
