"""What defines a training, as data: the config record a run and a checkpoint keep, the keys
that make two runs one training (a checkpoint resumes only its own), and what a run uses (a sweep
runs each distinct training once). Config side: no training code.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields
from typing import Any, Dict, Optional, Tuple

from runner.config.backward_options import (
    OPTIONS,
    PER_MICRO_BATCH_UPDATES,
    PassOptions,
    option_defaults,
)
from runner.config.schema import ARGUMENT_GROUPS, Config, Role, keys_with_roles, plain

# Keys that only several processes read, at their defaults: (group, key, default).
ONE_PROCESS_IGNORES = (("backward", "sync", "last"), ("loss", "rank_normalize", "global"),
                       ("trainer", "parallel", "ddp"))


def config_record(config: Config, loss_kwargs: Dict[str, Any], model_kwargs: Dict[str, Any],
                  optim_kwargs: Dict[str, Any], data_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The config as plain JSON-able data, with a custom loss's and model's arguments and the
    optimizer's own (checkpoints keep it)."""
    return {**json.loads(json.dumps(asdict(config), default=plain)),
            "loss_kwargs": loss_kwargs, "model_kwargs": model_kwargs, "optim_kwargs": optim_kwargs,
            "data_kwargs": data_kwargs or {}}


def lookup(config: Dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for name in dotted.split("."):
        node = node.get(name) if isinstance(node, dict) else None
    return node


def identity(config: Dict[str, Any], roles: Tuple[Role, ...] = (Role.training,)) -> Dict[str, Any]:
    """The keys that define the training (Role.training in runner.config.schema) and a custom loss's,
    model's and the optimizer's arguments: a checkpoint only resumes the same training. With
    Role.extent too: the same run (steps, device, processes), which a sweep need not run twice."""
    plain = json.loads(json.dumps(config, default=str))
    ident = {dotted: lookup(plain, dotted) for dotted in keys_with_roles(*roles)}
    for group in ARGUMENT_GROUPS:
        ident[f"{group}_kwargs"] = plain.get(f"{group}_kwargs") or {}
    return ident


def training_id(config: Dict[str, Any], roles: Tuple[Role, ...] = (Role.training,)) -> str:
    """A short hash of what defines the training; summary.json records it, so that a checkpoint
    copied into another run's folder is recognised as foreign."""
    text = json.dumps(identity(config, roles), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def used_config_id(config: Config, record: Dict[str, Any]) -> str:
    """training_id of what a training uses, extents included: the backward.* options its strategy
    does not read back at their defaults (full at any accumulation is one training, except in
    loader mode, where k is the window's size), and in one process what only several processes
    read (backward.sync, loss.rank_normalize, trainer.parallel), loss.count_group without sequence
    parallelism, and optim.scheduler_every, optim.clip_every and trainer.ema_every where they change
    nothing: no schedule, no clipping or no
    moving average, or a strategy that takes one micro-batch per step (full), and loss.aux_stats
    without micro-batches or an aux term. `record`: config_record's."""
    used = json.loads(json.dumps(record))
    mine = {f.name for f in fields(OPTIONS[config.backward.name])} | {f.name for f in fields(PassOptions)}
    if config.data.micro_batch_size is not None:  # loader mode: k micro-batches are the data's window
        mine.add("accumulation")
    for option, default in option_defaults().items():
        if option not in mine:
            used["backward"][option] = plain(default)
    per_micro_batch = set(PER_MICRO_BATCH_UPDATES.get(config.backward.name, ()))
    if plain(config.optim.scheduler) == "none":
        per_micro_batch.discard("scheduler_every")
    if not config.optim.clip_norm:
        per_micro_batch.discard("clip_every")
    for key in ("scheduler_every", "clip_every"):
        if key not in per_micro_batch:
            used["optim"][key] = "step"
    # loss.aux_stats chooses between the window's and a micro-batch's expert load: one and the same
    # without micro-batches (backward=full) or without a load-balancing term.
    arguments = used.get("loss_kwargs") or {}
    one_micro_batch = "accumulation" not in {f.name for f in fields(OPTIONS[config.backward.name])}  # full
    if "aux_stats" in arguments and (one_micro_batch or not arguments.get("aux_weight")):
        arguments["aux_stats"] = "window"
    if not config.trainer.ema or "ema_every" not in per_micro_batch:  # no average, or one micro-batch a step
        used["trainer"]["ema_every"] = "step"
    if config.trainer.processes == 1:
        for group, key, default in ONE_PROCESS_IGNORES:
            if not (key == "parallel" and "." in used[group][key]):  # your own engine runs in one process too
                used[group][key] = default
    if config.trainer.sequence_parallel == 1:  # every rank's sequences are its own: counted once either way
        used["loss"]["count_group"] = "data"
    # What the records hold depends on these too (a memory figure, first_grad.pt).
    recorded = f"{plain(config.trainer.memory)}-{int(config.trainer.first_grad)}"
    return f"{training_id(used, roles=(Role.training, Role.extent))}-{recorded}"
