"""Structured configs: the types, defaults, meanings and roles of every config key.

Registered in Hydra's ConfigStore as `base_config`, the first entry of conf/config.yaml's defaults
list, so each group option (conf/model/*.yaml, ...) merges into a typed node: a wrong type or an
unknown enum value fails during composition with Hydra's message naming the key. Range checks
run in `validate()` before anything is written: a key's own range is declared with the key
(runner.config.keys.Allowed), checks across keys are written out there.

Each key is declared once, with `key()`: its default, what it means, its role (`Role`: resume,
checkpoints and the comparison read the roles instead of keeping their own lists of keys) and
what it allows. The key reference (`python -m runner --help`, docs/reference.md) is generated from
these declarations (runner.config.reference): edit a key's meaning here, nowhere else.

`backward.*` is not declared here: it is `name` plus the options each strategy reads, declared in
runner.config.backward_options, so the config side never imports the training code.

The dataclasses are plain Python: a notebook can build `Config(...)` and call
`runner.training.build.build_training` without Hydra.
"""
from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, make_dataclass
from enum import Enum
from typing import Any, Dict, Iterator, List, Optional, Tuple

from runner.config.backward_options import DDP_STRATEGIES, OPTIONS, PassOptions, readers_of
from runner.config.components import ComponentError, option_arguments, option_target, option_values
from runner.config.keys import (
    Allowed,
    Choice,
    Role,
    above,
    at_least,
    half_open,
    key,
    strictly_between,
)


class Device(Choice):
    auto = "auto", "cuda where torch sees a GPU, else cpu"
    cpu = "cpu", "the CPU"
    cuda = "cuda", "the GPU (refused where torch sees none)"


class DType(Choice):
    float32 = "float32", "float32 parameters, gradients and arithmetic"
    float64 = "float64", "the oracle a float32 run is measured against (within_drift)"
    bfloat16 = "bfloat16", '"pure" bf16: parameters, gradients and arithmetic in bf16'


class Autocast(Choice):
    off = "off", "no autocast"
    bf16 = "bf16", "torch.autocast to bfloat16: float32 parameters and gradients"
    fp16 = "fp16", "torch.autocast to float16, with GradScaler's loss scaling (unscale, step, update once per step)"


class Reduction(Choice):
    none = "none", "refused for training (a loss to train on is one number)"
    mean = "mean", "the mean over examples: micro-batches are weighted by their share of the batch"
    sum = "sum", "the sum over examples: micro-batches add up unweighted"


# `global` is a Python keyword, hence the functional form (OmegaConf matches enum values by member name).
RankNormalize = Choice("RankNormalize", {
    "global": ("global", "the step's scored tokens over every rank, the mean over ranks undone: exact"),
    "local": ("local", "the rank's own tokens (transformers #34242)"),
    "no_world": ("no_world", "the global count, the mean over ranks not undone: 1/world (torchtitan #1842)"),
}, module=__name__)


class CountGroup(Choice):
    data = "data", ("each sequence's tokens counted once, over the data-parallel groups: exact (prime-rl PR #2562, "
                    "verl PR #6049)")
    world = "world", ("each rank's sequences counted over every rank: a sequence-parallel group's ranks hold the same "
                      "sequences, so each is counted sequence_parallel times, and the loss and its gradient are "
                      "1/sequence_parallel of the exact ones (VeOmni PR #338: 8x too small at 8)")


class ParallelEngine(Choice):
    ddp = "ddp", "DistributedDataParallel: the whole model and gradient on every rank"
    fsdp = "fsdp", "FSDP2 fully_shard: 1/world of every parameter, gradient and optimizer state per rank"


class Scheduler(Choice):
    none = "none", "a constant learning rate"
    linear = "linear", "linear warmup, then linear decay to 0 at trainer.steps"
    cosine = "cosine", "linear warmup, then half a cosine down to 0 at trainer.steps"


class Every(Choice):
    step = "step", "once per optimizer step"
    micro_batch = "micro_batch", "once per micro-batch (the accumulation bug)"


class MemoryMeter(Choice):
    first = "first", "measure the first optimizer step only (shapes do not change)"
    every = "every", "measure every step"
    off = "off", "do not measure"


def plain(value: Any) -> Any:
    """An enum member from a structured config -> its plain value (the one helper for it)."""
    return value.value if isinstance(value, Enum) else value


