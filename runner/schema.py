"""Structured configs: the types and defaults of every config key.

Registered in Hydra's ConfigStore as `base_config`, the first entry of conf/config.yaml's defaults
list, so each group option (conf/model/*.yaml, ...) merges into a typed node: a wrong type or an
unknown enum value fails during composition with Hydra's message naming the key. Range checks
that types cannot express live in `validate()`, which runs before anything is written.

The dataclasses are plain Python: a notebook can build `Config(...)` and call
`runner.parts.build_parts` without Hydra.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Dict, List, Optional


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    float32 = "float32"
    float64 = "float64"


class Reduction(str, Enum):
    none = "none"
    mean = "mean"
    sum = "sum"


class Scale(str, Enum):
    size = "size"  # weight each micro-batch by its share of the batch: exact for mean losses
    mean = "mean"  # divide by the number of micro-batches, as common frameworks do


class MemoryMeter(str, Enum):
    first = "first"  # measure the first optimizer step only (shapes do not change)
    every = "every"
    off = "off"


@dataclass
class ModelConf:
    name: str = "mlp"
    hidden: int = 64
    outputs: int = 5
    batchnorm: bool = False
    # Initialise the output bias to -log((1-prior)/prior), as RetinaNet does for rare positives.
    prior_bias: bool = False
    prior: float = 0.01
    depth: int = 2  # layers in a shared trunk (multi-task models)


@dataclass
class DataConf:
    name: str = "default"
    batch_size: int = 32  # the effective batch of one optimizer step
    train_size: int = 4096
    eval_size: int = 1024
    positive_rate: float = 0.5  # share of positive labels the hidden teacher produces
    noise: float = 0.0  # label noise: share of flipped binary labels


@dataclass
class LossConf:
    name: str = "bce"
    reduction: Reduction = Reduction.mean
    alpha: float = 0.25  # focal: weight of positives; < 0 turns the alpha weighting off
    gamma: float = 2.0  # focal: focusing parameter, >= 0
    weights: Dict[str, float] = field(default_factory=dict)  # multitask: weight per task
    weighting: str = "fixed"  # multitask: fixed | uncertainty
    _target_: Optional[str] = None  # custom: import path of an nn.Module loss class


@dataclass
class BackwardConf:
    name: str = "full"
    accumulation: int = 1  # micro-batches per optimizer step
    scale: Scale = Scale.size
    step_per_task: bool = False  # separate: step the optimizer after each task's backward
    reforward: bool = False  # separate: run the forward again after each step
    joint: bool = False  # chained: the stage-2 optimizer owns both stages' parameters


@dataclass
class OptimConf:
    name: str = "sgd"
    lr: float = 0.5
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class TrainerConf:
    steps: int = 100
    device: Device = Device.auto
    dtype: DType = DType.float32
    deterministic: bool = False
    # Rows are buffered on the device and written every log_every steps (0 = 1 on CPU, 50 on CUDA)
    # so that logging never forces a host-device sync per step on a GPU.
    log_every: int = 0
    memory: MemoryMeter = MemoryMeter.first
    progress: bool = True  # a rich progress bar when stdout is a terminal
    eval: bool = True
    threads: int = 0  # torch intra-op threads; 0 = torch's default (set 1 for parallel sweep jobs)
    checkpoint_every: int = 0
    resume: Optional[str] = None


@dataclass
class Config:
    model: ModelConf = field(default_factory=ModelConf)
    data: DataConf = field(default_factory=DataConf)
    loss: LossConf = field(default_factory=LossConf)
    backward: BackwardConf = field(default_factory=BackwardConf)
    optim: OptimConf = field(default_factory=OptimConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    seed: int = 0
    # Declared expectations of a sweep (see runner.compare); ignored by single runs.
    claims: List[Any] = field(default_factory=list)


class ConfigError(ValueError):
    """Bad input: the message names the key and what is allowed."""


def loss_kwargs(loss_conf: Any) -> dict:
    """Extra keys of a custom loss (`+loss.KEY=VALUE`), i.e. everything LossConf does not declare."""
    declared = {f.name for f in fields(LossConf)}
    return {k: v for k, v in dict(loss_conf).items() if k not in declared}


def validate(cfg: Config) -> None:
    """Range checks Hydra's types cannot make. Raises ConfigError naming the key."""
    checks = [
        (cfg.trainer.steps >= 1, "trainer.steps", cfg.trainer.steps, "an integer >= 1"),
        (cfg.data.batch_size >= 1, "data.batch_size", cfg.data.batch_size, "an integer >= 1"),
        (cfg.backward.accumulation >= 1, "backward.accumulation", cfg.backward.accumulation,
         "an integer >= 1"),
        (cfg.loss.alpha <= 1, "loss.alpha", cfg.loss.alpha, "<= 1 (or < 0 to disable)"),
        (cfg.loss.gamma >= 0, "loss.gamma", cfg.loss.gamma, ">= 0"),
        (cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "> 0"),
        (cfg.data.train_size >= cfg.data.batch_size, "data.train_size", cfg.data.train_size,
         f">= data.batch_size ({cfg.data.batch_size})"),
        (cfg.data.eval_size >= 0, "data.eval_size", cfg.data.eval_size, ">= 0"),
        (0 < cfg.data.positive_rate < 1, "data.positive_rate", cfg.data.positive_rate,
         "strictly between 0 and 1"),
        (0 <= cfg.data.noise < 0.5, "data.noise", cfg.data.noise, "in [0, 0.5)"),
        (0 < cfg.model.prior < 1, "model.prior", cfg.model.prior, "strictly between 0 and 1"),
        (cfg.model.hidden >= 1, "model.hidden", cfg.model.hidden, "an integer >= 1"),
        (cfg.model.outputs >= 1, "model.outputs", cfg.model.outputs, "an integer >= 1"),
        (cfg.trainer.threads >= 0, "trainer.threads", cfg.trainer.threads, ">= 0 (0 = torch's default)"),
        (cfg.trainer.log_every >= 0, "trainer.log_every", cfg.trainer.log_every, ">= 0"),
        (cfg.trainer.checkpoint_every >= 0, "trainer.checkpoint_every",
         cfg.trainer.checkpoint_every, ">= 0 (0 = no checkpoints)"),
    ]
    for ok, key, value, allowed in checks:
        if not ok:
            raise ConfigError(f"{key}={value} is not allowed: expected {allowed}")
    if cfg.loss.reduction == Reduction.none:
        raise ConfigError("loss.reduction=none is not allowed for training: expected mean or sum")


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)
