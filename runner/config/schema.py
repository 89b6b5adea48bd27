"""Structured configs: the types, defaults and roles of every config key.

Registered in Hydra's ConfigStore as `base_config`, the first entry of conf/config.yaml's defaults
list, so each group option (conf/model/*.yaml, ...) merges into a typed node: a wrong type or an
unknown enum value fails during composition with Hydra's message naming the key. Range checks
that types cannot express live in `validate()`, which runs before anything is written.

`backward.*` is not declared here: it is `name` plus the options each strategy reads, declared in
runner.config.backward_options, so the config side never imports the training code.

Each key declares its role once, as field metadata (see `Role`); resume, checkpoints and the
comparison read the roles instead of keeping their own lists of keys.

The dataclasses are plain Python: a notebook can build `Config(...)` and call
`runner.training.build.build_training` without Hydra.
"""
from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, make_dataclass
from enum import Enum
from typing import Any, Dict, Iterator, List, Optional, Tuple

from runner.config.backward_options import OPTIONS, PassOptions, readers_of


class Role(str, Enum):
    """What a key means for a run's identity."""

    training = "training"  # defines the training: a resume keeps the run's value; comparisons show it
    extent = "extent"  # how long or where it runs: a resume may change it; comparisons show it
    operational = "operational"  # changes no result (logging, threads, ...): resumes and comparisons ignore it


def key(default: Any = MISSING, role: Role = Role.training, **kwargs) -> Any:
    """A dataclass field with its role; `default_factory` passes through."""
    return field(default=default, metadata={"role": role}, **kwargs)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    float32 = "float32"
    float64 = "float64"  # the oracle a float32 run is measured against (within_drift)
    bfloat16 = "bfloat16"  # "pure" bf16: parameters, gradients and arithmetic in bf16


class Autocast(str, Enum):
    off = "off"
    bf16 = "bf16"  # torch.autocast to bfloat16: float32 parameters and gradients
    fp16 = "fp16"  # torch.autocast to float16, with GradScaler's loss scaling


class Reduction(str, Enum):
    none = "none"
    mean = "mean"
    sum = "sum"


class Normalize(str, Enum):
    tokens = "tokens"  # the summed loss / the effective batch's non-ignored tokens: exact under any split
    micro_batch = "micro_batch"  # the mean over each micro-batch's tokens (the pre-2024 Trainer)
    sequence = "sequence"  # the mean over each sequence's tokens, then over sequences
    # tokens, then divided again by backward.accumulation when backwarded (TRL #2617, axolotl #2262):
    # the gradient is 1/k of the batch's, which only some optimizers notice
    double = "double"


class AuxStats(str, Enum):
    # f_i over the whole window, counted first by a router-only pass: exact (torchtitan PR #4772)
    window = "window"
    micro_batch = "micro_batch"  # each micro-batch's own f_i: accumulation's default (torchtitan PR #3000)


# With several processes and a token loss: what each rank's loss is divided by. `global` is a
# Python keyword, hence the functional form (OmegaConf matches enum values by member name).
RankNormalize = Enum("RankNormalize", {
    "global": "global",  # the step's scored tokens over every rank, the mean over ranks undone: exact
    "local": "local",  # the rank's own tokens (transformers #34242)
    "no_world": "no_world",  # the global count, the mean over ranks not undone: 1/world (torchtitan #1842)
}, type=str)


class ParallelEngine(str, Enum):
    ddp = "ddp"  # DistributedDataParallel: the whole model and gradient on every rank
    fsdp = "fsdp"  # FSDP2 fully_shard: 1/world of every parameter, gradient and optimizer state per rank


class Scheduler(str, Enum):
    none = "none"
    linear = "linear"  # linear warmup, then linear decay to 0 at trainer.steps
    cosine = "cosine"  # linear warmup, then half a cosine down to 0 at trainer.steps


class Every(str, Enum):
    step = "step"  # once per optimizer step
    micro_batch = "micro_batch"  # once per micro-batch (the accumulation bugs)


