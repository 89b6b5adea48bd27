"""`make gpu-check`: on a CUDA machine, the GPU-relevant tests and experiments on cuda in one
command, with a markdown report of their figures (gpu_check.md).

A session lent a GPU has about 15 minutes in all, start-up included, and one command may run 10:
so every step has a timeout and the whole check a budget (420 s), and what does not fit is skipped
and said so rather than run over. The report is a pure function of the collected results
(`report`), so that it is tested on a CPU with fake results.
"""
from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
TESTS = "gpu or cuda or precision or processes or fsdp or memory"
TEST_WORKERS = "4"  # the lent machine has 16 cores; the selected tests mostly wait on subprocesses
FIGURES = ("status", "final_loss", "max_abs_diff", "verdict", "peak_saved_bytes", "time_per_step_s",
           "cuda_max_memory_allocated", "allreduce_calls_per_step")
SUMMARY_FIGURES = ("cuda_max_memory_allocated", "allreduce_calls_per_step")  # in summary.json, not the CSV
MIN_SLOT_S = 20  # with less left, a sweep would not get past CUDA and Hydra start-up


@dataclass
class Step:
    """One command's outcome. rc None: it did not run, or ran out of time (the note says which)."""
    name: str
    rc: Optional[int] = None
    wall_s: float = 0.0
    note: str = ""
    required: bool = True  # False: a missing experiment, noted but not a failure
    line: str = ""  # pytest's summary line
    rows: List[Dict[str, Any]] = field(default_factory=list)  # an experiment's figures, a dict per job
    claims: List[str] = field(default_factory=list)  # the sweep's claim verdict lines


def run_logged(cmd: List[str], log: Path, timeout: float, cwd: Optional[Path] = None) -> tuple:
    """Run `cmd` with its output in `log`; (exit code or None on timeout, seconds, output).
    A new session, killed whole on timeout: xdist workers and torchrun ranks go with their parent."""
    start = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # a killed sweep's log keeps what it printed
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.monotonic() - start, log.read_text(errors="replace")


def run_tests(out: Path, timeout: float) -> Step:
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", TEST_WORKERS, "-k", TESTS, "tests"]
    rc, wall, text = run_logged(cmd, out / "pytest.log", timeout, cwd=ROOT)
    lines = [line.strip(" =") for line in text.splitlines() if line.strip(" =")]
    summary = next((line for line in reversed(lines) if " in " in line and ("passed" in line or "failed" in line
                    or "error" in line or "no tests ran" in line)), lines[-1] if lines else "")
    return Step("pytest", rc, wall, "" if rc is not None else f"timed out after {timeout:.0f} s", line=summary)


def read_rows(sweep_dir: Path) -> List[Dict[str, Any]]:
    """comparison.csv reduced to the jobs' names and a few figure columns; the CUDA memory and
    all-reduce counts come from each job's summary, which the comparison does not carry."""
    import pandas as pd

    from runner.recording import record
    path = sweep_dir / record.COMPARISON
    if not path.is_file():
        return []
    table = pd.read_csv(path)
    # A sweep cut short has rows naming the job; a finished one starts with the keys that vary.
    keys = ["job"] if "job" in table else list(table.columns[:list(table.columns).index("status")])
    for key in SUMMARY_FIGURES:
        if key not in table and "run_dir" in table:
            table[key] = [getattr(record.read_summary(Path(d)), key, None) if record.has_summary(Path(d)) else None
                          for d in table["run_dir"]]
    columns = keys + [c for c in FIGURES if c in table and table[c].notna().any()]
    return table[columns].astype(object).where(table[columns].notna(), None).to_dict("records")


# Sweeps that start two ranks: nccl needs a GPU per rank, so on one GPU they run on the CPU (gloo).
TWO_RANK_EXPERIMENTS = ("ddp", "fsdp", "ranks_tokens")


def device_for(name: str, gpus: int) -> str:
    return "cuda" if name not in TWO_RANK_EXPERIMENTS or gpus >= 2 else "cpu"


