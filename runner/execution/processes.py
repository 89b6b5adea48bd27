"""Processes: one training over trainer.processes ranks (DDP or FSDP2: runner.execution.parallel).

    torchrun --nproc-per-node=2 -m runner backward=accumulate backward.accumulation=4
    python -m runner trainer.processes=2 backward=accumulate ...   (the same, launched for you)

`trainer.processes=N` from a plain command launches `python -m runner` with the same overrides as
N ranks through torch.distributed.run's own API (what torchrun runs), into this run's folder, and
reads back what rank 0 recorded. Every rank builds the same seeded data and takes its share of
each batch (runner.execution.parallel). Rank 0 writes the records; the other ranks run in throwaway
folders. gloo on CPU, nccl on CUDA.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


# ---- a rank's side (the parallel units themselves are runner.execution.parallel) ------------------------

# Set for the ranks `launch` starts: the launching process speaks for them (they print nothing on stdout).
LAUNCHED = "BACKWARD_LAB_LAUNCHED"


def other_rank() -> bool:
    """A rank other than 0: it trains like rank 0 but records into a throwaway folder."""
    return under_torchrun() and rank_and_world()[0] != 0


def quiet() -> bool:
    """Print nothing on stdout: a rank other than 0, or any rank `launch` started."""
    return under_torchrun() and (rank_and_world()[0] != 0 or os.environ.get(LAUNCHED) == "1")


def other_rank_argv(argv: List[str]) -> Tuple[List[str], Optional[str]]:
    """Ranks other than 0 record into a throwaway folder (rank 0 writes the run's records):
    the command line with hydra.run.dir replaced, and that folder."""
    if not other_rank():
        return argv, None
    folder = tempfile.mkdtemp(prefix=f"backward-lab-rank{rank_and_world()[0]}-")
    return in_folder(argv, Path(folder)), folder


def in_folder(overrides: List[str], run_dir: Path) -> List[str]:
    """The overrides of a run recorded into run_dir, with no .hydra/ of its own there (the
    launching process, or nobody, keeps that record)."""
    kept = [o for o in overrides if not o.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    return kept + [f"hydra.run.dir={quoted(run_dir)}", "hydra.output_subdir=null"]


def remove_folder(folder: Optional[str]) -> None:
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


# ---- the launching side ----------------------------------------------------------------------

@dataclass
class LaunchOutcome:
    ok: bool
    lost: Optional[str] = None  # "rank 1 exited with code -9 (SIGKILL)": a rank died of something else
    failures: Dict[int, Any] = field(default_factory=dict)


def launch(processes: int, overrides: List[str], run_dir: Path) -> LaunchOutcome:
    """`python -m runner OVERRIDES` as `processes` ranks on this machine through torch.distributed.run
    (--standalone: a free port, so parallel sweep jobs do not collide), recording into run_dir."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args([f"--nproc-per-node={processes}", "--standalone", "--max-restarts=0", "--module", "runner",
                       *in_folder(overrides, run_dir)])
    saved_env = dict(os.environ)  # the ranks' environment is set here, and put back afterwards
    os.environ[LAUNCHED] = "1"
    # The cores shared out between the ranks (torch.distributed.run would set 1, with a warning).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    try:
        run(args)
        return LaunchOutcome(True)
    except ChildFailedError as exc:
        failures = exc.failures
        died = {rank: f.exitcode for rank, f in sorted(failures.items()) if f.exitcode not in (0, 1)}
        # Once a rank dies, torch.distributed.run stops the others with SIGTERM: name the cause.
        cause = {r: c for r, c in died.items() if c != -signal.SIGTERM}
        # Stopped by torch.distributed.run after another rank exited 1 (a run it recorded as
        # failed): not lost, the recorded outcome stands. Otherwise a SIGTERM is the cause.
        recorded_failure = any(f.exitcode == 1 for f in failures.values())
        cause = cause or ({} if recorded_failure else died)
        lost = "; ".join(f"rank {rank} exited with code {code}{_signal_name(code)}" for rank, code in cause.items())
        return LaunchOutcome(False, lost or None, failures)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)


def quoted(path: Path) -> str:
    """A path as a Hydra override value: a sweep job's folder name holds '=' and ','."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _signal_name(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f" ({signal.Signals(-exitcode).name})"
        except ValueError:
            return ""
    return ""
