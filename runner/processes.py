"""Processes: one training over trainer.processes ranks with DistributedDataParallel.

    torchrun --nproc-per-node=2 -m runner backward=accumulate backward.accumulation=4
    python -m runner trainer.processes=2 backward=accumulate ...   (the same, launched for you)

`trainer.processes=N` from a plain command launches `python -m runner` with the same overrides as
N ranks through torch.distributed.run's own API (what torchrun runs), into this run's folder, and
reads back what rank 0 recorded. Every rank builds the same seeded data and takes its share of
each batch (`shard`: tensor_split, so shares may be uneven); DDP averages gradients over ranks,
so a rank's loss is weighted by world size x its exact share of the batch (DESIGN, Numerics).
Rank 0 writes the records; the other ranks run in throwaway folders. gloo on CPU, nccl on CUDA.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from runner.losses import TokenLoss, offers
from runner.record import TOKENS_COLUMN

# Per-step columns that count over the batch: the ranks' counts add up.
ADDITIVE_COLUMNS = (TOKENS_COLUMN,)


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


# ---- the ranks' side -------------------------------------------------------------------------

@dataclass
class Ranks:
    """This process's place among the ranks, its DDP wrapper, and the all-reduce rounds counted
    by a DDP communication hook (not assumed from the strategy)."""

    rank: int
    world: int
    ddp: torch.nn.parallel.DistributedDataParallel
    rounds: List[int] = field(default_factory=lambda: [0])  # all-reduce rounds (a list: the hook's state)

    def shard(self, inputs, targets, loss_fn):
        """This rank's share of the batch (tensor_split, uneven allowed) and its exact share of
        the batch's loss: of its tokens for a token loss, of its rows for a mean, 1 for a sum."""
        from runner.data import micro_batches
        from runner.strategies import Scale, exact_share

        mine = micro_batches(inputs, targets, self.world, Scale.size)[self.rank]
        batch_tokens = loss_fn.count_tokens(targets) if offers(loss_fn, TokenLoss) else None
        return mine.inputs, mine.targets, exact_share(loss_fn, mine.targets, batch_tokens, mine.share)

    def gather(self, result, share: float):
        """The batch's loss, parts and counts from every rank's share of them (one all-reduce)."""
        import torch.distributed as dist

        counts = [k for k in result.extras if k in ADDITIVE_COLUMNS]
        names = list(result.parts) + counts
        values = [result.loss * share] + [result.parts[n] * share for n in result.parts] + \
                 [result.extras[k] for k in counts]
        stacked = torch.stack([v.reshape(()).to(result.loss.dtype) for v in values])
        dist.all_reduce(stacked)
        result.loss = stacked[0]
        for i, name in enumerate(names, start=1):
            if name in result.parts:
                result.parts[name] = stacked[i]
            else:
                result.extras[name] = stacked[i]
        return result

    def agree(self, sha256: Optional[str]) -> bool:
        """Do all ranks end with bit-identical parameters?"""
        import torch.distributed as dist

        hashes: List[Optional[str]] = [None] * self.world
        dist.all_gather_object(hashes, sha256)
        return len(set(hashes)) == 1

    def rounds_per_step(self, steps: int) -> Optional[float]:
        return self.rounds[0] / steps if steps > 0 else None


def _counting_allreduce(rounds: List[int], bucket):  # no annotation: DDP checks it literally
    """DDP's own all-reduce hook, counting rounds: one per synchronised backward, however many
    buckets the gradients fill."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if bucket.is_last():
        rounds[0] += 1
    return default_hooks.allreduce_hook(None, bucket)


def join(model: torch.nn.Module, device: torch.device) -> Ranks:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA) and wrap the model."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index if device.index is not None else local_rank()] if device.type == "cuda"
        else None)
    ranks = Ranks(rank, world, ddp)
    ddp.register_comm_hook(ranks.rounds, _counting_allreduce)
    return ranks


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


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
        cause = {r: c for r, c in died.items() if c != -signal.SIGTERM} or died
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