class MemoryMeter(str, Enum):
    first = "first"  # measure the first optimizer step only (shapes do not change)
    every = "every"
    off = "off"


def plain(value: Any) -> Any:
    """An enum member from a structured config -> its plain value (the one helper for it)."""
    return value.value if isinstance(value, Enum) else value


@dataclass
class ModelConf:
    name: str = "mlp"
    hidden: int = 64
    outputs: int = 5
    batchnorm: bool = False
    # Initialise the output bias to -log((1-prior)/prior), as RetinaNet does for rare positives.
    prior_bias: bool = False
    prior: float = 0.01
    depth: int = 2  # layers in a shared trunk (multi-task models), or the recurrent/attention layers (seq)
    vocab: int = 16  # seq: the vocabulary (tokens 0..vocab-1)
    cell: str = "gru"  # seq, moe: gru | transformer (causal self-attention)
    experts: int = 8  # moe: experts in the mixture-of-experts feed-forward layer
    top_k: int = 2  # moe: experts each token is sent to, 1..model.experts
    # dual_encoder: one tower embeds both views (else a tower per view, each model.depth layers of model.hidden
    # units, then model.outputs embedding dimensions)
    shared: bool = False
    dropout: float = 0.0  # dual_encoder: dropout probability inside each tower, in [0, 1)
    _target_: Optional[str] = None  # custom: import path of your nn.Module class


@dataclass
class DataConf:
    name: str = "default"
    batch_size: int = 32  # the effective batch of one optimizer step
    train_size: int = 4096  # synthetic data: examples to train on
    eval_size: int = 1024  # synthetic data: held-out examples
    positive_rate: float = 0.5  # share of positive labels the hidden teacher produces
    noise: float = 0.0  # label noise: share of flipped binary labels
    path: Optional[str] = None  # csv, tensors, text: the file
    target: Any = None  # csv: the target column, or several (A,B or [A, B]) for multi-label targets
    # csv: the feature columns (A,B or [A, B]), each numeric; null = every numeric column but the target(s),
    # and the non-numeric ones left out are named in a warning
    features: Any = None
    eval_fraction: float = 0.2  # csv, tensors, text: the share held out, chosen by `seed`
    # seq: the shortest sequence (tokens, so min_length - 1 predicted tokens); text: shorter paragraphs are left out
    min_length: int = 2
    # seq: the longest; text: where a paragraph's bytes are cut; shorter sequences are right-padded, their labels -100
    max_length: int = 32
    # Loader mode: micro-batches of this size drawn through a DataLoader, backward.accumulation of
    # them per optimizer step, in epochs over the training rows; null = batches of data.batch_size.
    micro_batch_size: Optional[int] = None
    # seq: each batch ordered by scored tokens, so that with several processes rank 0's share holds
    # the short sequences and the last rank's the long ones (the skew of transformers #34242)
    sort_lengths: bool = False
    # seq: 0 = one Markov chain; T > 0: T topics, each with its own chain favouring its share of the
    # vocabulary, and each batch ordered by topic, so that a micro-batch's statistics (an MoE router's
    # expert load) differ from the window's
    topics: int = 0


@dataclass
class LossConf:
    name: str = "bce"
    reduction: Reduction = Reduction.mean
    alpha: float = 0.25  # focal: weight of positives; < 0 turns the alpha weighting off
    gamma: float = 2.0  # focal: focusing parameter, >= 0
    weights: Dict[str, float] = field(default_factory=dict)  # multitask: weight per task
    weighting: str = "fixed"  # multitask: fixed | uncertainty
    normalize: Normalize = Normalize.tokens  # lm: what the token loss is divided by
    rank_normalize: RankNormalize = RankNormalize["global"]  # lm with several processes (RankNormalize)
    # lm on model=moe: weight of Switch Transformer's load-balancing loss E * sum_i f_i * P_i (part `aux`);
    # 0 = none (needs a model with a router when > 0)
    aux_weight: float = 0.0
    aux_stats: AuxStats = AuxStats.window  # lm with aux_weight > 0: whose f_i a micro-batch's term uses
    # infonce: similarities (cosine) are divided by it before the softmax, > 0 (0.05 = sentence-transformers' scale 20)
    temperature: float = 0.05
    symmetric: bool = False  # infonce: also score each key against every query, and average the two losses
    _target_: Optional[str] = None  # custom: import path of an nn.Module loss class


