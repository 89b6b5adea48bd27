"""A markdown report of a folder of sweeps: every table and claim verdict, with the machine.

    python -m runner.report outputs/experiments/<time> [--out report.md]

`make experiments` runs every ready-made experiment into one folder and writes this report.
Exit 1 when a claim fails or a run failed unexpectedly.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path
from typing import List, Optional

from runner import claims as claim_checks, compare, record


def sweep_dirs(base: Path) -> List[Path]:
    """Folders holding a sweep (multirun.yaml), in name order; `base` itself if it is one."""
    if (base / "multirun.yaml").exists():
        return [base]
    return sorted(p.parent for p in base.rglob("multirun.yaml"))


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, {device}; Python {platform.python_version()}, torch {torch.__version__}")


def build_report(base: Path) -> tuple[str, bool]:
    lines = ["# backward-lab experiments", "",
             f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on {machine()}", "",
             "Verdicts compare final parameters with the reference run: identical (same bytes), "
             "equivalent (within the dtype's tolerance, named in each claim), differs, error.", ""]
    all_hold = True
    for sweep in sweep_dirs(base):
        runs = compare.find_runs([sweep])
        if not runs:
            continue
        claims = claim_checks.claims_of(runs)
        results = claim_checks.evaluate_claims(claims, runs)
        failed = claim_checks.unexpected_failures(runs, claims)
        all_hold = all_hold and all(r.holds for r in results) and not failed
        held = sum(r.holds for r in results)
        lines += [f"## {sweep.name}", "", f"{len(runs)} runs; {held}/{len(results)} claims hold"
                  + (f"; {len(failed)} unexpected failures" if failed else "") + ".", ""]
        table = compare.build_table(runs, compare.pick_reference(runs))
        lines.append(compare.to_markdown(table, results))
    return "\n".join(lines) + "\n", all_hold


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, help="write the report here (default: print it)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder", file=sys.stderr)
        return 2
    text, all_hold = build_report(args.folder)
    if args.out:
        record.atomic_write_bytes(args.out, text.encode())
        print(f"report: {args.out} ({'every claim holds' if all_hold else 'SOME CLAIMS FAIL'})")
    else:
        sys.stdout.write(text)
    return 0 if all_hold else 1


if __name__ == "__main__":
    sys.exit(main())