POSITIVE_INT = at_least(1, integer=True)


class GroupKeys:
    """A group's node holds the group's own keys only: setting another (a class's argument, such as
    model.hidden, in a config built in Python) is an AttributeError naming where it goes, never a silent no-op."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in {f.name for f in fields(self)}:
            group = type(self).__name__.removesuffix("Conf").lower()
            raise AttributeError(f"{group}.{name} is not one of the {group} group's own keys: a class's argument goes "
                                 f"to build_training({group}_kwargs={{{name!r}: ...}})")
        object.__setattr__(self, name, value)


@dataclass
class ModelConf(GroupKeys):
    """The network: a built-in model, or your nn.Module (model=custom). Each option's YAML names its class by
    `_target_`; the keys below are the group's own, and each class declares its own beside itself."""

    name: str = key("mlp", "the option model=OPTION chose (set by it)")
    outputs: int = key(5, "output units (labels, classes, or embedding dimensions): what the model predicts",
                       allowed=POSITIVE_INT)
    vocab: int = key(16, "seq, moe, custom on data=seq/text: the vocabulary, tokens 0..vocab-1 (256 for data=text)",
                     allowed=at_least(2, integer=True))
    prior_bias: bool = key(False, "initialise the output bias to -log((1-prior)/prior), as RetinaNet does "
                                  "for rare positives")
    prior: float = key(0.01, "prior_bias: the positive rate the output bias starts at",
                       allowed=strictly_between(0, 1))
    _target_: Optional[str] = key(None, "the model class an option names (model=custom: the import path of your "
                                        "nn.Module class; its constructor's arguments as +model.KEY=VALUE)",
                                  values="package.module.Class")


@dataclass
class DataConf(GroupKeys):
    """The examples and their targets: seeded synthetic data, or your table, tensors or text. Each option's YAML
    names its source class by `_target_`; the keys below are the group's own, and each source declares its own
    beside itself."""

    name: str = key("default", "the option data=OPTION chose (set by it)")
    batch_size: int = key(32, "the effective batch of one optimizer step, whatever the accumulation",
                          allowed=POSITIVE_INT)
    train_size: int = key(4096, "synthetic data: examples to train on", values="an integer >= data.batch_size")
    eval_size: int = key(1024, "synthetic data: held-out examples", allowed=at_least(0))
    micro_batch_size: Optional[int] = key(
        None, "loader mode: micro-batches of this size drawn through a DataLoader, backward.accumulation of them "
              "per optimizer step, in epochs over the training rows; null = batches of data.batch_size",
        values="null, or an integer in 1..data.train_size")
    _target_: Optional[str] = key(None, "the data source class an option names (runner.components.sources)",
                                  values="package.module.Class")


@dataclass
class LossConf(GroupKeys):
    """The objective: a built-in loss, or your own (loss=custom). Each option's YAML names its class by
    `_target_`; the keys below are the group's own, and each class declares its own beside itself."""

    name: str = key("bce", "the option loss=OPTION chose (set by it)")
    reduction: Reduction = key(Reduction.mean, "how the loss reduces over examples (handed to every loss class "
                                               "whose constructor takes it)")
    rank_normalize: RankNormalize = key(RankNormalize["global"], "a token loss (loss=lm) with several processes: "
                                                                 "what each rank's loss is divided by")
    count_group: CountGroup = key(CountGroup.data, "a token loss with trainer.sequence_parallel > 1: the ranks the "
                                                   "token count is summed over")
    _target_: Optional[str] = key(None, "the loss class an option names (loss=custom: the import path of yours, called "
                                        "as loss(outputs, targets); its constructor's arguments as +loss.KEY=VALUE)",
                                  values="package.module.Class")


def _backward_conf() -> type:
    """backward.*: `name`, the union of the options every registered strategy declares (two
    strategies that read one key must declare it alike), and the options of every strategy's
    passes (runner.config.backward_options)."""
    declared: Dict[str, Tuple[str, Any, Any]] = {}
    for name, options in list(OPTIONS.items()) + [("*", PassOptions)]:
        hints = typing.get_type_hints(options)
        for f in fields(options):
            spec = (f.name, hints[f.name], field(default=f.default, metadata=f.metadata))
            known = declared.setdefault(f.name, spec)
            if (known[1], known[2].default, known[2].metadata) != (spec[1], f.default, f.metadata):
                raise TypeError(f"backward.{f.name} is declared differently by backward={name}")
    name = ("name", str, key("full", "the option backward=OPTION chose (set by it)"))
    conf = make_dataclass("BackwardConf", [name] + list(declared.values()))
    conf.__doc__ = ("How backward and the optimizer step are called, and the options each strategy reads. An "
                    "option another strategy reads is ignored with a warning, so that one sweep can cross them.")
    return conf


