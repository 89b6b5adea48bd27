"""Optimizers and learning-rate schedules from the config (no Hydra composition: usable from a notebook).

`optim._target_` names the optimizer class, as lightning-hydra-template's optimizer node does
(`_partial_: true`): hydra.utils.instantiate gives a partial, called with each parameter group.
It receives `optim.lr`, and `optim.momentum`, `optim.weight_decay` and `optim.betas` only where
its signature names them (so optim=sgd's momentum does not break `optim._target_=torch.optim.Adam`),
plus its own arguments given as `+optim.KEY=VALUE`. The runner's keys (name, scheduler,
warmup_steps, scheduler_every, clip_norm, clip_every) never reach it. Without a `_target_` (a
Config built in Python), `optim.name` picks the class from TARGETS.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Dict, List, Optional, Sequence

import torch

from runner.config.schema import (
    Config,
    ConfigError,
    OptimConf,
    first_line,
    instantiate,
    plain,
)

# optim.name -> its class, used only when optim._target_ is unset.
TARGETS = {"sgd": "torch.optim.SGD", "adam": "torch.optim.Adam", "adamw": "torch.optim.AdamW",
           "rmsprop": "torch.optim.RMSprop"}


def optimizer_target(optim: OptimConf) -> str:
    """optim._target_, or the class optim.name stands for."""
    if optim._target_:
        return optim._target_
    if optim.name not in TARGETS:
        raise ConfigError(f"optim={optim.name} is unknown: expected one of {sorted(TARGETS)}, "
                          "or optim._target_=torch.optim.X")
    return TARGETS[optim.name]


def build_optimizers(optim: OptimConf, param_groups: Sequence[Any],
                     kwargs: Optional[Dict[str, Any]] = None) -> List[torch.optim.Optimizer]:
    """One optimizer per parameter group (a strategy's groups: one per chained model), each from
    optim._target_ with the config's optimizer keys and `kwargs` (+optim.KEY=VALUE)."""
    if not optim._partial_:
        raise ConfigError("optim._partial_=false is not allowed: expected true (the runner calls the "
                          "optimizer with each parameter group)")
    target = optimizer_target(optim)
    optional = {"momentum": optim.momentum, "weight_decay": optim.weight_decay, "betas": list(optim.betas)}
    factory = instantiate("optim._target_", target, {"_partial_": True, "lr": optim.lr, **(kwargs or {})},
                          optional=optional)
    keywords = dict(getattr(factory, "keywords", {}))
    if isinstance(keywords.get("betas"), list):  # Hydra hands a list; torch's own default is a tuple
        keywords["betas"] = tuple(keywords["betas"])
        factory = functools.partial(factory, betas=keywords["betas"])
    optimizers = []
    for group in param_groups:
        try:
            optimizer = factory(group)
        except Exception as exc:  # the class's own checks (a bad value, an unknown +optim.KEY)
            raise ConfigError(f"optim._target_={target}: cannot build it with {keywords} "
                              f"({type(exc).__name__}: {first_line(exc)})") from None
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optim._target_={target} built a {type(optimizer).__name__}: "
                              "expected a torch.optim.Optimizer class")
        if needs_closure(optimizer):
            raise ConfigError(f"optim._target_={target} is not allowed: its step(closure) evaluates the loss "
                              "itself, and a strategy calls step() once after its own backward passes: expected "
                              "an optimizer whose step takes no closure (torch.optim.SGD, Adam, AdamW, RMSprop)")
        optimizers.append(optimizer)
    return optimizers


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Does the optimizer's step require a closure (LBFGS's `step(self, closure)`, no default)? Such a
    step re-runs forward and backward on its own, so it cannot follow the strategy's backward passes:
    refused before training, or step 0 would fail as the run's recorded error."""
    try:
        closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    except (TypeError, ValueError):  # no signature to read: let it train
        return False
    return closure is not None and closure.default is inspect.Parameter.empty \
        and closure.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY,
                             inspect.Parameter.KEYWORD_ONLY)


def schedule(name: str, warmup_steps: int, total_steps: int):
    """The LR factor of optimizer step s: a linear warmup from 0 over warmup_steps, then a linear
    or half-cosine decay to 0 at total_steps (transformers' get_linear/cosine_schedule_with_warmup)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def build_schedulers(cfg: Config, optimizers: List[torch.optim.Optimizer]) -> List[Any]:
    name = plain(cfg.optim.scheduler)
    if name == "none":
        return []
    return [torch.optim.lr_scheduler.LambdaLR(opt, schedule(name, cfg.optim.warmup_steps, cfg.trainer.steps))
            for opt in optimizers]
