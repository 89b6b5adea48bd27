"""Config -> the plain Python objects of one training (no Hydra here: usable from a notebook).

`build_training(cfg)` builds the model, data, loss, strategy and optimizers, checks that they fit,
and probes the loss on the first batch (runner.training.checks), once. Order matters for reproducibility:
the global RNG is seeded, then the model is built (its initial parameters depend on `seed` and
the model choice alone), then the data set is drawn from its own generators. Loss and strategy
are built afterwards and draw nothing; the probe leaves no trace.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from runner.components.data import Dataset, TaskSpec
from runner.components.loader import Batches, LoaderWindows
from runner.components.losses import RoutedLoss, TokenLoss, offers, per_stage
from runner.components.models import IMAGE_SHAPE, Router, init_prior_bias, output_layer
from runner.components.sources import Request
from runner.components.optim import build_optimizers, build_schedulers
from runner.components.outputs import outputs_from, take_logits
from runner.config.components import class_of, option_target, options, takes
from runner.config.identity import config_record, used_config_id
from runner.config.schema import (
    ARGUMENT_GROUPS,
    Config,
    ConfigError,
    OPEN_GROUPS,
    ModelConf,
    arguments_used,
    instantiate,
    label_of,
    own_class,
    plain,
    set_keys,
    target_of,
)
from runner.execution import fsdp  # noqa: F401  (registers trainer.parallel=fsdp)
from runner.execution.parallel import build_parallel, engine_class
from runner.execution.precision import FirstGradient, Precision
from runner.execution.processes import under_torchrun
from runner.execution.recompute import recompute_blocks
from runner.training import checks
from runner.training.ema import WeightAverage
from runner.training.gradflow import gradient_flow
from runner.training.strategies import (
    PartialWindow,
    Strategy,
    StrategyMismatch,
    build_strategy,
    build_update,
    readers_of,
)
from runner.training.update import parameters_of
from runner.training.weighting import rank_shard


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
    batches: Any  # step -> its examples (runner.components.loader: Batches, or LoaderWindows in loader mode)
    device: torch.device
    dtype: torch.dtype
    loss_kwargs: Dict[str, Any] = field(default_factory=dict)  # the loss class's arguments (focal's alpha, gamma)
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # the model class's arguments (seq's hidden, depth)
    optim_kwargs: Dict[str, Any] = field(default_factory=dict)  # the optimizer's own (+optim.KEY) arguments
    data_kwargs: Dict[str, Any] = field(default_factory=dict)  # the data source's (data.path, data.max_length)
    findings: "Findings" = None  # what the checks before training found (build.probe)
    ignored: List[str] = field(default_factory=list)  # keys another option of the group reads (loss.gamma on bce)

    @property
    def update(self):
        """The update rule the strategy calls (runner.training.update)."""
        return self.strategy.update

    @property
    def engine(self):
        """How the passes and updates run, on one process or over ranks (runner.execution.parallel)."""
        return self.strategy.engine


    @property
    def precision(self):
        return self.engine.precision

    @property
    def ema(self) -> Optional[WeightAverage]:
        """The weights' moving average (trainer.ema), or None."""
        return self.update.ema

    @property
    def schedulers(self) -> List[Any]:
        """The LR schedulers (optim.scheduler), in optimizer order; the update rule steps them."""
        return list(self.update.schedulers.values())

    def shard(self, window):
        """This rank's rows of a window and its loss weight (runner.training.weighting.rank_shard)."""
        return rank_shard(window.inputs, window.targets, self.loss_fn, self.engine.rank, self.engine.world,
                          plain(self.config.loss.rank_normalize), self.config.trainer.sequence_parallel,
                          plain(self.config.loss.count_group))

    def warnings(self) -> List[str]:
        """The lines printed before training and kept in the summary: options the strategy ignores, and
        the columns a table's features left out."""
        columns = self.dataset.columns
        return (self.strategy.ignored_switches(self.config.backward) + self.ignored
                + (columns.warnings if columns else []))

    def used_config_id(self) -> str:
        """What this training uses (runner.config.identity): equal for two jobs that train the same."""
        return used_config_id(self.config, self.config_record())

    def config_record(self) -> Dict[str, Any]:
        return config_record(self.config, self.loss_kwargs, self.model_kwargs, self.optim_kwargs, self.data_kwargs)

    def recorded_config(self) -> Dict[str, Any]:
        """The config as the command line records it in summary.json (what comparisons read): each class's
        arguments under its group (loss.gamma), as Hydra composed them."""
        record = self.config_record()
        for group in ARGUMENT_GROUPS:
            record[group] = {**record[group], **record.pop(f"{group}_kwargs")}
        return record


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


