"""Backward strategies: the only code that calls backward() or optimizer.step().

A strategy is one small class registered by name; the backward.* options it reads are its
`Options`, declared by its name in runner.config.backward_options (the config schema is built from
them without importing this module); adding one is a class here, its options entry there, and a
YAML file in conf/backward/. `step()` runs one optimizer step on
one batch and returns detached tensors only (no .item(): on a GPU the loop reads them back in
batches, never once per step). What a strategy needs from a model or a loss beyond
`model(inputs)` and `loss(outputs, targets)` is written down as a Protocol (SharedTrunk,
TwoStageModel, Embedder here; MultiPartLoss, TokenLoss, RoutedLoss, EmbeddingLoss in
runner.training.losses; Router in runner.training.models).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Dict, List, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from runner.config.backward_options import (
    OPTIONS,
    PER_MICRO_BATCH_UPDATES,
    AccumulateOptions,
    ChainedOptions,
    GradCacheOptions,
    MicroBatchOptions,
    NoOptions,
    PartialWindow,
    PassOptions,
    SeparateOptions,
    StepInBackward,
    option_defaults,
    readers_by_option,
    readers_of,
)
from runner.config.registry import Registry
from runner.execution.parallel import Single
from runner.execution.precision import FirstGradient, Precision
from runner.record import EXPERT_LOAD_CV_COLUMN, TOKENS_COLUMN, grad_cos_column
from runner.training.data import micro_batches
from runner.training.losses import (
    EmbeddingLoss,
    MultiPartLoss,
    RoutedLoss,
    TokenLoss,
    exact_share,
    is_sum_reduced,
    loss_parts,
    offers,
)


@dataclass
class Updates:
    """How accumulated gradients become an update: clipping and the learning-rate schedule, each
    once per optimizer step, or (the accumulation bugs) once per micro-batch."""

    schedulers: Dict[int, object] = field(default_factory=dict)  # id(optimizer) -> its LR scheduler
    scheduler_every: str = "step"
    clip_norm: float = 0.0  # 0 = no clipping
    clip_every: str = "step"
    # trainer.ema: the weights' moving average (runner.training.ema.WeightAverage), or None. The loop
    # updates it after each optimizer step; a strategy that reads ema_every calls it between micro-batches.
    ema: Optional[object] = None


@runtime_checkable
class SharedTrunk(Protocol):
    """A multi-task model whose heads share parameters (separate records the tasks' gradient cosine)."""

    def shared_parameters(self) -> List[nn.Parameter]: ...


@runtime_checkable
class TwoStageModel(Protocol):
    """Two chained models: stage 2 consumes stage 1's output, detached or not."""

    stage1: nn.Module
    stage2: nn.Module

    def __call__(self, inputs: torch.Tensor, detach: bool = False) -> Dict[str, torch.Tensor]: ...


@dataclass
class StepResult:
    loss: torch.Tensor  # the batch's loss as the full batch computes it, however split (0-dim, detached)
    grad_norm: torch.Tensor  # L2 norm of all gradients before the step (0-dim)
    parts: Dict[str, torch.Tensor] = field(default_factory=dict)  # loss_<name> columns
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)  # other per-step columns


class StrategyMismatch(ValueError):
    """The strategy does not fit the chosen model or loss (`misfit`), or a value of its own."""

    def __init__(self, reason: str, misfit: Optional[str] = None):
        super().__init__(reason)
        self.misfit = misfit  # "model", "loss" or None (the message names the key itself)


def parameters_of(optimizers) -> List[nn.Parameter]:
    return [p for opt in optimizers for group in opt.param_groups for p in group["params"]]


def loss_with_parts(loss_fn, outputs, targets, **kwargs):
    """(loss, its parts detached). A loss made of parts is computed once: its total is the sum
    of its parts, as its forward() is. `kwargs` go to the loss (a token count)."""
    parts = loss_parts(loss_fn, outputs, targets, **kwargs)
    loss = sum(parts.values()) if parts else loss_fn(outputs, targets, **kwargs)
    return loss, {name: value.detach() for name, value in parts.items()}


