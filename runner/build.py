"""Config -> the plain Python objects of one training (no Hydra here: usable from a notebook).

`build_training(cfg)` builds the model, data, loss, strategy and optimizers, checks that they fit,
and probes the loss on the first batch (runner.checks), once. Order matters for reproducibility:
the global RNG is seeded, then the model is built (its initial parameters depend on `seed` and
the model choice alone), then the data set is drawn from its own generators. Loss and strategy
are built afterwards and draw nothing; the probe leaves no trace.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch

from runner import checks
from runner.data import Dataset, TaskSpec
from runner.losses import build_loss, per_stage
from runner.models import build_model
from runner.schema import Config, ConfigError, instantiate, plain
from runner.strategies import Strategy, StrategyMismatch, build_strategy


@dataclass
class Training:
    """Everything one training run needs, built from its config."""

    config: Config
    model: torch.nn.Module
    spec: TaskSpec
    loss_fn: Any
    strategy: Strategy
    optimizers: List[torch.optim.Optimizer]
    dataset: Dataset
    device: torch.device
    dtype: torch.dtype
    loss_kwargs: Dict[str, Any] = field(default_factory=dict)  # a custom loss's arguments
    # What the loss probe found: parameters the loss never reaches, or why it cannot train at all.
    params_without_grad: List[str] = field(default_factory=list)
    not_differentiable: Optional[str] = None

    def config_record(self) -> Dict[str, Any]:
        """The config as plain JSON-able data, with a custom loss's arguments (checkpoints keep it)."""
        return {**json.loads(json.dumps(asdict(self.config), default=plain)), "loss_kwargs": self.loss_kwargs}


def resolve_device(name: str) -> torch.device:
    name = plain(name)
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
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ConfigError(f"optim={cfg.name} is unknown: expected one of ['adam', 'sgd']")


def loss_label(cfg: Config) -> str:
    """How messages name the loss: its `_target_` for the user's own."""
    return f"loss._target_={cfg.loss._target_}" if cfg.loss.name == "custom" else f"loss={cfg.loss.name}"


def build_loss_fn(cfg: Config, loss_kwargs: Dict[str, Any], spec: TaskSpec):
    if cfg.loss.name == "custom":
        loss = instantiate("loss._target_", cfg.loss._target_, loss_kwargs)
        if not callable(loss):
            raise ConfigError(f"loss._target_={cfg.loss._target_} built a {type(loss).__name__}, "
                              "which cannot be called as loss(outputs, targets): expected an nn.Module class")
    else:
        loss = build_loss(cfg.loss, spec, cfg.model.name)
    return per_stage(loss, spec)


def _misfit(strategy: Strategy, cfg: Config, exc: StrategyMismatch) -> str:
    if exc.misfit == "model":
        return f"backward={strategy.name} does not fit model={cfg.model.name}: {exc}"
    if exc.misfit == "loss":
        return f"backward={strategy.name} does not fit loss={cfg.loss.name} on model={cfg.model.name}: {exc}"
    return str(exc)


def build_training(cfg: Config, loss_kwargs: Optional[Dict[str, Any]] = None) -> Training:
    """Build and check one training; ConfigError (bad input) before anything runs."""
    loss_kwargs = dict(loss_kwargs or {})
    device = resolve_device(cfg.trainer.device)
    dtype = getattr(torch, plain(cfg.trainer.dtype))
    set_determinism(cfg.trainer.deterministic, device)
    seed_everything(cfg.seed)
    try:
        model, spec = build_model(cfg.model)
        loss_fn = build_loss_fn(cfg, loss_kwargs, spec)
        strategy = build_strategy(cfg.backward)
        strategy.check(model, loss_fn, cfg.data.batch_size)
    except StrategyMismatch as exc:
        raise ConfigError(_misfit(strategy, cfg, exc)) from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
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
    training = Training(cfg, model, spec, loss_fn, strategy, optimizers, dataset, device, dtype, loss_kwargs)
    probe(training)
    return training


def probe(training: Training) -> None:
    """Probe the loss on the first batch (runner.checks) and keep what it found."""
    inputs, targets = training.dataset.batch(0)
    training.params_without_grad, training.not_differentiable = [], None
    try:
        training.params_without_grad = checks.probe_loss(
            training.model, training.loss_fn, inputs, targets, loss_label(training.config),
            f"model={training.config.model.name}")
    except checks.NotDifferentiable as exc:
        training.not_differentiable = str(exc)