def loss_label(cfg: Config) -> str:
    """How messages name the loss: its `_target_` for the user's own."""
    return label_of("loss", cfg.loss)


def model_label(cfg: Config) -> str:
    return label_of("model", cfg.model)


def option_class(group: str, conf) -> Any:
    """The class one of the runner's own options names by `_target_` (runner.config.components)."""
    cls = class_of(target_of(group, conf))
    if cls is None:
        raise ConfigError(f"{group}={conf.name} is unknown: expected one of {', '.join(options(group))}")
    return cls


def handed(cls: Any, conf, *keys: str) -> Dict[str, Any]:
    """The group's own keys (loss.reduction, model.outputs) a class takes where its constructor names them."""
    named = takes(cls)[1]
    return {key: plain(getattr(conf, key)) for key in keys if key in named}


def classes_arguments(cfg: Config, given: Dict[str, Optional[Dict[str, Any]]]):
    """({group: its class's arguments} for the loss, the model and the data source, what they ignore): the
    keys each class declares, checked and with their defaults (recorded with the run), and the keys another
    option of the group reads left out with a warning (runner.config.components.option_arguments)."""
    used, ignored = {}, []
    for group in OPEN_GROUPS:
        used[group], more = arguments_used(group, getattr(cfg, group), dict(given.get(group) or {}))
        ignored += more
    return used, ignored


def build_model_and_spec(cfg: Config, model_kwargs: Dict[str, Any]):
    """The model the option names by `_target_`, and what it predicts: one of the runner's own says
    (`spec()`: it takes the group's model.outputs and model.vocab where its constructor names them, and
    model.prior_bias sets its output bias); the user's own predicts what the data holds (the synthetic
    default: `model.outputs` labels of 3x10x10 inputs)."""
    if not own_class(cfg.model):
        cls = option_class("model", cfg.model)
        model = cls(**model_kwargs, **handed(cls, cfg.model, "outputs", "vocab"))  # its ValueError names the key
        if cfg.model.prior_bias:
            init_prior_bias(output_layer(model), cfg.model.prior)
        return model, model.spec()
    model = instantiate("model._target_", cfg.model._target_, model_kwargs,
                        optional=set_keys(cfg.model, ModelConf))
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model._target_={cfg.model._target_} built a {type(model).__name__}: "
                          "expected a torch.nn.Module class")
    return model, TaskSpec(IMAGE_SHAPE, "multilabel", cfg.model.outputs)


def build_dataset(cfg: Config, spec: TaskSpec, data_kwargs: Dict[str, Any],
                  model: Optional[torch.nn.Module] = None):
    """The data set the option's source class (runner.components.sources) builds for the model's spec, and
    the TaskSpec it describes (your files describe themselves). `model`: data=text checks that it scores bytes."""
    data = cfg.data
    source = option_class("data", data)(**data_kwargs)  # its own ValueError names the key
    loader = data.micro_batch_size is not None
    if loader and not getattr(source, "reads_a_file", False) and data.micro_batch_size > data.train_size:
        raise ConfigError(f"data.micro_batch_size={data.micro_batch_size} is not allowed: expected at most the data "
                          f"set's data.train_size ({data.train_size})")
    if getattr(source, "tokens", None):  # its tokens are bytes: the model must score them all
        check_scores_bytes(cfg, model, source.tokens)
    # In loader mode the data set's own batches are not drawn: micro-batches are (runner.components.loader).
    request = Request(spec, cfg.seed, data.train_size, data.eval_size,
                      data.micro_batch_size if loader else data.batch_size,
                      "data.micro_batch_size" if loader else "data.batch_size", f"model={cfg.model.name}",
                      own_class(cfg.model), cfg.model.vocab, cfg.model.outputs, model)
    return source.build(request, data.name)