def _backward_conf() -> type:
    """backward.*: `name`, the union of the options every registered strategy declares (two
    strategies that read one key must declare it alike), and the options of every strategy's
    passes (runner.config.backward_options)."""
    declared: Dict[str, Tuple[str, Any, Any]] = {}
    for name, options in list(OPTIONS.items()) + [("*", PassOptions)]:
        hints = typing.get_type_hints(options)
        for f in fields(options):
            spec = (f.name, hints[f.name], f.default)
            if declared.setdefault(f.name, spec) != spec:
                raise TypeError(f"backward.{f.name} is declared differently by backward={name}")
    return make_dataclass("BackwardConf", [("name", str, field(default="full"))] +
                          [(name, kind, field(default=default)) for name, kind, default in declared.values()])


BackwardConf = _backward_conf()


@dataclass
class OptimConf:
    # The optimizer's label in choices and comparisons; without a _target_ (a Config built in
    # Python) it picks the class (runner.training.optim.TARGETS: sgd, adam, adamw, rmsprop).
    name: str = "sgd"
    # The optimizer class (torch.optim.AdamW, or your own), built as a partial and called with each
    # parameter group; it gets optim.lr, and momentum, weight_decay and betas where its signature
    # names them, and its own arguments as +optim.KEY=VALUE (name, scheduler*, warmup_steps and
    # clip_* are the runner's and never reach it).
    _target_: Optional[str] = None
    _partial_: bool = True
    lr: float = 0.5
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: Scheduler = Scheduler.none  # the learning-rate schedule over trainer.steps
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0 to optim.lr
    scheduler_every: Every = Every.step  # micro_batch: advance the schedule per micro-batch (the bug)
    clip_norm: float = 0.0  # clip the gradient's L2 norm to this (0 = off)
    clip_every: Every = Every.step  # micro_batch: clip the running gradient after each micro-batch (the bug)