def add_parts(total: Dict[str, torch.Tensor], new: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {name: total.get(name, 0) + value for name, value in new.items()}


class Strategy:
    name = "strategy"
    # A one-line hint shown with an error this strategy is known to provoke.
    hint = ""

    Options = NoOptions  # the backward.* keys this strategy reads (runner.config.backward_options)

    def __init__(self, options: "Strategy.Options", updates: Optional[Updates] = None,
                 precision: Optional[Precision] = None, parallel=None,
                 first_gradient: Optional[FirstGradient] = None):
        """`precision` and `parallel` wrap the passes (runner.execution.precision, runner.execution.parallel): the
        strategy calls them and never asks which ones it holds."""
        self.options = options
        self.updates = updates or Updates()
        self.precision = precision or Precision()
        self.parallel = parallel or Single(None)
        self.first_gradient = first_gradient or FirstGradient(enabled=False)

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step, as recorded."""
        return 1

    def param_groups(self, model: nn.Module) -> List[List[nn.Parameter]]:
        """One list of parameters per optimizer the strategy steps."""
        return [list(model.parameters())]

    def with_loss_parameters(self, groups: List[List[nn.Parameter]], extra: List[nn.Parameter]):
        """`groups` with a learnable loss's parameters (uncertainty weighting): the last optimizer's."""
        return groups[:-1] + [groups[-1] + list(extra)] if extra else groups

    def check(self, model: nn.Module, loss_fn, batch_size: int) -> None:
        """Raise StrategyMismatch when the strategy does not fit the model, loss or batch size."""

    def ignored_switches(self, backward_conf) -> List[str]:
        """Options set (to a value other than their default) for another strategy. Like `full`
        ignoring backward.accumulation, they are ignored with a warning, so that one sweep can cross
        strategies with every option. backward.accumulation itself is the sweep's axis: no warning."""
        mine = {f.name for f in fields(self.Options)} | {f.name for f in fields(PassOptions)}
        defaults = option_defaults()
        warnings = []
        for option in sorted(readers_by_option()):
            value = getattr(backward_conf, option, None)
            if option in mine or option == "accumulation" or value == defaults[option]:
                continue
            shown = str(value.value if isinstance(value, Enum) else value).lower()
            warnings.append(f"backward.{option}={shown} is ignored by backward={self.name}: it applies to "
                            f"backward=" + " or ".join(readers_of(option)))
        return warnings

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """backward() of a loss, weighted for this rank and scaled for its precision."""
        self.precision.backward(self.parallel.weighted(loss), retain_graph=retain_graph)

    def forward(self, model: nn.Module, inputs):
        """The forward pass as this strategy runs it (the gradient-flow table replays it)."""
        return model(inputs)

    def step(self, model, loss_fn, optimizers, inputs, targets, sizes=None) -> StepResult:
        """One optimizer step on (inputs, targets). `sizes`: the loader's micro-batches (loader
        mode), which a micro-batched strategy backwards as drawn; the others ignore it."""
        raise NotImplementedError

    def apply(self, model: nn.Module, optimizers, micro_batches: int = 1) -> torch.Tensor:
        """Clip (once per step unless clipped per micro-batch), step every optimizer, advance their
        schedules (once, or once per micro-batch). Returns the gradient norm before clipping."""
        updates, precision = self.updates, self.precision
        params = parameters_of(optimizers)
        precision.before_step(optimizers, params)  # float32 buffers back into .grad; GradScaler's unscale_
        clipped_per_micro_batch = "clip_every" in PER_MICRO_BATCH_UPDATES.get(self.name, ())
        if updates.clip_norm and not (updates.clip_every == "micro_batch" and clipped_per_micro_batch):
            norm = self.parallel.plain(torch.nn.utils.clip_grad_norm_(params, updates.clip_norm))
        else:
            norm = self.parallel.grad_norm(params)
        self.first_gradient.keep(params)
        for opt in optimizers:
            precision.step(opt)
        self.advance_schedules(optimizers, micro_batches)
        precision.after_step()  # GradScaler's update: once per optimizer step
        return norm

    def advance_schedules(self, optimizers, micro_batches: int) -> None:
        """Each optimizer's LR schedule, once per optimizer step, or once per micro-batch with
        optim.scheduler_every=micro_batch: k times too fast (what Accelerate's adjust_scheduler avoids)."""
        for opt in optimizers:
            scheduler = self.updates.schedulers.get(id(opt))
            if scheduler is not None:
                for _ in range(micro_batches if self.updates.scheduler_every == "micro_batch" else 1):
                    scheduler.step()

    def clip_after_backward(self, optimizers) -> None:
        """clip_every=micro_batch: clip the running gradient after each micro-batch's backward, as
        a loop that calls clip_grad_norm_ inside its accumulation loop does (the bug)."""
        if self.updates.clip_norm and self.updates.clip_every == "micro_batch":
            torch.nn.utils.clip_grad_norm_(parameters_of(optimizers), self.updates.clip_norm)

    @staticmethod
    def zero_grad(optimizers) -> None:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)