def check_scores_bytes(cfg: Config, model: Optional[torch.nn.Module], tokens: int) -> None:
    """data=text's tokens are bytes: the model must score all 256. A built-in model scores model.vocab
    tokens; the user's own scores what its own output says (model.vocab is not its key: a Hugging Face
    config's vocab_size is), so it is asked by a forward of one sequence (runner.training.checks)."""
    if not own_class(cfg.model):
        if cfg.model.vocab != tokens:
            raise ConfigError(f"model.vocab={cfg.model.vocab} is not allowed with data={cfg.data.name}: its tokens are "
                              f"bytes, expected model.vocab={tokens}")
        return
    width = checks.output_width(model) if model is not None else None
    if width is not None and width != tokens:  # None: the probe names a model that fails
        raise ConfigError(f"model._target_={cfg.model._target_} scores {width} tokens, and data={cfg.data.name}'s "
                          f"tokens are bytes: expected a model that scores {tokens} (a vocabulary of "
                          f"{tokens}: model.vocab={tokens} where it takes vocab)")


def build_batches(cfg: Config, dataset: Dataset, strategy: Strategy):
    """Batch mode, or loader mode's windows of backward.accumulation micro-batches. The window is
    the data's, so backward=full (which records accumulation 1) trains on the same windows, each
    as one batch: the reference at every step, partial windows included."""
    if cfg.data.micro_batch_size is None:
        return Batches(dataset)
    partial = getattr(strategy.options, "partial_window", None)
    return LoaderWindows(dataset, cfg.data.micro_batch_size, cfg.backward.accumulation, partial == PartialWindow.drop,
                         carry=partial == PartialWindow.carry)


def build_engine(cfg: Config, model: torch.nn.Module, loss_fn, device: torch.device):
    """The engine (runner.execution.parallel): one process, or this rank of the ranks torchrun started.
    A command that launches its ranks itself (trainer.processes=N, not under torchrun) trains in
    none of them: it builds for its checks and hands the run to the ranks (runner.cli)."""
    rank_normalize = plain(cfg.loss.rank_normalize)
    if rank_normalize != "global" and not offers(loss_fn, TokenLoss):
        raise ConfigError(f"loss.rank_normalize={rank_normalize} is not allowed with {loss_label(cfg)}: it "
                          "divides a token loss by a token count, expected a token loss (loss=lm)")
    if cfg.trainer.sequence_parallel > 1 and not (offers(loss_fn, TokenLoss) and loss_fn.normalization() != "sequence"):
        raise ConfigError(f"trainer.sequence_parallel={cfg.trainer.sequence_parallel} is not allowed with "
                          f"{loss_label(cfg)}: its ranks score parts of each sequence, which only a token loss adds "
                          "up, expected loss=lm (not loss.normalize=sequence) or loss=grpo loss.aggregation=token_mean")
    # backward.sync is accumulate's: sum synchronises its one backward, as full does.
    sync = plain(cfg.backward.sync) if cfg.backward.name in readers_of("sync") else "last"
    world = cfg.trainer.processes if under_torchrun() else 1
    try:
        engine_class(plain(cfg.trainer.parallel))
    except ValueError as exc:  # an unknown engine, or the user's own that does not import
        raise ConfigError(str(exc)) from None
    return build_parallel(plain(cfg.trainer.parallel), model, device, world, sync)


def build_loss_fn(cfg: Config, loss_kwargs: Dict[str, Any], spec: TaskSpec):
    """The loss the option names by `_target_`, with its arguments: one of the runner's own (checked against
    what the model predicts, its `fits`, and handed loss.reduction where it takes it), or yours."""
    if own_class(cfg.loss):
        loss = instantiate("loss._target_", cfg.loss._target_, loss_kwargs)
        if not callable(loss):
            raise ConfigError(f"loss._target_={cfg.loss._target_} built a {type(loss).__name__}, "
                              "which cannot be called as loss(outputs, targets): expected an nn.Module class")
        return per_stage(loss, spec)
    cls = option_class("loss", cfg.loss)
    if spec.kind not in getattr(cls, "fits", {spec.kind}):
        fitting = [option for option in options("loss")
                   if spec.kind in getattr(class_of(option_target("loss", option)), "fits", ())] + ["custom"]
        raise ConfigError(f"loss={cfg.loss.name} does not fit model={cfg.model.name} ({spec.kind} targets): "
                          f"expected loss={' or loss='.join(fitting)}")
    return per_stage(cls(**loss_kwargs, **handed(cls, cfg.loss, "reduction")), spec)  # its ValueError names the key


