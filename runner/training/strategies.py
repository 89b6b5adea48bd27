"""Backward strategies: each reads as the loop of the answer it reproduces.

A strategy is one small class registered by name; the backward.* options it reads are its
`Options`, declared by its name in runner.config.backward_options (the config schema is built from
them without importing this module); adding one is a class here, its options entry there, and a
YAML file in conf/backward/. `step()` runs one optimizer step on one batch:

    for each micro-batch, under the engine's sync and autocast contexts:
        backward of its exactly weighted loss (runner.training.weighting)
    then the update (runner.training.update: unscale, clip, step, schedule, EMA)

It calls backward() and the optimizer step only through the engine (runner.execution.parallel)
and the update rule, and returns detached tensors only (no .item(): on a GPU the loop reads them
back in batches, never once per step). What a strategy needs from a model or a loss beyond
`model(inputs)` and `loss(outputs, targets)` is written down as a Protocol (SharedTrunk,
TwoStageModel, Embedder here; MultiPartLoss, TokenLoss, RoutedLoss, EmbeddingLoss in
runner.components.losses; Router in runner.components.models).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Dict, List, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from runner.components.data import micro_batches
from runner.components.losses import EmbeddingLoss, MultiPartLoss, offers
from runner.config.backward_options import (
    OPTIONS,
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
from runner.recording.record import TOKENS_COLUMN, grad_cos_column
from runner.training.update import InBackwardUpdate, UpdateRule
from runner.training.weighting import (
    Weighting,
    add_parts,
    load_spread,
    loss_with_parts,
    routed_load,
    token_count,
    window_load,
)


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


class Strategy:
    name = "strategy"
    # A one-line hint shown with an error this strategy is known to provoke.
    hint = ""

    Options = NoOptions  # the backward.* keys this strategy reads (runner.config.backward_options)

    def __init__(self, options: "Strategy.Options", update: Optional[UpdateRule] = None):
        """`update`: the rule that turns gradients into an update, holding the engine that runs the
        passes (runner.training.update, runner.execution.parallel); the strategy never asks which."""
        self.options = options
        self.update = update or UpdateRule()

    @property
    def engine(self):
        return self.update.engine

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

    def forward(self, model: nn.Module, inputs):
        """The forward pass as this strategy runs it (the gradient-flow table replays it)."""
        return model(inputs)

    def step(self, model, loss_fn, optimizers, inputs, targets, sizes=None, rank_weight=None) -> StepResult:
        """One optimizer step on (inputs, targets). `sizes`: the loader's micro-batches (loader
        mode), which a micro-batched strategy backwards as drawn; the others ignore it.
        `rank_weight`: this rank's loss weight (runner.training.weighting.rank_shard; None in one process)."""
        raise NotImplementedError


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

    def check(self, model, loss_fn, batch_size: int) -> None:
        counted = getattr(loss_fn, "count_window", 0)
        if counted:
            raise StrategyMismatch(f"loss.count_window={counted} is not allowed with backward=full: it counts tokens "
                                   "over M micro-batches of an accumulating window, expected backward=accumulate or sum")

    def step(self, model, loss_fn, optimizers, inputs, targets, sizes=None, rank_weight=None) -> StepResult:
        engine, update = self.engine, self.update
        update.begin(optimizers)
        with engine.autocast():
            outputs = model(inputs)  # a routed loss takes the batch's own expert load: it is the window's
            loss, parts = loss_with_parts(loss_fn, outputs, targets)
        engine.backward(loss, rank_weight)
        norm = update.apply(optimizers)
        extras = {**token_count(loss_fn, targets), **load_spread(loss_fn, [routed_load(loss_fn, outputs, targets)])}
        return StepResult(loss.detach(), norm, parts, extras)


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

    def weighting(self, model, loss_fn, inputs, targets, sizes, tokens) -> Weighting:
        """The weights of this window's micro-batches (runner.training.weighting). In loader mode with
        partial_window=k, a window of k' < k micro-batches is scaled by k'/k, as if it were full."""
        window = len(sizes) / self.accumulation if sizes is not None and \
            self.options.partial_window == PartialWindow.k else 1.0
        handed = window_load(model, loss_fn, inputs, targets, self.engine)  # the window's expert load
        return Weighting(loss_fn, self.accumulation, self.options.scale, window, tokens, handed)