STRATEGIES = Registry("backward")


def register(cls):
    """A strategy by its name; it reads the backward.* options declared for that name."""
    if cls.Options is not OPTIONS.get(cls.name):
        raise TypeError(f"backward={cls.name}: declare its options in runner.config.backward_options.OPTIONS")
    return STRATEGIES.register(cls.name)(cls)


@register
class Full(Strategy):
    """One forward and one backward over the whole batch."""

    name = "full"

    def step(self, model, loss_fn, optimizers, inputs, targets, sizes=None) -> StepResult:
        self.zero_grad(optimizers)
        with self.precision.forward():
            outputs = model(inputs)  # a routed loss takes the batch's own expert load: it is the window's
            loss, parts = loss_with_parts(loss_fn, outputs, targets)
        self.backward(loss)
        norm = self.apply(model, optimizers)
        extras = {**token_count(loss_fn, targets), **load_spread(loss_fn, [routed_load(loss_fn, outputs, targets)])}
        return StepResult(loss.detach(), norm, parts, extras)


def token_count(loss_fn, targets) -> Dict[str, torch.Tensor]:
    """The `tokens` column (scored tokens of the step) for a token loss, else nothing."""
    return {TOKENS_COLUMN: loss_fn.count_tokens(targets)} if offers(loss_fn, TokenLoss) else {}


def routed_load(loss_fn, outputs, targets) -> Optional[torch.Tensor]:
    """A routed loss's tokens per expert in a forward's output (detached), else None."""
    return loss_fn.count_load(outputs["expert_mask"], targets).detach() if offers(loss_fn, RoutedLoss) else None