BackwardConf = _backward_conf()


@dataclass
class OptimConf:
    """The optimizer (any torch.optim class, or yours), its learning-rate schedule and clipping."""

    name: str = key("sgd", "the option optim=OPTION chose; without a _target_ (a Config built in Python) it picks "
                           "the class (sgd, adam, adamw, rmsprop)")
    _target_: Optional[str] = key(
        None, "the optimizer class (torch.optim.AdamW, or yours), built as a partial and called with each parameter "
              "group; it gets optim.lr, and momentum, weight_decay and betas where its signature names them, and "
              "its own arguments as +optim.KEY=VALUE", values="package.module.Class")
    _partial_: bool = key(True, "Hydra builds the class as a partial (the parameters come later)")
    lr: float = key(0.5, "the learning rate (the peak, with a schedule)", allowed=above(0))
    momentum: float = key(0.0, "for optimizers whose signature takes it (SGD, RMSprop)")
    weight_decay: float = key(0.0, "for optimizers whose signature takes it (AdamW decoupled; Adam, SGD as L2)")
    betas: List[float] = key(help="for optimizers whose signature takes it (Adam, AdamW)",
                             default_factory=lambda: [0.9, 0.999])
    scheduler: Scheduler = key(Scheduler.none, "the learning-rate schedule over trainer.steps")
    warmup_steps: int = key(0, "optimizer steps of linear warmup from 0 to optim.lr", allowed=at_least(0))
    scheduler_every: Every = key(Every.step, "sum, accumulate: when the schedule advances")
    clip_norm: float = key(0.0, "clip the gradient's L2 norm to this (0 = off)", allowed=at_least(0, note=" (0 = off)"))
    clip_every: Every = key(Every.step, "accumulate: when the gradient is clipped")


