"""A markdown report of a folder of sweeps: what each experiment shows (its `about`), its pictures
(linked relative to the report, so it renders on GitHub and in an editor), every table and claim
verdict, with the machine.

    python -m runner.report outputs/experiments/<time> [--out report.md]

`make experiments` runs every ready-made experiment into one folder and writes this report.
Exit 1 when a claim fails or a run failed unexpectedly.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from typing import List, Optional

from runner import compare
from runner.analysis import fingerprints
from runner.analysis.claims import sweep_verdicts
from runner.analysis.machine import machine
from runner.analysis.runs import find_runs
from runner.recording import record


def pictures(sweep: Path, report_dir: Path) -> List[str]:
    """Markdown images of the sweep's pictures that exist, by paths relative to the report's folder."""
    found = [sweep / name for name in record.SWEEP_PICTURES if (sweep / name).is_file()]
    return [f"![{path.stem.replace('_', ' ')}]({Path(os.path.relpath(path, report_dir)).as_posix()})" for path in found]


def build_report(base: Path, report_dir: Optional[Path] = None) -> tuple[str, bool]:
    """The report's text and whether every claim holds. `report_dir`: where the report will be
    written (pictures are linked relative to it; default: `base`)."""
    report_dir = Path(report_dir or base).resolve()
    lines = ["# backward-lab experiments", "",
             f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on {machine()}", "",
             "Verdicts compare final parameters with the reference run: identical (same bytes), "
             "equivalent (within the dtype's tolerance, named in each claim), differs, error.", ""]
    all_hold = True
    for sweep in record.sweeps_under(base):
        runs = find_runs([sweep])
        if not runs:
            if (sweep / record.FINGERPRINT).is_file():  # experiment=fingerprint: a loop's fingerprint, not runs
                rows, _ = record.read_fingerprint(sweep)
                picture = Path(os.path.relpath(sweep.resolve() / record.FINGERPRINT_PICTURE, report_dir)).as_posix()
                lines += [f"## {sweep.name}", "", fingerprints.markdown(rows), f"![fingerprint]({picture})", ""]
            continue
        verdicts = sweep_verdicts(runs)
        all_hold = all_hold and verdicts.exit_code == 0
        held = sum(c.holds for c in verdicts.claims)
        about = next((r.summary.config.get("about") for r in runs if r.summary.config.get("about")), None)
        lines += [f"## {sweep.name}", ""] + ([about, ""] if about else [])
        lines += [f"{len(runs)} runs; {held}/{len(verdicts.claims)} claims hold"
                  + (f"; {len(verdicts.failed)} unexpected failures" if verdicts.failed else "") + ".", ""]
        images = pictures(sweep.resolve(), report_dir)
        lines += [" ".join(images), ""] if images else []
        table = compare.build_table(runs, verdicts.reference)
        lines.append(compare.to_markdown(table, verdicts.claims))
    return "\n".join(lines) + "\n", all_hold


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, help="write the report here (default: print it)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder", file=sys.stderr)
        return 2
    text, all_hold = build_report(args.folder, args.out.parent if args.out else Path.cwd())
    if args.out:
        record.atomic_write_bytes(args.out, text.encode())
        print(f"report: {args.out} ({'every claim holds' if all_hold else 'SOME CLAIMS FAIL'})")
    else:
        sys.stdout.write(text)
    return 0 if all_hold else 1


if __name__ == "__main__":
    sys.exit(main())