@dataclass
class TrainerConf:
    steps: int = key(100, Role.extent)
    device: Device = key(Device.auto, Role.extent)
    dtype: DType = DType.float32
    # Forward and loss under torch.autocast (parameters and gradients stay in trainer.dtype=float32).
    autocast: Autocast = Autocast.off
    init_scale: float = 2.0 ** 16  # autocast=fp16: GradScaler's first loss scale
    # Processes, each training on its share of every batch with DistributedDataParallel (gloo on
    # CPU, nccl on CUDA), launched through torch.distributed.run; torchrun sets it from WORLD_SIZE.
    processes: int = key(1, Role.extent)
    parallel: ParallelEngine = ParallelEngine.ddp  # how the processes share the model (trainer.processes > 1)
    deterministic: bool = False
    # Decay of an exponential moving average of the weights (torch.optim.swa_utils.AveragedModel with
    # get_ema_multi_avg_fn, buffers averaged too), updated after every optimizer step; 0 = off. Recorded
    # as ema_weights.pt, ema_param_sha256/ema_param_sum and ema_eval_value; comparisons add ema_max_abs_diff.
    ema: float = 0.0
    # micro_batch: update the average after every micro-batch of backward=accumulate, k times per step, most
    # on not-yet-stepped weights (the bug of lightly-train #968, F5-TTS #631); other strategies: per step.
    ema_every: Every = Every.step
    # Rows are buffered on the device and written every log_every steps (0 = 1 on CPU, 50 on CUDA)
    # so that logging never forces a host-device sync per step on a GPU.
    log_every: int = key(0, Role.operational)
    memory: MemoryMeter = key(MemoryMeter.first, Role.operational)
    progress: bool = key(True, Role.operational)  # a rich progress bar when stdout is a terminal
    eval: bool = key(True, Role.extent)
    # torch intra-op threads; 0 = auto: the cores shared out between concurrent training processes
    # (joblib sweep workers, ranks on a node), torch's default for one process
    threads: int = key(0, Role.operational)
    checkpoint_every: int = key(0, Role.operational)
    resume: Optional[str] = key(None, Role.operational)
    # first_grad.pt: the first optimizer step's gradient (false for models too large to keep it twice)
    first_grad: bool = key(True, Role.operational)
    # A sweep's job whose used configuration equals an earlier job's reuses its records: true trains again.
    rerun: bool = key(False, Role.operational)
    # Where each run's per-step rows go (runner.training.trackers): csv (metrics.csv, the record the analysis
    # reads, always kept), tensorboard (a SummaryWriter in the run's tensorboard/ folder) and mlflow (one MLflow
    # run per job, a sweep's jobs nested in its parent run); the last two need `pip install backward-lab[trackers]`.
    loggers: List[str] = key(role=Role.operational, default_factory=lambda: ["csv"])
    # loggers=[csv,mlflow]: the MLflow tracking URI (a team's server: http://host:5000); null = a SQLite
    # store, mlflow.db in the folder above the run's folder (a sweep's: above the sweep's), artifacts beside it.
    mlflow_uri: Optional[str] = key(None, Role.operational)