@register
class Sum(MicroBatched):
    """One backward of the weighted sum of micro-batch losses: every micro-batch graph is held."""

    name = "sum"

    def step(self, model, loss_fn, optimizers, inputs, targets, sizes=None, rank_weight=None) -> StepResult:
        engine, update = self.engine, self.update
        update.begin(optimizers)
        extras = token_count(loss_fn, targets)
        weighting = self.weighting(model, loss_fn, inputs, targets, sizes, extras.get(TOKENS_COLUMN))
        total, logged, parts, loads = 0, 0, {}, []
        mbs = weighting.split(inputs, targets, sizes)
        for index, mb in enumerate(mbs):
            # Each forward under its sync context, as accumulate's: the engine restores synchronisation
            # after it, so the one backward of the sum synchronises as full's does.
            with engine.sync(index, len(mbs)), engine.autocast():
                scored = weighting.score(model(mb.inputs), mb)
            total, logged, parts = total + scored.loss, logged + scored.logged, add_parts(parts, scored.parts)
            loads.append(scored.load)
        engine.backward(total, rank_weight)
        norm = update.apply(optimizers, len(mbs))
        return StepResult(logged, norm, parts, {**extras, **load_spread(loss_fn, loads)})


@register
class Accumulate(MicroBatched):
    """Backward per micro-batch; .grad accumulates; one optimizer step. One graph held at a time.
    With backward.step_in_backward the update rule steps inside backward (InBackwardUpdate)."""

    name = "accumulate"

    Options = AccumulateOptions

    @property
    def steps_in_backward(self) -> bool:
        """backward.step_in_backward: each parameter's hook steps it alone, with an optimizer of its own."""
        return self.options.step_in_backward != StepInBackward.off

    def param_groups(self, model: nn.Module) -> List[List[nn.Parameter]]:
        if self.steps_in_backward:
            return [[p] for p in model.parameters()]
        return super().param_groups(model)

    def with_loss_parameters(self, groups, extra):
        if self.steps_in_backward:
            return groups + [[p] for p in extra]
        return super().with_loss_parameters(groups, extra)

    def step(self, model, loss_fn, optimizers, inputs, targets, sizes=None, rank_weight=None) -> StepResult:
        engine, update = self.engine, self.update
        update.begin(optimizers)  # zero_grad once, before the loop: backward() adds into .grad
        extras = token_count(loss_fn, targets)  # a token loss's window count, taken before any forward
        weighting = self.weighting(model, loss_fn, inputs, targets, sizes, extras.get(TOKENS_COLUMN))
        logged, parts, loads = [], {}, []
        mbs = weighting.split(inputs, targets, sizes)
        for index, mb in enumerate(mbs):
            last = index == len(mbs) - 1
            # The engine synchronises gradients in the micro-batch backward.sync picks (the others add
            # up locally): its context covers the backward.
            with engine.sync(index, len(mbs)):
                with engine.autocast():
                    scored = weighting.score(model(mb.inputs), mb)  # the exactly weighted loss
                update.before_backward(last, optimizers)
                engine.backward(scored.loss, rank_weight)  # this micro-batch's graph is freed here
                update.after_backward(optimizers, last)  # the per-micro-batch bug modes, if chosen
            logged.append(scored.logged)
            parts = add_parts(parts, scored.parts)
            loads.append(scored.load)
        norm = update.apply(optimizers, len(mbs))  # unscale, clip, step, schedule, EMA
        return StepResult(torch.stack(logged).sum(), norm, parts, {**extras, **load_spread(loss_fn, loads)})


