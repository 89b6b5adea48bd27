"""Checkpoints that resume a run bit for bit.

checkpoint.pt holds the model, the optimizers and their LR schedulers, a learnable loss's
parameters, the weights' moving average (trainer.ema), torch's RNG states, the step, and how many
bytes of metrics.csv were written up to it (a resumed run cuts the CSV back there and rewrites the
rows after it). `Checkpoints` writes one every trainer.checkpoint_every steps, hearing the loop's rows
(runner.recording.events): at a checkpoint step the loop flushes, so the rows end there. The data position needs
no state: the batch (or loader mode's window) of a step is a pure function of (seed, step). The
run's config is stored as JSON, so loading never unpickles arbitrary objects:
`torch.load(weights_only=True)` accepts it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import torch

from runner.config.identity import identity, training_id
from runner.config.schema import ConfigError
from runner.recording import record
from runner.recording.events import Row, Subscriber
from runner.recording.steplog import diverges

# 2: a model's, loss's or data source's own arguments (model.hidden, loss.gamma, data.path) are recorded apart
# from the group's keys, as GROUP_kwargs; format 1 held every key of those groups in one node.
FORMAT = 2
CHECKPOINT = record.CHECKPOINT


class CheckpointError(ConfigError):
    """A checkpoint that cannot continue this run: bad input, reported like any other."""


def due(step: int, every: int, steps: int) -> bool:
    """Is a checkpoint written after `step` (trainer.checkpoint_every; none after the last step: the run is done)?"""
    return bool(every) and step % every == 0 and step < steps


class Checkpoints(Subscriber):
    """checkpoint.pt at each checkpoint step the rows reach, never of a step that diverged. Subscribed after
    metrics.csv, so the file's size is where the checkpoint's rows end."""

    def __init__(self, training, run_dir: Path):
        self.training, self.run_dir = training, Path(run_dir)
        self.every, self.steps = training.config.trainer.checkpoint_every, training.config.trainer.steps

    def rows(self, rows: List[Row]) -> None:
        last = rows[-1]
        done = int(last[record.BASE_COLUMNS[0]])
        if due(done, self.every, self.steps) and not diverges(last):
            # time_s: the training time up to the step, from which a resumed run's clock goes on
            save(self.run_dir, self.training, done, record.metrics_size(self.run_dir), last[record.BASE_COLUMNS[-1]])


def save(run_dir: Path, training, step: int, metrics_bytes: int, elapsed_s: float = 0.0) -> None:
    state = {
        "format": FORMAT,
        "step": step,
        "metrics_bytes": metrics_bytes,
        "elapsed_s": float(elapsed_s),
        "config_json": json.dumps(training.config_record(), sort_keys=True, default=str),
        "model": training.model.state_dict(),
        "optimizers": training.engine.optimizer_states(training.optimizers),
        "schedulers": [scheduler.state_dict() for scheduler in training.schedulers],
        "loss": training.loss_fn.state_dict() if isinstance(training.loss_fn, torch.nn.Module) else {},
        "ema": training.ema.state_dict() if training.ema is not None else {},
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if training.device.type == "cuda" else [],
    }
    record.write_checkpoint(run_dir, state)


def load(run_dir: Path) -> Dict[str, Any]:
    path = record.checkpoint_path(run_dir)
    if not path.exists():
        raise CheckpointError(f"trainer.resume={run_dir}: no {CHECKPOINT} there "
                              "(runs write one with trainer.checkpoint_every=N)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or not a checkpoint at all
        raise CheckpointError(f"trainer.resume={run_dir}: {CHECKPOINT} is corrupt or unreadable "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    if isinstance(state, dict) and state.get("format") == 1:
        raise CheckpointError(f"trainer.resume={run_dir}: {CHECKPOINT} was written by an earlier backward-lab "
                              "(checkpoint format 1, before the models', losses' and data sources' keys moved to their "
                              "classes): resume it with that version, or train the run again")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"trainer.resume={run_dir}: {CHECKPOINT} is not a backward-lab checkpoint "
                              f"of format {FORMAT}")
    state["config"] = json.loads(state["config_json"])
    return state


def check_matches(state: Dict[str, Any], config: Dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume a checkpoint into a different training (model, strategy, data, ...), into
    a folder whose run it does not belong to, or past what the folder holds."""
    saved, wanted = identity(state["config"]), identity(config)
    differences = [key for key in saved if saved[key] != wanted[key]]
    if differences:
        key = differences[0]
        raise CheckpointError(f"trainer.resume={run_dir}: the checkpoint was made with a different {key} "
                              f"({saved[key]!r}, this run has {wanted[key]!r}); resume with the run's own config")
    previous = record.read_summary(run_dir) if record.has_summary(run_dir) else record.Summary()
    if previous.training_id not in (None, training_id(state["config"])):
        raise CheckpointError(f"trainer.resume={run_dir}: {CHECKPOINT} belongs to another run (its model, "
                              f"strategy or config differ from this folder's {record.SUMMARY})")
    steps, step = (config.get("trainer") or {}).get("steps"), int(state["step"])
    if steps is not None and steps < step:
        raise CheckpointError(f"trainer.steps={steps} is below the checkpoint's step {step}: expected >= {step}")
    if previous.status == "ok" and steps is not None and previous.steps_done >= steps:
        raise CheckpointError(f"trainer.resume={run_dir}: the run already finished its {steps} steps; "
                              "nothing to resume (raise trainer.steps to train it further)")
    if record.metrics_size(run_dir) < state["metrics_bytes"]:
        raise CheckpointError(f"trainer.resume={run_dir}: {record.METRICS} is shorter than at the checkpoint "
                              f"(step {step}): it was changed after the run; cannot continue it")


def restore(state: Dict[str, Any], training) -> int:
    """Load the states into the training; returns the step to continue from."""
    try:
        training.model.load_state_dict(state["model"])
        training.engine.load_optimizer_states(training.optimizers, state["optimizers"])
        for scheduler, saved in zip(training.schedulers, state.get("schedulers", []), strict=True):
            scheduler.load_state_dict(saved)
        if isinstance(training.loss_fn, torch.nn.Module):
            training.loss_fn.load_state_dict(state["loss"])
        if training.ema is not None:
            training.ema.load_state_dict(state["ema"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint does not fit this model or strategy: {str(exc).splitlines()[0]}") from None
    torch.set_rng_state(state["rng_cpu"])
    if training.device.type == "cuda" and state["rng_cuda"]:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"])