def check_router(cfg: Config, model: torch.nn.Module, loss_fn) -> None:
    """A load-balancing loss needs a model whose router it can read (runner.components.models.Router),
    and the window's expert load counted in one process."""
    if not offers(loss_fn, RoutedLoss):
        return
    given = f"loss.aux_weight={loss_fn.aux_weight} is not allowed with"
    if not offers(model, Router):
        raise ConfigError(f"{given} {model_label(cfg)}: it balances a mixture-of-experts router, expected "
                          "model=moe (or loss.aux_weight=0)")
    if cfg.trainer.processes > 1:
        raise ConfigError(f"{given} trainer.processes={cfg.trainer.processes}: the window's expert load is counted "
                          "in one process, expected trainer.processes=1")


def check_boundaries(loss_fn, dataset: Dataset) -> None:
    """loss.boundaries=twice removes packed rows' document boundaries from the count again: it needs packed rows."""
    packed = isinstance(dataset.train_targets, dict) and "documents" in dataset.train_targets
    if getattr(loss_fn, "boundaries", "once") == "twice" and not packed:
        raise ConfigError("loss.boundaries=twice is not allowed without packed rows: it removes their documents' "
                          "boundaries from the count, expected data=seq data.packing=true (or loss.boundaries=once)")


def _misfit(strategy: Strategy, cfg: Config, exc: StrategyMismatch) -> str:
    if exc.misfit == "model":
        return f"backward={strategy.name} does not fit model={cfg.model.name}: {exc}"
    if exc.misfit == "loss":
        return f"backward={strategy.name} does not fit loss={cfg.loss.name} on model={cfg.model.name}: {exc}"
    return str(exc)


def build_ema(cfg: Config, model: torch.nn.Module) -> Optional[WeightAverage]:
    """trainer.ema's moving average of the weights (before any hook is registered on them), or None."""
    return WeightAverage(model, cfg.trainer.ema, plain(cfg.trainer.ema_every)) if cfg.trainer.ema else None