def run_experiment(name: str, out: Path, timeout: float, device: str = "cuda") -> Step:
    if not resources.files("runner.experiments").joinpath(f"{name}.yaml").is_file():
        return Step(name, note=f"no experiments/{name}.yaml here: skipped", required=False)
    cmd = [sys.executable, "-m", "runner", "-m", f"experiment={name}", f"trainer.device={device}",
           f"hydra.sweep.dir={out / name}"]
    rc, wall, text = run_logged(cmd, out / f"{name}.log", timeout)
    claims = [line.strip() for line in text.splitlines()
              if line.strip().startswith(("holds", "FAILS")) or "claim" in line.lower()]
    note = "" if rc is not None else f"timed out after {timeout:.0f} s"
    if device != "cuda":
        note = (note + "; " if note else "") + "two ranks on one GPU: ran on the CPU (gloo)"
    return Step(name, rc, wall, note, rows=read_rows(out / name), claims=claims)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)  # byte counts and exit codes that pandas read as floats beside empty cells
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: List[Dict[str, Any]]) -> List[str]:
    columns = list(rows[0])
    return ([f"| {' | '.join(columns)} |", f"| {' | '.join('---' for _ in columns)} |"]
            + [f"| {' | '.join(_cell(row.get(c)) for c in columns)} |" for row in rows])


def passed(tests: Step, experiments: List[Step]) -> bool:
    return tests.rc == 0 and all(s.rc == 0 for s in experiments if s.required)


def report(facts: Dict[str, str], tests: Step, experiments: List[Step]) -> str:
    """The markdown report: the machine, the tests' summary line, a row per experiment, then each
    experiment's figures and claim verdicts."""
    lines = [f"# GPU check, {facts['date']}", "",
             f"- device: {facts['device']} (torch {facts['torch']}, CUDA {facts['cuda']})",
             f"- tests (`pytest -k \"{TESTS}\"`): {tests.line or 'no summary line'} "
             f"(exit {tests.rc}, {tests.wall_s:.0f} s{'; ' + tests.note if tests.note else ''})",
             f"- result: {'everything' if passed(tests, experiments) else 'NOT everything'} ran and passed",
             "", "| experiment | exit | wall s | jobs | note |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {s.name} | {_cell(s.rc)} | {s.wall_s:.0f} | {len(s.rows)} | {_cell(s.note)} |" for s in experiments]
    for s in experiments:
        if s.rows or s.claims:
            lines += ["", f"## {s.name}", ""] + (markdown_table(s.rows) if s.rows else [])
            lines += ([""] + [f"- {claim}" for claim in s.claims]) if s.claims else []
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="report folder (default outputs/gpu-check/<time>)")
    parser.add_argument("--experiments", default="precision,ddp,fsdp,memory", help="comma-separated names")
    parser.add_argument("--timeout", type=float, default=150, help="seconds per step (default 150)")
    parser.add_argument("--budget", type=float, default=420, help="seconds for the whole check (default 420)")
    args = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        build = "cpu build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build, no device visible"
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}, {build}): nothing to check")
        return 0
    deadline = time.monotonic() + args.budget
    now = datetime.datetime.now(datetime.timezone.utc)
    out = (args.out or Path("outputs", "gpu-check", now.strftime("%Y-%m-%d_%H-%M-%S"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tests = run_tests(out, min(args.timeout, deadline - time.monotonic()))
    print(f"gpu-check: pytest: {tests.line} (exit {tests.rc})", flush=True)
    experiments = []
    for name in filter(None, args.experiments.split(",")):
        left = deadline - time.monotonic()
        device = device_for(name, torch.cuda.device_count())
        step = (run_experiment(name, out, min(args.timeout, left), device) if left >= MIN_SLOT_S else
                Step(name, note=f"skipped: {max(left, 0):.0f} s left of the {args.budget:.0f} s budget"))
        print(f"gpu-check: {name}: exit {step.rc}, {step.wall_s:.0f} s {step.note}".rstrip(), flush=True)
        experiments.append(step)
    facts = {"date": now.strftime("%Y-%m-%d %H:%M UTC"), "device": torch.cuda.get_device_name(),
             "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    path = out / "gpu_check.md"
    path.write_text(report(facts, tests, experiments))
    print(f"gpu-check: report {path}")
    return 0 if passed(tests, experiments) else 1


if __name__ == "__main__":
    sys.exit(main())
