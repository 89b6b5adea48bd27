"""Checkpoints that resume a run bit for bit.

checkpoint.pt holds the model, the optimizers, a learnable loss's parameters, torch's RNG states,
the step, and how many bytes of metrics.csv were written up to it (a resumed run cuts the CSV
back there and rewrites the rows after it). The data position needs no state: the batch of a step
is a pure function of (seed, step). The run's config is stored as JSON, so loading never
unpickles arbitrary objects: `torch.load(weights_only=True)` accepts it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict

import torch

CHECKPOINT = "checkpoint.pt"
FORMAT = 1
# Config sections that define the training itself: a checkpoint only resumes the same training.
IDENTITY = ("model", "data", "loss", "backward", "optim", "seed")


class CheckpointError(ValueError):
    pass


def identity(config: Dict[str, Any]) -> Dict[str, Any]:
    ident = {key: config.get(key) for key in IDENTITY}
    ident["trainer.dtype"] = (config.get("trainer") or {}).get("dtype")
    return ident


def save(run_dir: Path, parts, step: int, metrics_bytes: int, config: Dict[str, Any],
         elapsed_s: float = 0.0) -> None:
    state = {
        "format": FORMAT,
        "step": step,
        "metrics_bytes": metrics_bytes,
        "elapsed_s": float(elapsed_s),
        "config_json": json.dumps(config, sort_keys=True, default=str),
        "model": parts.model.state_dict(),
        "optimizers": [opt.state_dict() for opt in parts.optimizers],
        "loss": parts.loss_fn.state_dict() if isinstance(parts.loss_fn, torch.nn.Module) else {},
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if parts.device.type == "cuda" else [],
    }
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(run_dir: Path) -> Dict[str, Any]:
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise CheckpointError(f"trainer.resume={run_dir}: no {CHECKPOINT} there "
                              "(runs write one with trainer.checkpoint_every=N)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or not a checkpoint at all
        raise CheckpointError(f"trainer.resume={run_dir}: {CHECKPOINT} is corrupt or unreadable "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"trainer.resume={run_dir}: {CHECKPOINT} is not a backward-lab checkpoint "
                              f"of format {FORMAT}")
    state["config"] = json.loads(state["config_json"])
    return state


def training_id(config: Dict[str, Any]) -> str:
    """A short hash of what defines the training; summary.json records it, so that a checkpoint
    copied into another run's folder is recognised as foreign."""
    text = json.dumps(identity(json.loads(json.dumps(config, default=str))), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_matches(state: Dict[str, Any], config: Dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume a checkpoint into a different training (model, strategy, data, ...), into
    a folder whose run it does not belong to, or past what the folder holds."""
    saved, wanted = identity(state["config"]), identity(json.loads(json.dumps(config, default=str)))
    differences = [key for key in saved if saved[key] != wanted[key]]
    if differences:
        key = differences[0]
        raise CheckpointError(f"trainer.resume={run_dir}: the checkpoint was made with a different {key} "
                              f"({saved[key]!r}, this run has {wanted[key]!r}); resume with the run's own config")
    summary_path = Path(run_dir) / "summary.json"
    previous = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if previous.get("training_id") not in (None, training_id(state["config"])):
        raise CheckpointError(f"trainer.resume={run_dir}: {CHECKPOINT} belongs to another run (its model, "
                              "strategy or config differ from this folder's summary.json)")
    steps, step = (config.get("trainer") or {}).get("steps"), int(state["step"])
    if steps is not None and steps < step:
        raise CheckpointError(f"trainer.steps={steps} is below the checkpoint's step {step}: expected >= {step}")
    if previous.get("status") == "ok" and steps is not None and previous.get("steps_done", 0) >= steps:
        raise CheckpointError(f"trainer.resume={run_dir}: the run already finished its {steps} steps; "
                              "nothing to resume (raise trainer.steps to train it further)")
    metrics = Path(run_dir) / "metrics.csv"
    if (metrics.stat().st_size if metrics.exists() else 0) < state["metrics_bytes"]:
        raise CheckpointError(f"trainer.resume={run_dir}: metrics.csv is shorter than at the checkpoint "
                              f"(step {step}): it was changed after the run; cannot continue it")


def restore(state: Dict[str, Any], parts) -> int:
    """Load the states into the parts; returns the step to continue from."""
    try:
        parts.model.load_state_dict(state["model"])
        for optimizer, saved in zip(parts.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        if isinstance(parts.loss_fn, torch.nn.Module):
            parts.loss_fn.load_state_dict(state["loss"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint does not fit this model or strategy: {str(exc).splitlines()[0]}") from None
    torch.set_rng_state(state["rng_cpu"])
    if parts.device.type == "cuda" and state["rng_cuda"]:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"])


def truncate_metrics(run_dir: Path, metrics_bytes: int) -> None:
    """Drop the rows written after the checkpoint: the resumed run writes them again."""
    path = Path(run_dir) / "metrics.csv"
    if path.exists() and path.stat().st_size > metrics_bytes:
        with open(path, "r+b") as f:
            f.truncate(metrics_bytes)