def build_training(cfg: Config, loss_kwargs: Optional[Dict[str, Any]] = None,
                   model_kwargs: Optional[Dict[str, Any]] = None,
                   optim_kwargs: Optional[Dict[str, Any]] = None,
                   data_kwargs: Optional[Dict[str, Any]] = None) -> Training:
    """Build and check one training; ConfigError (bad input) before anything runs."""
    arguments, ignored = classes_arguments(cfg, {"loss": loss_kwargs, "model": model_kwargs, "data": data_kwargs})
    loss_kwargs, model_kwargs, data_kwargs = arguments["loss"], arguments["model"], arguments["data"]
    device = resolve_device(cfg.trainer.device)
    dtype = getattr(torch, plain(cfg.trainer.dtype))
    set_determinism(cfg.trainer.deterministic, device)
    seed_everything(cfg.seed)
    try:
        model, spec = build_model_and_spec(cfg, model_kwargs)
        # A built-in loss wants a tensor: a mapping output's logits (a Hugging Face ModelOutput) stand in for it.
        logits_hook = take_logits(model) if own_class(cfg.model) and not own_class(cfg.loss) else None
        # Data comes from its own generators: the model's initial parameters depend on the seed alone.
        dataset, spec = build_dataset(cfg, spec, data_kwargs, model)
        dataset.to(device, dtype)
        loss_fn = build_loss_fn(cfg, loss_kwargs, spec)
        check_router(cfg, model, loss_fn)
        check_boundaries(loss_fn, dataset)
        # The strategy as its options make it: what fits, the batches, the probes' forward.
        planned = build_strategy(cfg.backward)
        loader = cfg.data.micro_batch_size is not None  # a window of k micro-batches is the step's batch
        planned.check(model, loss_fn, cfg.backward.accumulation * cfg.data.micro_batch_size if loader
                      else cfg.data.batch_size)
        batches = build_batches(cfg, dataset, planned)
    except StrategyMismatch as exc:
        raise ConfigError(_misfit(planned, cfg, exc)) from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    model = model.to(device=device, dtype=dtype)
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn = loss_fn.to(device=device, dtype=dtype)
    findings = probe(cfg, planned, model, loss_fn, batches, spec, data_kwargs.get("path"))
    findings.outputs_from = outputs_from(logits_hook)  # the probe's forward showed what the model returns
    if cfg.backward.activation_checkpointing:  # after the probes, which must see the plain model
        recompute_blocks(model)
    # Sharding replaces the parameters (FSDP): the optimizers are built over what it leaves.
    engine = build_engine(cfg, model, loss_fn, device)
    extra_loss_params = list(loss_fn.parameters()) if isinstance(loss_fn, torch.nn.Module) else []
    # Learnable loss weights (e.g. uncertainty weighting) train with the model.
    groups = planned.with_loss_parameters(planned.param_groups(model), extra_loss_params)
    optimizers = build_optimizers(cfg.optim, groups, optim_kwargs)
    engine.use(Precision(device.type, plain(cfg.trainer.autocast), plain(cfg.backward.grad_accum_dtype),
                         cfg.trainer.init_scale, parameters_of(optimizers)))
    rule = build_update(
        cfg.backward, engine, schedulers={id(opt): s for opt, s in zip(optimizers, build_schedulers(cfg, optimizers))},
        scheduler_every=plain(cfg.optim.scheduler_every), clip_norm=cfg.optim.clip_norm,
        clip_every=plain(cfg.optim.clip_every), ema=build_ema(cfg, model), model=model,
        first_gradient=FirstGradient(cfg.trainer.first_grad))
    strategy = build_strategy(cfg.backward, rule)
    return Training(cfg, model, spec, loss_fn, strategy, optimizers, dataset, batches, device, dtype,
                    loss_kwargs=loss_kwargs, model_kwargs=model_kwargs, optim_kwargs=dict(optim_kwargs or {}),
                    data_kwargs=data_kwargs, findings=findings, ignored=ignored)


@dataclass
class Findings:
    """What the checks before training found on the first batch (runner.training.checks)."""

    # Parameters the loss never reaches, or why it cannot train at all.
    params_without_grad: List[str] = field(default_factory=list)
    not_differentiable: Optional[str] = None
    # Can micro-batches equal the batch? (runner.training.checks.Coupling)
    coupling: Optional[checks.Coupling] = None
    gradient_flow: List[Dict[str, Any]] = field(default_factory=list)  # per module and loss component
    outputs_from: Optional[str] = None  # "logits": the loss read the logits of the model's mapping output


def probe(cfg: Config, strategy: Strategy, model: torch.nn.Module, loss_fn, batches, spec: TaskSpec,
          data_path: Optional[str] = None) -> Findings:
    """The checks before training, on the first batch (runner.training.checks): does the model's output fit
    the targets, can the loss train it, does the model or the loss couple examples, where does the gradient flow?"""
    window = batches.window(0)
    inputs, targets = window.inputs, window.targets
    data_label = f"data={cfg.data.name}" + (f" ({data_path})" if data_path else "")
    check_outputs = None if own_class(cfg.loss) else (  # a loss of the user's decides what fits
        lambda outputs: checks.check_outputs_fit(outputs, targets, spec, model_label(cfg), data_label,
                                                 loss_label(cfg)))
    findings = Findings()
    try:
        findings.params_without_grad = checks.probe_loss(
            model, loss_fn, inputs, targets, loss_label(cfg), model_label(cfg), check_outputs)
    except checks.NotDifferentiable as exc:
        findings.not_differentiable = str(exc)
        return findings  # nothing to train: no gradient to follow
    findings.coupling = checks.probe_coupling(model, inputs)
    coupled_loss = checks.probe_loss_identity(model, loss_fn, inputs, targets)
    if coupled_loss:  # the loss mixes examples: micro-batches cannot be the batch either
        findings.coupling.batch_coupled = True
        findings.coupling.modules = findings.coupling.modules + coupled_loss
    findings.gradient_flow = gradient_flow(strategy, model, loss_fn, inputs, targets)
    return findings