def build_update(backward_conf, engine, **behaviours) -> UpdateRule:
    """The update rule backward.* chooses: the step after the window's backwards, or inside them
    (backward.step_in_backward: InBackwardUpdate). `behaviours`: UpdateRule's clipping, schedules, EMA."""
    mode = backward_conf.step_in_backward if backward_conf.name in readers_of("step_in_backward") \
        else StepInBackward.off
    if mode != StepInBackward.off:
        return InBackwardUpdate(engine, **behaviours, every=mode == StepInBackward.every)
    keep = getattr(backward_conf.keep, "value", backward_conf.keep) if backward_conf.name in readers_of("keep") \
        else "all"
    return UpdateRule(engine, **behaviours, keep=keep)


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

    def step(self, model, loss_fn, optimizers, inputs, targets, sizes=None, rank_weight=None) -> StepResult:
        engine, update = self.engine, self.update
        update.begin(optimizers)
        mbs = micro_batches(inputs, targets, self.accumulation, "size", sizes)
        states, cached = [], []
        with torch.no_grad():  # 1. embeddings only: no graph is kept
            for mb in mbs:
                states.append(RandomState(mb.inputs.device))
                with engine.autocast():
                    cached.append(model.embed(mb.inputs))
        # 2. The loss on the whole batch; its backward leaves d loss / d embeddings in .grad (and a
        # learnable loss's own gradients), scaled as the precision scales a loss.
        embeddings = torch.cat(cached).requires_grad_()
        with engine.autocast():
            loss, parts = loss_with_parts(loss_fn, embeddings, targets)
        engine.backward(loss, rank_weight)
        gradients = embeddings.grad.split([len(c) for c in cached])
        for mb, state, gradient in zip(mbs, states, gradients):  # 3. one micro-batch graph at a time
            with state.replayed(), engine.autocast():
                embedded = model.embed(mb.inputs)
            engine.backward_from(embedded, gradient)
        norm = update.apply(optimizers)
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

    def step(self, model, loss_fn, optimizers, inputs, targets, sizes=None, rank_weight=None) -> StepResult:
        engine, update = self.engine, self.update
        shared = model.shared_parameters() if offers(model, SharedTrunk) else []
        update.begin(optimizers)
        with engine.autocast():
            parts = loss_fn.parts(model(inputs), targets)
        names = list(parts)
        values, task_grads, norms = {}, {}, []
        for i, name in enumerate(names):
            if i > 0 and self.options.reforward:
                with engine.autocast():
                    parts = loss_fn.parts(model(inputs), targets)  # a fresh graph on the stepped weights
            before = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in shared]
            last = i == len(names) - 1
            engine.backward(parts[name], rank_weight, retain_graph=not last and not self.options.reforward)
            values[name] = parts[name].detach()
            task_grads[name] = [(p.grad if p.grad is not None else torch.zeros_like(p)) - b
                                for p, b in zip(shared, before)]
            if self.steps_per_task:  # the weights' average moves once per loop step, after the last
                norms.append(update.apply(optimizers, average=last))
                update.begin(optimizers)
        if not self.steps_per_task:
            norms.append(update.apply(optimizers))
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

    def step(self, model, loss_fn, optimizers, inputs, targets, sizes=None, rank_weight=None) -> StepResult:
        engine, update = self.engine, self.update
        optimizer1, optimizer2 = optimizers
        with engine.autocast():
            parts = loss_fn.parts(self.forward(model, inputs), targets)
        l1, l2 = parts["stage1"], parts["stage2"]
        update.begin([optimizer2])
        engine.backward(l2, rank_weight, retain_graph=self.retain_graph)
        norm2 = update.apply([optimizer2], average=False)  # the weights' average moves after both steps
        update.begin([optimizer1])
        engine.backward(l1, rank_weight)
        norm1 = update.apply([optimizer1])
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


def build_strategy(backward_conf, update: Optional[UpdateRule] = None) -> Strategy:
    """The strategy `backward.name` picks, given the backward.* options it declares, and the update rule."""
    cls = STRATEGIES.get(backward_conf.name)
    return cls(cls.Options(**{f.name: getattr(backward_conf, f.name) for f in fields(cls.Options)}), update)