@dataclass
class Config:
    model: ModelConf = field(default_factory=ModelConf)
    data: DataConf = field(default_factory=DataConf)
    loss: LossConf = field(default_factory=LossConf)
    backward: BackwardConf = field(default_factory=BackwardConf)
    optim: OptimConf = field(default_factory=OptimConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    seed: int = 0
    # Declared expectations of a sweep (see runner.analysis.claims); ignored by single runs.
    claims: List[Any] = key(role=Role.operational, default_factory=list)
    # What an experiment shows, in a sentence or two with its public reference (the report prints it).
    about: Optional[str] = key(None, Role.operational)


# Which group a choice (model=cnn) picks for; the option's `name` repeats the choice.
GROUPS = ("model", "data", "loss", "backward", "optim")


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


def extra_keys(conf: Any, declared: type) -> dict:
    """Keys given with `+group.KEY=VALUE` that the group's dataclass does not declare: the
    constructor arguments of a custom loss or model."""
    names = {f.name for f in fields(declared)}
    return {k: v for k, v in dict(conf).items() if k not in names}


def set_keys(conf: Any, declared: type, skip: Tuple[str, ...] = ("name", "_target_")) -> dict:
    """Declared keys whose value differs from the dataclass default (what the user set)."""
    return {f.name: getattr(conf, f.name) for f in fields(declared)
            if f.name not in skip and f.default is not MISSING and getattr(conf, f.name) != f.default}


def validate(cfg: Config) -> None:
    """Range checks Hydra's types cannot make. Raises ConfigError naming the key."""
    loader = cfg.data.micro_batch_size is not None
    checks = [
        (cfg.trainer.steps >= 1, "trainer.steps", cfg.trainer.steps, "an integer >= 1"),
        (cfg.data.batch_size >= 1, "data.batch_size", cfg.data.batch_size, "an integer >= 1"),
        (cfg.backward.accumulation >= 1, "backward.accumulation", cfg.backward.accumulation,
         "an integer >= 1"),
        (cfg.loss.alpha <= 1, "loss.alpha", cfg.loss.alpha, "<= 1 (or < 0 to disable)"),
        (cfg.loss.gamma >= 0, "loss.gamma", cfg.loss.gamma, ">= 0"),
        (cfg.loss.temperature > 0, "loss.temperature", cfg.loss.temperature, "> 0"),
        (0 <= cfg.model.dropout < 1, "model.dropout", cfg.model.dropout, "in [0, 1)"),
        (cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "> 0"),
        (loader or cfg.data.train_size >= cfg.data.batch_size, "data.train_size",
         cfg.data.train_size, f">= data.batch_size ({cfg.data.batch_size})"),
        (not loader or cfg.data.micro_batch_size >= 1, "data.micro_batch_size", cfg.data.micro_batch_size,
         "an integer >= 1 (or null for batches of data.batch_size)"),
        (not loader or cfg.data.micro_batch_size <= cfg.data.train_size or cfg.data.name in ("csv", "tensors", "text"),
         "data.micro_batch_size", cfg.data.micro_batch_size,
         f"at most the data set's data.train_size ({cfg.data.train_size})"),
        (cfg.data.min_length >= 2, "data.min_length", cfg.data.min_length, "an integer >= 2 (a token to predict)"),
        (cfg.data.max_length >= cfg.data.min_length, "data.max_length", cfg.data.max_length,
         f">= data.min_length ({cfg.data.min_length})"),
        (cfg.model.vocab >= 2, "model.vocab", cfg.model.vocab, "an integer >= 2"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps", cfg.optim.warmup_steps, ">= 0"),
        (cfg.optim.clip_norm >= 0, "optim.clip_norm", cfg.optim.clip_norm, ">= 0 (0 = off)"),
        (cfg.data.eval_size >= 0, "data.eval_size", cfg.data.eval_size, ">= 0"),
        (0 < cfg.data.positive_rate < 1, "data.positive_rate", cfg.data.positive_rate,
         "strictly between 0 and 1"),
        (0 <= cfg.data.noise < 0.5, "data.noise", cfg.data.noise, "in [0, 0.5)"),
        (0 < cfg.model.prior < 1, "model.prior", cfg.model.prior, "strictly between 0 and 1"),
        (cfg.model.hidden >= 1, "model.hidden", cfg.model.hidden, "an integer >= 1"),
        (cfg.model.outputs >= 1, "model.outputs", cfg.model.outputs, "an integer >= 1"),
        (cfg.trainer.init_scale > 0, "trainer.init_scale", cfg.trainer.init_scale, "> 0"),
        (cfg.trainer.threads >= 0, "trainer.threads", cfg.trainer.threads, ">= 0 (0 = auto)"),
        (cfg.trainer.log_every >= 0, "trainer.log_every", cfg.trainer.log_every, ">= 0"),
        (cfg.trainer.checkpoint_every >= 0, "trainer.checkpoint_every",
         cfg.trainer.checkpoint_every, ">= 0 (0 = no checkpoints)"),
        (0 <= cfg.data.eval_fraction < 1, "data.eval_fraction", cfg.data.eval_fraction, "in [0, 1)"),
        (cfg.model.experts >= 1, "model.experts", cfg.model.experts, "an integer >= 1"),
        (1 <= cfg.model.top_k <= cfg.model.experts, "model.top_k", cfg.model.top_k,
         f"an integer in 1..model.experts ({cfg.model.experts})"),
        (cfg.loss.aux_weight >= 0, "loss.aux_weight", cfg.loss.aux_weight, ">= 0 (0 = no load-balancing loss)"),
        (cfg.data.topics >= 0, "data.topics", cfg.data.topics, "an integer >= 0 (0 = one chain)"),
        (0 <= cfg.trainer.ema < 1, "trainer.ema", cfg.trainer.ema, "in [0, 1) (the EMA's decay; 0 = off)"),
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
    validate_routing(cfg)
    validate_loggers(cfg)
    validate_processes(cfg)
    validate_step_in_backward(cfg)


# trainer.loggers: each logger's Python package (checked without importing it: mlflow takes seconds).
LOGGER_PACKAGES = {"csv": None, "tensorboard": "tensorboard", "mlflow": "mlflow"}


def validate_loggers(cfg: Config) -> None:
    """Known names, csv kept (metrics.csv is what comparisons, claims and resumes read), packages installed."""
    import importlib.util

    loggers = list(cfg.trainer.loggers)
    given = f"trainer.loggers=[{','.join(map(str, loggers))}]"
    unknown = [name for name in loggers if name not in LOGGER_PACKAGES]
    if unknown:
        raise ConfigError(f"{given} is not allowed: {unknown[0]} is unknown, expected a list of "
                          f"{', '.join(LOGGER_PACKAGES)} (csv always: e.g. trainer.loggers=[csv,mlflow])")
    if "csv" not in loggers:
        raise ConfigError(f"{given} is not allowed: csv writes the record comparisons and resumes read, "
                          f"expected csv among them (e.g. trainer.loggers=[csv,{','.join(loggers) or 'mlflow'}])")
    for name in loggers:
        package = LOGGER_PACKAGES[name]
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"{given} needs the {package} package, which is not installed: "
                              "pip install 'backward-lab[trackers]'")


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


def validate_routing(cfg: Config) -> None:
    """loss.aux_weight and data.topics where they mean something (a model without a router is
    refused when the model is built: runner.training.build)."""
    if cfg.loss.aux_weight > 0 and cfg.loss.name != "lm":
        raise ConfigError(f"loss.aux_weight={cfg.loss.aux_weight} is not allowed with loss={cfg.loss.name}: "
                          "expected loss=lm (with model=moe), or loss.aux_weight=0")
    if cfg.loss.aux_weight > 0 and cfg.trainer.processes > 1:
        raise ConfigError(f"loss.aux_weight={cfg.loss.aux_weight} is not allowed with trainer.processes="
                          f"{cfg.trainer.processes}: the window's expert load is counted in one process, "
                          "expected trainer.processes=1")
    if cfg.data.topics and cfg.data.name != "seq":
        raise ConfigError(f"data.topics={cfg.data.topics} is not allowed with data={cfg.data.name}: expected data=seq")


# The strategies DDP and FSDP can wrap: one optimizer, a forward per micro-batch, one backward each
# (or one over all of them).
DDP_STRATEGIES = ("full", "sum", "accumulate")


def validate_processes(cfg: Config) -> None:
    processes, parallel = cfg.trainer.processes, plain(cfg.trainer.parallel)
    if processes < 1:
        raise ConfigError(f"trainer.processes={processes} is not allowed: expected an integer >= 1")
    if parallel == "fsdp" and cfg.backward.name not in DDP_STRATEGIES:
        raise ConfigError(f"trainer.parallel=fsdp is not allowed with backward={cfg.backward.name}: expected "
                          f"backward={' or '.join(DDP_STRATEGIES)} (or trainer.parallel=ddp)")
    rank_normalize = plain(cfg.loss.rank_normalize)
    if rank_normalize != "global" and cfg.loss.name not in ("lm", "custom"):
        raise ConfigError(f"loss.rank_normalize={rank_normalize} is not allowed with loss={cfg.loss.name}: it "
                          "divides a token loss by a token count, expected loss=lm (or loss.rank_normalize=global)")
    if cfg.data.sort_lengths and cfg.data.name not in ("seq", "text"):
        raise ConfigError(f"data.sort_lengths=true is not allowed with data={cfg.data.name}: expected data=seq or text")
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
    accumulation = cfg.backward.accumulation if name != "full" else 1
    if cfg.data.batch_size < processes * accumulation:
        raise ConfigError(f"trainer.processes={processes} is not allowed with data.batch_size={cfg.data.batch_size} "
                          f"and backward.accumulation={accumulation}: expected data.batch_size >= processes x "
                          f"accumulation ({processes * accumulation}), a micro-batch for every rank")


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
        raise ConfigError(f"{dotted}={target}: cannot import it ({_first_line(cause)})") from None
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
                          f"({type(cause).__name__}: {_first_line(cause)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)
