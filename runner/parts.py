"""Config -> the plain Python parts of a run (no Hydra here: usable from a notebook).

Order matters for reproducibility: the global RNG is seeded, then the model is built (its
initial parameters depend on `seed` and the model choice alone), then the data set is drawn from
its own generators. Loss and strategy are built afterwards and draw nothing.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from runner.data import Dataset, TaskSpec
from runner.losses import build_loss
from runner.models import build_model
from runner.schema import Config, ConfigError
from runner.strategies import Strategy, StrategyMismatch, build_strategy


@dataclass
class Parts:
    config: Config
    model: torch.nn.Module
    spec: TaskSpec
    loss_fn: Any
    strategy: Strategy
    optimizers: List[torch.optim.Optimizer]
    dataset: Dataset
    device: torch.device
    dtype: torch.dtype
    loss_kwargs: Optional[dict] = None  # a custom loss's extra arguments, kept for checkpoints


def _value(x):
    return getattr(x, "value", x)  # enums from structured configs -> their string


def resolve_device(name: str) -> torch.device:
    name = _value(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available: expected auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for torch
        pass
    torch.manual_seed(seed)


def set_determinism(on: bool, device: torch.device) -> None:
    if on and device.type == "cuda":
        # cuBLAS needs a fixed workspace for deterministic results (PyTorch's reproducibility notes).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != on:  # the call is not free: skip no-ops
        torch.use_deterministic_algorithms(on)


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    name = _value(cfg.name)
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ConfigError(f"optim={name} is unknown: expected one of ['adam', 'sgd']")


def _build_model_loss_strategy(cfg: Config, loss_kwargs: Optional[dict]):
    try:
        model, spec = build_model(cfg.model)
        loss_fn = build_loss(cfg.loss, loss_kwargs, spec, cfg.model.name)
        strategy = build_strategy(cfg.backward)
        strategy.check(model, loss_fn, cfg)
    except (ValueError, StrategyMismatch) as exc:
        raise ConfigError(str(exc)) from None
    return model, spec, loss_fn, strategy


def preflight(cfg: Config, loss_kwargs: Optional[dict] = None) -> None:
    """Every check that needs no data, leaving no trace (the RNG state is restored).

    The CLI runs it before Hydra writes anything, so bad input costs no output folder.
    """
    resolve_device(cfg.trainer.device)
    with torch.random.fork_rng(devices=[]):
        _build_model_loss_strategy(cfg, loss_kwargs)
    build_optimizer(cfg.optim, [torch.nn.Parameter(torch.zeros(1))])


def build_parts(cfg: Config, loss_kwargs: Optional[dict] = None) -> Parts:
    device = resolve_device(cfg.trainer.device)
    dtype = getattr(torch, _value(cfg.trainer.dtype))
    set_determinism(cfg.trainer.deterministic, device)
    seed_everything(cfg.seed)
    model, spec, loss_fn, strategy = _build_model_loss_strategy(cfg, loss_kwargs)
    model = model.to(device=device, dtype=dtype)
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn = loss_fn.to(device=device, dtype=dtype)
    extra_loss_params = list(loss_fn.parameters()) if isinstance(loss_fn, torch.nn.Module) else []
    groups = strategy.param_groups(model)
    if extra_loss_params:  # learnable loss weights (e.g. uncertainty weighting) train with the model
        groups[-1] = groups[-1] + extra_loss_params
    optimizers = [build_optimizer(cfg.optim, group) for group in groups]
    dataset = Dataset(spec, cfg.seed, cfg.data.train_size, cfg.data.eval_size, cfg.data.batch_size,
                      cfg.data.positive_rate, cfg.data.noise).to(device, dtype)
    return Parts(cfg, model, spec, loss_fn, strategy, optimizers, dataset, device, dtype, loss_kwargs)
