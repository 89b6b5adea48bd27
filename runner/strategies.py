"""Backward strategies: the only code that calls backward() or optimizer.step().

A strategy is one small class registered by name; adding one is a class here plus a YAML file in
conf/backward/. `step()` runs one optimizer step on one batch and returns detached tensors only
(no .item(): on a GPU the loop reads them back in batches, never once per step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn

from runner.data import micro_batches
from runner.losses import is_sum_reduced, loss_parts


@dataclass
class StepResult:
    loss: torch.Tensor  # the step's loss, as the strategy weighted it (0-dim, detached)
    grad_norm: torch.Tensor  # L2 norm of all gradients before the step (0-dim)
    parts: Dict[str, torch.Tensor] = field(default_factory=dict)  # loss_<name> columns
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)  # other per-step columns


class StrategyMismatch(ValueError):
    """The strategy does not fit the chosen model or loss."""


def grad_norm(params: Sequence[nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.to(grads[0].dtype) for n in norms]))


def detached_parts(loss_fn, outputs, targets, weight: float = 1.0) -> Dict[str, torch.Tensor]:
    return {name: weight * value.detach() for name, value in loss_parts(loss_fn, outputs, targets).items()}


def add_parts(total: Dict[str, torch.Tensor], new: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {name: total.get(name, 0) + value for name, value in new.items()}


class Strategy:
    name = "strategy"
    # A one-line hint shown with an error this strategy is known to provoke.
    hint = ""

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step, as recorded."""
        return 1

    def param_groups(self, model: nn.Module) -> List[List[nn.Parameter]]:
        """One list of parameters per optimizer the strategy steps."""
        return [list(model.parameters())]

    def check(self, model: nn.Module, loss_fn, batch_size: int) -> None:
        """Raise StrategyMismatch when the strategy does not fit the model or loss."""

    def step(self, model, loss_fn, optimizers, inputs, targets) -> StepResult:
        raise NotImplementedError

    @staticmethod
    def apply(model: nn.Module, optimizers) -> torch.Tensor:
        """Measure the gradient, then step every optimizer. Returns the gradient norm."""
        norm = grad_norm([p for opt in optimizers for g in opt.param_groups for p in g["params"]])
        for opt in optimizers:
            opt.step()
        return norm

    @staticmethod
    def zero_grad(optimizers) -> None:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)


STRATEGIES: Dict[str, Callable[..., Strategy]] = {}


def register(cls):
    STRATEGIES[cls.name] = cls
    return cls


@register
class Full(Strategy):
    """One forward and one backward over the whole batch."""

    name = "full"

    def step(self, model, loss_fn, optimizers, inputs, targets) -> StepResult:
        self.zero_grad(optimizers)
        outputs = model(inputs)
        loss = loss_fn(outputs, targets)
        loss.backward()
        norm = self.apply(model, optimizers)
        return StepResult(loss.detach(), norm, detached_parts(loss_fn, outputs, targets))


class MicroBatched(Strategy):
    """Shared by the strategies that split the batch into `backward.accumulation` micro-batches."""

    @property
    def accumulation(self) -> int:
        return self.cfg.accumulation

    def check(self, model, loss_fn, batch_size: int) -> None:
        if self.cfg.accumulation > batch_size:
            raise StrategyMismatch(
                f"backward.accumulation={self.cfg.accumulation} is not allowed with backward={self.name}: "
                f"expected at most data.batch_size ({batch_size})")

    def weighted(self, loss_fn, inputs, targets):
        """Micro-batches with the factor each one's loss is multiplied by.

        Mean-reduced losses are weighted by the micro-batch's share of the batch (scale=size), so
        the weighted sum is the full-batch mean exactly; a sum-reduced loss is already additive
        over examples and is added unweighted.
        """
        scale = getattr(self.cfg.scale, "value", self.cfg.scale)
        for mb in micro_batches(inputs, targets, self.cfg.accumulation, scale):
            yield mb, (1.0 if is_sum_reduced(loss_fn) else mb.weight)


@register
class Sum(MicroBatched):
    """One backward of the weighted sum of micro-batch losses: every micro-batch graph is held."""

    name = "sum"

    def step(self, model, loss_fn, optimizers, inputs, targets) -> StepResult:
        self.zero_grad(optimizers)
        total, parts = 0, {}
        for mb, weight in self.weighted(loss_fn, inputs, targets):
            outputs = model(mb.inputs)
            total = total + weight * loss_fn(outputs, mb.targets)
            parts = add_parts(parts, detached_parts(loss_fn, outputs, mb.targets, weight))
        total.backward()
        norm = self.apply(model, optimizers)
        return StepResult(total.detach(), norm, parts)


@register
class Accumulate(MicroBatched):
    """Backward per micro-batch; .grad accumulates; one optimizer step. One graph held at a time."""

    name = "accumulate"

    def step(self, model, loss_fn, optimizers, inputs, targets) -> StepResult:
        self.zero_grad(optimizers)  # once, before the loop: backward() adds into .grad
        total, parts = 0, {}
        for mb, weight in self.weighted(loss_fn, inputs, targets):
            outputs = model(mb.inputs)
            loss = weight * loss_fn(outputs, mb.targets)
            loss.backward()
            total = total + loss.detach()
            parts = add_parts(parts, detached_parts(loss_fn, outputs, mb.targets, weight))
        norm = self.apply(model, optimizers)
        return StepResult(total, norm, parts)


def build_strategy(cfg) -> Strategy:
    if cfg.name not in STRATEGIES:
        raise ValueError(f"backward={cfg.name} is unknown: expected one of {sorted(STRATEGIES)}")
    return STRATEGIES[cfg.name](cfg)