def load_spread(loss_fn, loads: List[Optional[torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The `expert_load_cv` column for a routed loss: the coefficient of variation (std / mean over
    the experts) of the step's tokens per expert, as its forwards routed them; else nothing."""
    if not offers(loss_fn, RoutedLoss):
        return {}
    load = torch.stack(loads).sum(dim=0)
    return {EXPERT_LOAD_CV_COLUMN: load.std(correction=0) / load.mean()}


def window_load(model, loss_fn, inputs, targets, precision: Precision) -> Dict[str, torch.Tensor]:
    """loss.aux_stats=window: the window's tokens per expert, counted once before any micro-batch's
    forward by a pass without a graph that stops at the router (Router.route: the experts never
    run), handed to every micro-batch's loss as `expert_load`, as the token count is handed as
    num_items_in_batch (torchtitan PR #4772). Nothing for other losses or aux_stats=micro_batch."""
    if not offers(loss_fn, RoutedLoss) or loss_fn.load_statistics() != "window":
        return {}
    with torch.no_grad(), precision.forward():
        return {"expert_load": loss_fn.count_load(model.route(inputs), targets)}


@dataclass
class Scored:
    """One micro-batch's loss: what is backwarded, and its exact share of the batch's loss (logged)."""

    loss: torch.Tensor
    logged: torch.Tensor
    parts: Dict[str, torch.Tensor]
    load: Optional[torch.Tensor] = None  # a routed loss's tokens per expert in this micro-batch
    last: bool = True  # the window's last micro-batch (the optimizer step follows its backward)


class SplitsBatch(Strategy):
    """A strategy that splits the batch into `backward.accumulation` micro-batches (at most one row each)."""

    @property
    def accumulation(self) -> int:
        return self.options.accumulation

    def check(self, model, loss_fn, batch_size: int) -> None:
        if self.accumulation > batch_size:
            raise StrategyMismatch(
                f"backward.accumulation={self.accumulation} is not allowed with backward={self.name}: "
                f"expected at most data.batch_size ({batch_size})")


class MicroBatched(SplitsBatch):
    """Shared by the strategies that weight and backward each micro-batch's own loss."""

    Options = MicroBatchOptions

    def scored(self, model, loss_fn, inputs, targets, sizes=None, batch_tokens=None, handed=None):
        """Each micro-batch's forward and loss, weighted so that the losses add up to the batch's.

        Mean-reduced losses are weighted by the micro-batch's share of the batch (scale=size), so
        the weighted sum is the full-batch mean exactly; a sum-reduced loss is already additive
        over examples and is added unweighted. A token loss normalised by tokens is handed the
        batch's token count, counted from the targets before any forward, and is added unweighted
        (nanoGPT's `loss / gradient_accumulation_steps` is this weighting for equal-size batches).
        In loader mode with partial_window=k, a window of k' < k micro-batches is scaled by k'/k.
        A token loss with normalize=double is scaled by 1/k on top of its token count (the bug).
        `batch_tokens`: a token loss's count of the batch's scored tokens, counted once per step.
        `handed`: what else every micro-batch's loss is handed (the window's expert load, window_load).

        The logged value is always the micro-batch's exact share of the batch's loss as the full
        batch computes it, whatever the weighting: the `loss` column never changes with the split.
        Except for a load-balancing term computed from each micro-batch's own expert load
        (loss.aux_stats=micro_batch): `loss_aux` logs the term its micro-batches trained on.
        """
        mbs = micro_batches(inputs, targets, self.accumulation, self.options.scale, sizes)
        window = len(mbs) / self.accumulation if sizes is not None and \
            self.options.partial_window == PartialWindow.k else 1.0
        normalization = loss_fn.normalization() if batch_tokens is not None else None
        for index, mb in enumerate(mbs):
            # Open across the yield, so that a strategy's backward of this micro-batch runs inside
            # it too (a parallel unit's sync context must cover both).
            with self.parallel.sync(index, len(mbs)):
                with self.precision.forward():
                    outputs = model(mb.inputs)
                    if normalization in ("tokens", "double"):
                        loss, parts = loss_with_parts(loss_fn, outputs, mb.targets, num_items_in_batch=batch_tokens,
                                                      **(handed or {}))
                        # double: divided by the window's tokens and again by k (TRL #2617)
                        weight, share = (1.0 / self.accumulation if normalization == "double" else 1.0), 1.0
                    else:
                        loss, parts = loss_with_parts(loss_fn, outputs, mb.targets, **(handed or {}))
                        weight = 1.0 if is_sum_reduced(loss_fn) else mb.weight
                        share = exact_share(loss_fn, mb.targets, batch_tokens, mb.share)
                factor = weight * window
                yield Scored(loss if factor == 1.0 else factor * loss, loss.detach() * share,
                             {name: value * share for name, value in parts.items()},
                             routed_load(loss_fn, outputs, mb.targets), index == len(mbs) - 1)


@register
class Sum(MicroBatched):
    """One backward of the weighted sum of micro-batch losses: every micro-batch graph is held."""

    name = "sum"

    def step(self, model, loss_fn, optimizers, inputs, targets, sizes=None) -> StepResult:
        self.zero_grad(optimizers)
        total, logged, parts, count, loads = 0, 0, {}, 0, []
        extras = token_count(loss_fn, targets)
        handed = window_load(model, loss_fn, inputs, targets, self.precision)
        for scored in self.scored(model, loss_fn, inputs, targets, sizes, extras.get(TOKENS_COLUMN), handed):
            total, logged = total + scored.loss, logged + scored.logged
            parts, count = add_parts(parts, scored.parts), count + 1
            loads.append(scored.load)
        self.backward(total)
        norm = self.apply(model, optimizers, count)
        return StepResult(logged, norm, parts, {**extras, **load_spread(loss_fn, loads)})


@register
class Accumulate(MicroBatched):
    """Backward per micro-batch; .grad accumulates; one optimizer step. One graph held at a time.

    backward.step_in_backward=last|every moves the step into backward(), as PyTorch's tutorial "How to
    save memory by fusing the optimizer step into the backward pass" does (pytorch/tutorials #2568):
    one optimizer per parameter, built from the same optim.* factory, stepped by that parameter's
    Tensor.register_post_accumulate_grad_hook, which then frees its .grad. `last` lets .grad accumulate
    over the window and steps in the last micro-batch's backward: the ordinary step, exactly. `every`
    steps in every micro-batch's backward, as the tutorial's hook does when a loop accumulates (pytorch
    #124523, open; DeepSpeed #8443 for Muon): k steps per window on 1/k-weighted micro-batch gradients,
    which Adam's scale invariance turns into k full-size steps.
    """

    name = "accumulate"

    Options = AccumulateOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._owner: Dict[nn.Parameter, torch.optim.Optimizer] = {}  # step_in_backward: parameter -> its optimizer
        self._stepping = False  # step_in_backward: whether this backward's hooks step
        self._stepped: List[torch.Tensor] = []  # the squared norms of the gradients the hooks stepped with

    @property
    def steps_in_backward(self) -> bool:
        return self.options.step_in_backward != StepInBackward.off

    def param_groups(self, model: nn.Module) -> List[List[nn.Parameter]]:
        if self.steps_in_backward:  # one optimizer per parameter: its hook steps it alone
            return [[p] for p in model.parameters()]
        return super().param_groups(model)

    def with_loss_parameters(self, groups, extra):
        return groups + [[p] for p in extra] if self.steps_in_backward else super().with_loss_parameters(groups, extra)

    def step(self, model, loss_fn, optimizers, inputs, targets, sizes=None) -> StepResult:
        if self.steps_in_backward:
            self._hook(optimizers)
        self.zero_grad(optimizers)  # once, before the loop: backward() adds into .grad
        logged, parts, loads, ema = [], {}, [], self.updates.ema
        extras = token_count(loss_fn, targets)
        handed = window_load(model, loss_fn, inputs, targets, self.precision)
        for scored in self.scored(model, loss_fn, inputs, targets, sizes, extras.get(TOKENS_COLUMN), handed):
            self._stepping = self.steps_in_backward and (
                scored.last or self.options.step_in_backward == StepInBackward.every)
            self.backward(scored.loss)  # the graph of this micro-batch is freed here
            self.clip_after_backward(optimizers)
            if ema is not None and not scored.last:  # ema_every=micro_batch: the loop averages after the step
                ema.after_micro_batch(model)
            logged.append(scored.logged)
            parts = add_parts(parts, scored.parts)
            loads.append(scored.load)
        self._stepping = False
        norm = self._after_hooks(optimizers, len(logged)) if self.steps_in_backward else \
            self.apply(model, optimizers, len(logged))
        return StepResult(torch.stack(logged).sum(), norm, parts, {**extras, **load_spread(loss_fn, loads)})

    def _hook(self, optimizers) -> None:
        """Register each parameter's post-accumulate-grad hook, once (on the first step: the probes
        before training backward the model without them)."""
        if self._owner:
            return
        for opt in optimizers:
            for p in parameters_of([opt]):
                self._owner[p] = opt
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(self._step_parameter)

    @torch.no_grad()
    def _step_parameter(self, p: nn.Parameter) -> None:
        """Called by autograd once p.grad holds this backward's gradient: step p and free p.grad."""
        if not self._stepping:
            return  # the window goes on: .grad accumulates
        opt = self._owner[p]
        self._stepped.append(p.grad.detach().double().pow(2).sum())
        self.first_gradient.keep([p])
        self.precision.step(opt)
        opt.zero_grad(set_to_none=True)

    def _after_hooks(self, optimizers, micro_batches: int) -> torch.Tensor:
        """The step's remainder once the hooks stepped: the schedules (once per step, or per micro-batch
        with optim.scheduler_every=micro_batch); returns the norm of the gradients the hooks stepped with
        (the window's gradient for `last`; for `every`, the root of the k micro-batch steps' squared norms)."""
        self.advance_schedules(optimizers, micro_batches)
        self.precision.after_step()
        stepped, self._stepped = self._stepped, []
        dtype = next(iter(self._owner)).dtype
        return torch.stack(stepped).sum().sqrt().to(dtype) if stepped else torch.zeros((), dtype=dtype)


@runtime_checkable
class Embedder(Protocol):
    """A model that maps each example to its embedding from that example alone: backward=gradcache
    embeds the batch micro-batch by micro-batch, twice (model=dual_encoder)."""

    def embed(self, inputs: torch.Tensor) -> torch.Tensor: ...


class RandomState:
    """The random state a forward starts from, taken before it and replayed for a second forward,
    so that dropout draws the same masks (torch.utils.checkpoint's preserve_rng_state;
    sentence-transformers' RandContext in CachedMultipleNegativesRankingLoss). The replay runs in a
    fork: afterwards the generators are where the first forward left them."""

    def __init__(self, device: torch.device):
        self.devices = [device] if device.type == "cuda" else []
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextmanager
    def replayed(self):
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


@register
class GradCache(SplitsBatch):
    """GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
    Setup"; luyug/GradCache; sentence-transformers' CachedMultipleNegativesRankingLoss, #2916): a
    loss with in-batch negatives couples the batch, so a micro-batch's own loss is not its share of
    the batch's (accumulate sees 1/k of the negatives). Instead:

    1. embed every micro-batch without a graph, keeping the random state each started from;
    2. take the loss on the whole batch's embeddings and its gradient with respect to them;
    3. forward each micro-batch again with a graph (the same dropout masks: its random state
       replayed) and backward its slice of the cached gradient.

    The chain rule makes that the full batch's gradient, while autograd holds the loss's graph
    and then one micro-batch's graph at a time. The price: every forward runs twice.
    """

    name = "gradcache"

    Options = GradCacheOptions

    def check(self, model, loss_fn, batch_size: int) -> None:
        super().check(model, loss_fn, batch_size)
        if not offers(model, Embedder):
            raise StrategyMismatch("it needs a model offering embed(inputs), one embedding per example from that "
                                   "example alone (the Embedder protocol: model=dual_encoder)", misfit="model")
        if not offers(loss_fn, EmbeddingLoss):
            raise StrategyMismatch("it needs a loss over the batch's embeddings offering similarity(queries, keys) "
                                   "(the EmbeddingLoss protocol: loss=infonce)", misfit="loss")

    def step(self, model, loss_fn, optimizers, inputs, targets, sizes=None) -> StepResult:
        self.zero_grad(optimizers)
        mbs = micro_batches(inputs, targets, self.accumulation, "size", sizes)
        states, cached = [], []
        with torch.no_grad():  # 1. embeddings only: no graph is kept
            for mb in mbs:
                states.append(RandomState(mb.inputs.device))
                with self.precision.forward():
                    cached.append(model.embed(mb.inputs))
        # 2. The loss on the whole batch; its backward leaves d loss / d embeddings in .grad (and a
        # learnable loss's own gradients), scaled as the precision scales a loss.
        embeddings = torch.cat(cached).requires_grad_()
        with self.precision.forward():
            loss, parts = loss_with_parts(loss_fn, embeddings, targets)
        self.backward(loss)
        gradients = embeddings.grad.split([len(c) for c in cached])
        for mb, state, gradient in zip(mbs, states, gradients):  # 3. one micro-batch graph at a time
            with state.replayed(), self.precision.forward():
                embedded = model.embed(mb.inputs)
            self.precision.backward_from(embedded, gradient)
        norm = self.apply(model, optimizers)
        return StepResult(loss.detach(), norm, parts, token_count(loss_fn, targets))


def cosine(a: List[torch.Tensor], b: List[torch.Tensor]) -> torch.Tensor:
    flat_a, flat_b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0)


def combined_norm(norms: List[torch.Tensor]) -> torch.Tensor:
    """One number for several steps' gradients: the root of the sum of their squared norms."""
    return torch.linalg.vector_norm(torch.stack(norms))


@register
class Separate(Strategy):
    """Multi-task: one backward per weighted task loss (retain_graph on all but the last), then
    one optimizer step: the same gradient as backward of the sum. step_per_task=true steps after
    each task's backward, as the multi-task answer's second snippet does; reforward=true runs the
    forward again after each step (as PyTorch's DCGAN example does) and so also steps per task.

    Records the cosine similarity of the tasks' gradients on the shared trunk (grad_cos_<a>_<b>),
    a by-product of the per-task backwards. full/sum/accumulate do not record it: they would need
    an extra backward per task, which would skew the time and memory they are compared on.
    """

    name = "separate"
    hint = ("optimizer.step() changed weights that the retained graph still needs: step once after "
            "all task backwards (backward.step_per_task=false), re-run the forward after each step "
            "(backward.reforward=true), or backward the summed loss")

    Options = SeparateOptions

    def check(self, model, loss_fn, batch_size: int) -> None:
        if not offers(loss_fn, MultiPartLoss):
            raise StrategyMismatch("it needs a loss made of parts (loss=multitask with model=multitask, "
                                   "or any loss on model=two_stage)", misfit="loss")

    @property
    def steps_per_task(self) -> bool:
        return self.options.step_per_task or self.options.reforward

    def step(self, model, loss_fn, optimizers, inputs, targets, sizes=None) -> StepResult:
        shared = model.shared_parameters() if offers(model, SharedTrunk) else []
        self.zero_grad(optimizers)
        with self.precision.forward():
            parts = loss_fn.parts(model(inputs), targets)
        names = list(parts)
        values, task_grads, norms = {}, {}, []
        for i, name in enumerate(names):
            if i > 0 and self.options.reforward:
                with self.precision.forward():
                    parts = loss_fn.parts(model(inputs), targets)  # a fresh graph on the stepped weights
            before = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in shared]
            last = i == len(names) - 1
            self.backward(parts[name], retain_graph=not last and not self.options.reforward)
            values[name] = parts[name].detach()
            task_grads[name] = [(p.grad if p.grad is not None else torch.zeros_like(p)) - b
                                for p, b in zip(shared, before)]
            if self.steps_per_task:
                norms.append(self.apply(model, optimizers))
                self.zero_grad(optimizers)
        if not self.steps_per_task:
            norms.append(self.apply(model, optimizers))
        extras = {}
        if shared:
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    extras[grad_cos_column(a, b)] = cosine(task_grads[a], task_grads[b]).detach()
        return StepResult(sum(values.values()), combined_norm(norms), values, extras)


class Chained(Strategy):
    """Two chained models with two optimizers, in the chained-models answer's loop order:
    zero stage-2 grads, backward stage-2 loss, step stage 2; zero stage-1 grads, backward
    stage-1 loss, step stage 1. Optimizer 1 owns stage 1; optimizer 2 owns stage 2, or both
    stages with backward.joint=true (the answer's itertools.chain caveat)."""

    retain_graph = False
    detach = False

    Options = ChainedOptions

    def check(self, model, loss_fn, batch_size: int) -> None:
        if not isinstance(model, TwoStageModel):
            raise StrategyMismatch("it needs two chained models (model=two_stage)", misfit="model")

    def param_groups(self, model: nn.Module) -> List[List[nn.Parameter]]:
        stage1, stage2 = list(model.stage1.parameters()), list(model.stage2.parameters())
        return [stage1, stage1 + stage2 if self.options.joint else stage2]

    def forward(self, model, inputs):
        return model(inputs, detach=self.detach)

    def step(self, model, loss_fn, optimizers, inputs, targets, sizes=None) -> StepResult:
        optimizer1, optimizer2 = optimizers
        with self.precision.forward():
            parts = loss_fn.parts(self.forward(model, inputs), targets)
        l1, l2 = parts["stage1"], parts["stage2"]
        optimizer2.zero_grad()
        self.backward(l2, retain_graph=self.retain_graph)
        norm2 = self.apply(model, [optimizer2])
        optimizer1.zero_grad()
        self.backward(l1)
        norm1 = self.apply(model, [optimizer1])
        values = {"stage1": l1.detach(), "stage2": l2.detach()}
        return StepResult(values["stage1"] + values["stage2"], combined_norm([norm1, norm2]), values)


@register
class Naive(Chained):
    """Reproduces "Trying to backward through the graph a second time" on purpose."""

    name = "naive"
    hint = ("stage 2's backward freed the graph that stage 1's loss shares: pass retain_graph=True to "
            "the first backward (backward=retain_graph) or feed stage 2 a.detach() (backward=detach)")


@register
class RetainGraph(Chained):
    name = "retain_graph"
    retain_graph = True


@register
class Detach(Chained):
    name = "detach"
    detach = True


def build_strategy(backward_conf, updates: Optional[Updates] = None, precision: Optional[Precision] = None,
                   parallel=None, first_gradient: Optional[FirstGradient] = None) -> Strategy:
    """The strategy `backward.name` picks, given the backward.* options it declares."""
    cls = STRATEGIES.get(backward_conf.name)
    return cls(cls.Options(**{f.name: getattr(backward_conf, f.name) for f in fields(cls.Options)}), updates,
               precision, parallel, first_gradient)