@dataclass
class TrainerConf:
    """How and where training runs, what it keeps and where it logs."""

    steps: int = key(100, "optimizer steps", Role.extent, allowed=POSITIVE_INT)
    device: Device = key(Device.auto, "where it trains", Role.extent)
    dtype: DType = key(DType.float32, "the parameters' and arithmetic's dtype")
    autocast: Autocast = key(Autocast.off, "forward and loss under torch.autocast (parameters and gradients stay "
                                           "in trainer.dtype=float32)")
    init_scale: float = key(2.0 ** 16, "autocast=fp16: GradScaler's first loss scale", allowed=above(0))
    processes: int = key(1, "processes, each training on its share of every batch (gloo on CPU, nccl on CUDA), "
                            "launched through torch.distributed.run; under torchrun, its world size",
                         Role.extent, allowed=POSITIVE_INT)
    sequence_parallel: int = key(1, "ranks that share each sequence, each scoring a contiguous 1/N of its positions "
                                    "(a token loss): trainer.processes / N data-parallel groups; gradients add up "
                                    "within a group and average across groups", allowed=POSITIVE_INT)
    parallel: str = key("ddp", "the engine: how backward and the optimizer step run, and how several processes "
                               "share the model (full, sum and accumulate only)",
                        values=" | ".join(f"{c.value} ({c.meaning})" for c in ParallelEngine)
                        + " | package.module.Class (your engine: a subclass of runner.execution.parallel.Single)")
    deterministic: bool = key(False, "torch.use_deterministic_algorithms(True)")
    ema: float = key(0.0, "the decay of an exponential moving average of the weights (torch.optim.swa_utils."
                          "AveragedModel with get_ema_multi_avg_fn, buffers averaged too); 0 = off. Recorded as "
                          "ema_weights.pt, ema_param_sha256, ema_eval_value; comparisons add ema_max_abs_diff",
                     allowed=half_open(0, 1, note=" (the EMA's decay; 0 = off)"))
    ema_every: Every = key(Every.step, "accumulate: when the average is updated; micro_batch: k times per step, "
                                       "mostly on not-yet-stepped weights (lightly-train #968, F5-TTS #631)")
    log_every: int = key(0, "rows buffered on the device and written every log_every steps (0 = 1 on CPU, 50 on "
                            "CUDA), so that logging never syncs the GPU per step", Role.operational,
                         allowed=at_least(0))
    memory: MemoryMeter = key(MemoryMeter.first, "when peak_saved_bytes is measured", Role.operational)
    progress: bool = key(True, "a rich progress bar when stdout is a terminal", Role.operational)
    eval: bool = key(True, "score the held-out data at the end (eval_metric, eval_value)", Role.extent)
    threads: int = key(0, "torch intra-op threads; 0 = auto: the cores shared out between concurrent training "
                          "processes (joblib sweep workers, ranks on a node), torch's default for one process",
                       Role.operational, allowed=at_least(0, note=" (0 = auto)"))
    checkpoint_every: int = key(0, "write checkpoint.pt every N steps (0 = never)", Role.operational,
                                allowed=at_least(0, note=" (0 = no checkpoints)"))
    resume: Optional[str] = key(None, "a run folder to continue from its checkpoint, in that folder",
                                Role.operational, values="null, or a run folder")
    first_grad: bool = key(True, "write first_grad.pt, the first optimizer step's gradient (false for models too "
                                 "large to keep it twice)", Role.operational)
    rerun: bool = key(False, "a sweep's job whose used configuration equals an earlier job's reuses its records; "
                             "true trains it again", Role.operational)
    loggers: List[str] = key(
        help="what hears each run's events (its start, each step's rows, its end; a sweep's end): csv (metrics.csv, "
             "the record the analysis reads, always kept), tensorboard (a SummaryWriter in the run's tensorboard/ "
             "folder), mlflow (one MLflow run per job, a sweep's jobs nested in its parent run), the last two need "
             "pip install 'backward-lab[trackers]'; or a sink class of your own by its import path (a "
             "runner.recording.events.Subscriber), built with the run's folder and config",
        role=Role.operational, values="a list of csv, tensorboard, mlflow or package.module.Class, with csv among them",
        default_factory=lambda: ["csv"])
    mlflow_uri: Optional[str] = key(None, "loggers with mlflow: the tracking URI (a team's server: http://host:5000); "
                                          "null = a SQLite store, mlflow.db in the folder above the run's folder (a "
                                          "sweep's: above the sweep's), artifacts beside it", Role.operational,
                                    values="null, or a tracking URI")


@dataclass
class LoopConf:
    """The loop under test of a fingerprint (runner.fingerprint): null trains as usual."""

    name: Optional[str] = key(None, "loop=NAME chooses it", Role.operational, values="null, or the option's name")
    _target_: Optional[str] = key(None, "loop=custom: your loop, a function called as train(model, optimizer, loader, "
                                        "loss_fn, *, epochs, accumulation, scheduler=None, clip_norm=0.0)",
                                  Role.operational, values="null, or package.module.function")
    zero_stage: int = key(0, "loop=deepspeed: the ZeRO stage", Role.operational,
                          allowed=Allowed("0, 1 or 2", lambda value: value in (0, 1, 2)))


@dataclass
class Config:
    model: ModelConf = field(default_factory=ModelConf)
    data: DataConf = field(default_factory=DataConf)
    loss: LossConf = field(default_factory=LossConf)
    backward: BackwardConf = field(default_factory=BackwardConf)
    optim: OptimConf = field(default_factory=OptimConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    loop: LoopConf = field(default_factory=LoopConf)
    seed: int = key(0, "model initialisation, data and data order depend on it alone")
    claims: List[Any] = key(help="a sweep's declared expectations (runner.analysis.claims); single runs ignore them",
                            role=Role.operational, default_factory=list)
    about: Optional[str] = key(None, "what an experiment shows, in a sentence or two with its public reference "
                                     "(the report prints it)", Role.operational, values="null, or text")


# Which group a choice (model=cnn) picks for; the option's `name` repeats the choice.
GROUPS = ("model", "data", "loss", "backward", "optim")
# The groups whose class takes arguments beyond the group's own keys (focal's loss.gamma, seq's model.hidden,
# csv's data.path, an optimizer's +optim.alpha): a run records them apart, as GROUP_kwargs.
ARGUMENT_GROUPS = ("loss", "model", "optim", "data")


def keys_with_roles(*roles: Role, node: type = Config, prefix: str = "") -> Iterator[str]:
    """Dotted keys (leaves) whose declared role is one of `roles`."""
    hints = typing.get_type_hints(node)
    for f in fields(node):
        if is_dataclass(hints[f.name]):
            yield from keys_with_roles(*roles, node=hints[f.name], prefix=f"{prefix}{f.name}.")
        elif f.metadata.get("role", Role.training) in roles:
            yield prefix + f.name


def ignored_by_comparison() -> Tuple[str, ...]:
    """Keys that never make two runs different experiments."""
    return tuple(keys_with_roles(Role.operational))


def resume_may_change() -> Tuple[str, ...]:
    """Keys a resumed run may set anew; every other key is the run's own."""
    return tuple(keys_with_roles(Role.extent, Role.operational))


class ConfigError(ValueError):
    """Bad input: the message names the key and what is allowed."""


# Where the built-in components live: an option naming a class there is one of the runner's own.
BUILT_IN = "runner.components."


def own_class(conf: Any) -> bool:
    """Does a model or loss node name a class of your own by `_target_` (model=custom, loss=custom, or an
    option of your own: runner.config.components), rather than one of the runner's (conf/loss/focal.yaml)?"""
    target = getattr(conf, "_target_", None)
    return conf.name == "custom" or (bool(target) and not str(target).startswith(BUILT_IN))


def target_of(group: str, conf: Any) -> Optional[str]:
    """The class a model or loss node names: its `_target_`, or for a config built in Python with only an
    option's name, the class that option's YAML names (runner.config.components.option_target)."""
    return getattr(conf, "_target_", None) or option_target(group, conf.name)


def label_of(group: str, conf: Any) -> str:
    """How messages name the option: loss=focal, or loss._target_=package.module.Class for yours."""
    return f"{group}._target_={conf._target_}" if own_class(conf) else f"{group}={conf.name}"


def arguments_used(group: str, conf: Any, kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """The arguments the option's class takes, and what it ignores (runner.config.components.option_arguments);
    ConfigError for a key no option declares. A config built in Python with the option's name alone takes the
    arguments its YAML sets, as the command line does (data=imbalanced: data.positive_rate=0.01)."""
    if not getattr(conf, "_target_", None):
        own = {f.name for f in fields(type(conf))}
        kwargs = {**{k: v for k, v in option_values(group, conf.name).items() if k not in own and v != "???"},
                  **kwargs}
    try:
        return option_arguments(group, label_of(group, conf), target_of(group, conf), kwargs)
    except ComponentError as exc:
        raise ConfigError(str(exc)) from None


def extra_keys(conf: Any, declared: type) -> dict:
    """Keys given with `+group.KEY=VALUE` that the group's dataclass does not declare: the
    constructor arguments of a custom loss or model."""
    names = {f.name for f in fields(declared)}
    return {k: v for k, v in dict(conf).items() if k not in names}


def set_keys(conf: Any, declared: type, skip: Tuple[str, ...] = ("name", "_target_")) -> dict:
    """Declared keys whose value differs from the dataclass default (what the user set)."""
    return {f.name: getattr(conf, f.name) for f in fields(declared)
            if f.name not in skip and f.default is not MISSING and getattr(conf, f.name) != f.default}


def declared_ranges(node: Any, prefix: str = "") -> Iterator[Tuple[str, Any, Allowed]]:
    """(dotted key, its value, its declared range) for every key of `node` that declares one."""
    for f in fields(node):
        value = getattr(node, f.name)
        if is_dataclass(value):
            yield from declared_ranges(value, f"{prefix}{f.name}.")
        elif f.metadata.get("allowed") is not None:
            yield prefix + f.name, value, f.metadata["allowed"]


def validate(cfg: Config) -> None:
    """Range checks Hydra's types cannot make: each key's own (declared with it), then those across
    keys. Raises ConfigError naming the key."""
    for dotted, value, allowed in declared_ranges(cfg):
        if not allowed.ok(value):
            raise ConfigError(f"{dotted}={value} is not allowed: expected {allowed.text}")
    loader = cfg.data.micro_batch_size is not None
    checks = [
        (loader or cfg.data.train_size >= cfg.data.batch_size, "data.train_size",
         cfg.data.train_size, f">= data.batch_size ({cfg.data.batch_size})"),
        (not loader or cfg.data.micro_batch_size >= 1, "data.micro_batch_size", cfg.data.micro_batch_size,
         "an integer >= 1 (or null for batches of data.batch_size)"),
    ]
    for ok, dotted, value, allowed in checks:
        if not ok:
            raise ConfigError(f"{dotted}={value} is not allowed: expected {allowed}")
    if cfg.loss.reduction == Reduction.none:
        raise ConfigError("loss.reduction=none is not allowed for training: expected mean or sum")
    if plain(cfg.trainer.autocast) != "off" and plain(cfg.trainer.dtype) != "float32":
        raise ConfigError(f"trainer.autocast={plain(cfg.trainer.autocast)} is not allowed with trainer.dtype="
                          f"{plain(cfg.trainer.dtype)}: expected trainer.dtype=float32 (autocast keeps float32 "
                          "parameters; trainer.dtype=bfloat16 is pure bf16)")
    validate_loggers(cfg)
    validate_processes(cfg)
    validate_step_in_backward(cfg)
    validate_keep(cfg)


# trainer.loggers: the built-in names, each the class that hears a run's events (runner.recording.events), named
# by its import path as a class of your own is. Each class declares the package it needs installed (`requires`),
# checked without importing the package (mlflow takes seconds); the classes' modules import it when used.
LOGGERS = {"csv": "runner.recording.sinks.MetricsFile",
           "tensorboard": "runner.recording.tensorboard_tracker.TensorBoardTracker",
           "mlflow": "runner.recording.mlflow_tracker.MlflowTracker"}
LOGGER_EVENTS = ("run_start", "rows", "run_end", "close")  # what a sink class has (a Subscriber has them all)
TRACKERS_EXTRA = "pip install 'backward-lab[trackers]'"  # installs the built-in trackers' packages


def validate_loggers(cfg: Config) -> None:
    """Known names or importable sink classes, csv kept (metrics.csv is what comparisons, claims and resumes
    read), the packages they declare installed."""
    import importlib.util

    loggers = [str(entry) for entry in cfg.trainer.loggers]
    given = f"trainer.loggers=[{','.join(loggers)}]"
    unknown = [entry for entry in loggers if entry not in LOGGERS and "." not in entry]
    if unknown:
        raise ConfigError(f"{given} is not allowed: {unknown[0]} is unknown, expected a list of "
                          f"{', '.join(LOGGERS)} (csv always: e.g. trainer.loggers=[csv,mlflow])")
    if "csv" not in loggers:
        raise ConfigError(f"{given} is not allowed: csv writes the record comparisons and resumes read, "
                          f"expected csv among them (e.g. trainer.loggers=[csv,{','.join(loggers) or 'mlflow'}])")
    for entry in loggers:
        cls, problem = _logger_class(entry)
        if problem:
            raise ConfigError(f"{given} is not allowed: {problem}")
        package = getattr(cls, "requires", None)
        if package and importlib.util.find_spec(package) is None:
            install = TRACKERS_EXTRA if entry in LOGGERS else f"pip install {package}"
            raise ConfigError(f"{given} needs the {package} package, which is not installed: {install}")


def logger_class(entry: str) -> Any:
    """The class a trainer.loggers entry names: a built-in name's (LOGGERS), or yours by its import path."""
    cls, problem = _logger_class(str(entry))
    if problem:
        raise ConfigError(f"trainer.loggers: {problem}")
    return cls


def _logger_class(entry: str) -> Tuple[Any, Optional[str]]:
    """(the class, None), or (None, what is wrong with the entry)."""
    import importlib

    allowed = f"expected {', '.join(LOGGERS)} or a sink class of your own as package.module.Class"
    if entry not in LOGGERS and "." not in entry:
        return None, f"{entry} is unknown, {allowed}"
    module, _, name = LOGGERS.get(entry, entry).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception as exc:  # ImportError, AttributeError, or the module's own failure
        return None, f"{entry} cannot be imported ({type(exc).__name__}: {first_line(exc)}), {allowed}"
    if not isinstance(cls, type) or not all(callable(getattr(cls, event, None)) for event in LOGGER_EVENTS):
        return None, (f"{entry} is not a sink class: expected a class with {', '.join(LOGGER_EVENTS)} "
                      "(a runner.recording.events.Subscriber has them all)")
    return cls, None


def validate_keep(cfg: Config) -> None:
    """backward.keep=last drops .grad before each later micro-batch's backward, keep=first puts the first's back
    after each: where the gradient is held elsewhere (float32 buffers, FSDP2's unsharded gradients, the optimizer-in-backward hooks) it cannot."""
    if plain(cfg.backward.keep) == "all" or cfg.backward.name not in readers_of("keep"):
        return
    given = f"backward.keep={plain(cfg.backward.keep)} is not allowed with"
    if plain(cfg.backward.step_in_backward) != "off":
        raise ConfigError(f"{given} backward.step_in_backward={plain(cfg.backward.step_in_backward)}: the hooks step "
                          "on .grad, expected backward.step_in_backward=off (or backward.keep=all)")
    if plain(cfg.backward.grad_accum_dtype) == "float32":
        raise ConfigError(f"{given} backward.grad_accum_dtype=float32: the gradients add up in float32 buffers, "
                          "expected backward.grad_accum_dtype=param (or backward.keep=all)")
    if cfg.trainer.processes > 1 and plain(cfg.trainer.parallel) == "fsdp":
        raise ConfigError(f"{given} trainer.parallel=fsdp: FSDP2 holds the unsharded gradient itself, expected "
                          "trainer.parallel=ddp (or backward.keep=all)")
    if cfg.trainer.processes > 1 and plain(cfg.backward.keep) == "first":
        raise ConfigError(f"{given} trainer.processes={cfg.trainer.processes}: the ranks reduce the gradient in the "
                          "last micro-batch's backward, which keep=first undoes; expected trainer.processes=1 "
                          "(or backward.keep=all|last)")


def validate_step_in_backward(cfg: Config) -> None:
    """backward.step_in_backward steps each parameter as soon as its gradient is complete, before the
    others' exist: nothing that needs the whole gradient at once can run (clipping by the global norm,
    GradScaler's inf check, a float32 copy of .grad, DDP's reduction). Other strategies ignore the key
    (with a warning, Strategy.ignored_switches)."""
    mode = plain(cfg.backward.step_in_backward)
    if mode == "off" or cfg.backward.name not in readers_of("step_in_backward"):
        return
    given = f"backward.step_in_backward={mode} is not allowed with"
    if cfg.optim.clip_norm:
        raise ConfigError(f"{given} optim.clip_norm={cfg.optim.clip_norm}: clipping needs the whole gradient "
                          "before any parameter steps, expected optim.clip_norm=0 (or backward.step_in_backward=off)")
    if cfg.trainer.processes > 1:
        raise ConfigError(f"{given} trainer.processes={cfg.trainer.processes}: the gradient is reduced across "
                          "ranks after backward, expected trainer.processes=1 (or backward.step_in_backward=off)")
    if plain(cfg.trainer.autocast) == "fp16":
        raise ConfigError(f"{given} trainer.autocast=fp16: GradScaler checks the whole gradient for inf before "
                          "any step, expected trainer.autocast=bf16 or off (or backward.step_in_backward=off)")
    if plain(cfg.backward.grad_accum_dtype) == "float32":
        raise ConfigError(f"{given} backward.grad_accum_dtype=float32: the hooks step on .grad, expected "
                          "backward.grad_accum_dtype=param (or backward.step_in_backward=off)")



def validate_processes(cfg: Config) -> None:
    processes, parallel = cfg.trainer.processes, plain(cfg.trainer.parallel)
    if processes % cfg.trainer.sequence_parallel:
        raise ConfigError(f"trainer.sequence_parallel={cfg.trainer.sequence_parallel} is not allowed with "
                          f"trainer.processes={processes}: expected a divisor of trainer.processes")
    if parallel == "fsdp" and cfg.backward.name not in DDP_STRATEGIES:
        raise ConfigError(f"trainer.parallel=fsdp is not allowed with backward={cfg.backward.name}: expected "
                          f"backward={' or '.join(DDP_STRATEGIES)} (or trainer.parallel=ddp)")
    if processes == 1:
        return
    name = cfg.backward.name
    if name not in DDP_STRATEGIES:
        raise ConfigError(f"trainer.processes={processes} is not allowed with backward={name}: expected "
                          f"backward={' or '.join(DDP_STRATEGIES)} (or trainer.processes=1)")
    if cfg.data.micro_batch_size is not None:
        raise ConfigError(f"trainer.processes={processes} is not allowed in loader mode (data.micro_batch_size="
                          f"{cfg.data.micro_batch_size}): expected data.micro_batch_size=null")
    if plain(cfg.backward.grad_accum_dtype) == "float32":
        raise ConfigError(f"backward.grad_accum_dtype=float32 is not allowed with trainer.processes={processes}: "
                          f"expected backward.grad_accum_dtype=param ({parallel} reduces .grad itself)")
    if parallel == "fsdp" and plain(cfg.trainer.autocast) == "fp16":
        raise ConfigError("trainer.autocast=fp16 is not allowed with trainer.parallel=fsdp: GradScaler does not "
                          "unscale sharded gradients, expected trainer.autocast=bf16 or off")
    if parallel == "fsdp" and cfg.trainer.checkpoint_every:
        raise ConfigError(f"trainer.checkpoint_every={cfg.trainer.checkpoint_every} is not allowed with "
                          "trainer.parallel=fsdp: sharded checkpoints are not written yet, expected 0")
    if parallel == "fsdp" and cfg.trainer.ema:
        raise ConfigError(f"trainer.ema={cfg.trainer.ema} is not allowed with trainer.parallel=fsdp: the average "
                          "would hold sharded parameters, expected trainer.ema=0 (or trainer.parallel=ddp)")
    accumulation = cfg.backward.accumulation if name in readers_of("accumulation") else 1
    groups = processes // cfg.trainer.sequence_parallel  # a sequence-parallel group's ranks share their rows
    if cfg.data.batch_size < groups * accumulation:
        shared = f" / trainer.sequence_parallel ({groups})" if groups != processes else ""
        raise ConfigError(f"trainer.processes={processes} is not allowed with data.batch_size={cfg.data.batch_size} "
                          f"and backward.accumulation={accumulation}: expected data.batch_size >= processes{shared} x "
                          f"accumulation ({groups * accumulation}), a micro-batch for every rank")


def instantiate(dotted: str, target: Optional[str], kwargs: Dict[str, Any],
                optional: Optional[Dict[str, Any]] = None) -> Any:
    """Build a `_target_` (loss._target_, model._target_, optim._target_) with hydra.utils.instantiate.

    `optional` arguments are passed only where the constructor's signature names them (a custom
    model's `hidden`, say, which the schema declares for the built-in models too). Import errors
    and constructor errors become one ConfigError naming the key. The target is imported as
    Python imports anything: a module of the working directory works under `python -m`,
    installed packages from anywhere (nothing edits sys.path).
    """
    import inspect

    from hydra.errors import InstantiationException
    from hydra.utils import get_object
    from hydra.utils import instantiate as hydra_instantiate

    if not target or target == "???":
        raise ConfigError(f"{dotted} is missing: expected {dotted}=package.module.Class")
    try:
        built = get_object(target)
    except Exception as exc:  # ImportError, or Hydra's wrapper of it
        cause = exc.__cause__ or exc
        raise ConfigError(f"{dotted}={target}: cannot import it ({first_line(cause)})") from None
    if optional:
        try:
            accepted = inspect.signature(built).parameters
        except (TypeError, ValueError):
            accepted = {}
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        kwargs = {**{k: v for k, v in optional.items() if takes_any or k in accepted}, **kwargs}
    try:
        return hydra_instantiate({"_target_": target, **kwargs}, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        raise ConfigError(f"{dotted}={target}: cannot build it with {kwargs} "
                          f"({type(cause).__name__}: {first_line(cause)})") from None


def first_line(exc: BaseException) -> str:
    """An exception's message, first line (its type where it has none): errors are one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# The groups whose options may name a class of your own by `_target_`, with its arguments beside it.
OPEN_GROUPS = ("model", "data", "loss")


def register() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    # model and loss are open: an option that names your class by `_target_` holds its arguments too
    # (conf/<group>/NAME.yaml or your own config directory); the declared keys stay typed.
    node = OmegaConf.structured(Config)
    for group in OPEN_GROUPS:
        OmegaConf.set_struct(node[group], False)
    ConfigStore.instance().store(name="base_config", node=node)
