"""The update rule: the one object that turns the gradients a strategy accumulated into an update.

    rule.begin(optimizers)                  once before a window's backwards: zero_grad
    rule.before_backward(last, optimizers)  before each micro-batch's backward (optimizer-in-backward arms here;
                                            backward.keep=last drops what the earlier ones left)
    rule.after_backward(optimizers, last)   after each micro-batch's backward: the per-micro-batch bug modes
    rule.apply(optimizers, micro_batches)   once per optimizer step: unscale, clip, first gradient, step,
                                            the learning-rate schedule, GradScaler's update, the EMA

Each behaviour declares its own cadence: clipping (optim.clip_every), the schedule
(optim.scheduler_every) and the weights' average (trainer.ema_every) run once per optimizer step,
or once per micro-batch for the accumulation bugs; the first gradient is taken once. So a strategy
never asks which behaviours run when: it calls the rule at these four points, and the engine
(runner.execution.parallel) does each call the way its ranks and precision need.

`InBackwardUpdate` is the rule of backward.step_in_backward: the step moves into backward().
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from runner.execution.parallel import Single
from runner.execution.precision import FirstGradient


def parameters_of(optimizers) -> List[nn.Parameter]:
    return [p for opt in optimizers for group in opt.param_groups for p in group["params"]]


@dataclass
class UpdateRule:
    engine: Single = field(default_factory=lambda: Single(None))
    schedulers: Dict[int, object] = field(default_factory=dict)  # id(optimizer) -> its LR scheduler
    scheduler_every: str = "step"  # or micro_batch: k times too fast (what Accelerate's adjust_scheduler avoids)
    clip_norm: float = 0.0  # 0 = no clipping
    clip_every: str = "step"  # or micro_batch: the running gradient clipped after each backward (the bug)
    # trainer.ema: the weights' moving average (runner.training.ema.WeightAverage) of `model`, or None.
    ema: Optional[object] = None
    model: Optional[nn.Module] = None
    first_gradient: FirstGradient = field(default_factory=lambda: FirstGradient(enabled=False))
    # backward.keep: "all" (.grad adds up every micro-batch's); "last": each backward starts from zero, so
    # the step sees the last micro-batch's gradient alone (the accumulator-reset bug); "first": the later
    # backwards' additions are undone, so the step sees the first micro-batch's alone (a dropped copy).
    keep: str = "all"

    def __post_init__(self):
        self._clipped = False  # whether this window's gradient was clipped per micro-batch already
        self._window: Optional[list] = None  # the optimizers of a window whose first backward ran
        self._first: Optional[Dict[nn.Parameter, torch.Tensor]] = None  # keep=first: the first backward's .grad

    def begin(self, optimizers) -> None:
        """Before a window's backwards, once: backward() adds into .grad."""
        self.engine.zero_grad(optimizers)
        self._clipped = False
        self._window = None
        self._first = None

    def before_backward(self, last: bool, optimizers=None) -> None:
        """Before a micro-batch's backward; `last`: the optimizer step follows it. keep=last drops what the
        earlier micro-batches left in .grad (their forwards and losses ran as usual)."""
        if self.keep == "last" and self._window is not None:
            self.engine.zero_grad(self._window)
        self._window = optimizers

    def after_backward(self, optimizers, last: bool) -> None:
        """After a micro-batch's backward (inside its sync context): the behaviours whose cadence is
        the micro-batch. Clipping inside the accumulation loop clips the running gradient, as a loop
        that calls clip_grad_norm_ there does; the average moves on weights not yet stepped, and on
        the last micro-batch only after the step (runner.training.ema). keep=first puts back the first
        backward's .grad, dropping what this one added."""
        if self.keep == "first":
            self._keep_first(optimizers)
        if self.clip_norm and self.clip_every == "micro_batch":
            torch.nn.utils.clip_grad_norm_(parameters_of(optimizers), self.clip_norm)
            self._clipped = True
        if self.ema is not None and not last:
            self.ema.after_micro_batch(self.model)

    @torch.no_grad()
    def _keep_first(self, optimizers) -> None:
        params = [p for p in parameters_of(optimizers) if p.grad is not None]
        if self._first is None:
            self._first = {p: p.grad.clone() for p in params}
            return
        for p in params:  # a parameter the first backward did not reach keeps no gradient either
            first = self._first.get(p)
            p.grad.copy_(first) if first is not None else p.grad.zero_()

    def apply(self, optimizers, micro_batches: int = 1, average: bool = True) -> torch.Tensor:
        """The optimizer step: true gradients (unscaled, float32 buffers back), clipped once unless
        clipped per micro-batch, taken for first_grad.pt, stepped; then the schedules, GradScaler's
        update and (`average`: the loop step's last update) the EMA. Returns the norm before clipping."""
        engine, params = self.engine, parameters_of(optimizers)
        engine.unscale(optimizers, params)
        norm = engine.clip(params, self.clip_norm) if self.clip_norm and not self._clipped else engine.grad_norm(params)
        self.first_gradient.keep(params)
        for opt in optimizers:
            engine.step(opt)
        self.advance_schedules(optimizers, micro_batches)
        engine.after_step()
        if average:
            self.average()
        self._clipped = False
        return norm

    def average(self) -> None:
        """The EMA's update after an optimizer step, on the stepped weights."""
        if self.ema is not None:
            self.ema.update(self.model)

    def advance_schedules(self, optimizers, micro_batches: int) -> None:
        """Each optimizer's LR schedule, once per optimizer step, or once per micro-batch."""
        for opt in optimizers:
            scheduler = self.schedulers.get(id(opt))
            if scheduler is not None:
                for _ in range(micro_batches if self.scheduler_every == "micro_batch" else 1):
                    scheduler.step()


@dataclass
class InBackwardUpdate(UpdateRule):
    """backward.step_in_backward=last|every, as PyTorch's tutorial "How to save memory by fusing the
    optimizer step into the backward pass" does (pytorch/tutorials #2568): one optimizer per parameter
    (the strategy's param_groups), stepped by that parameter's Tensor.register_post_accumulate_grad_hook,
    which then frees its .grad. `last` lets .grad accumulate over the window and steps in the last
    micro-batch's backward: the ordinary step, exactly. `every` steps in every micro-batch's backward,
    as the tutorial's hook does when a loop accumulates (pytorch #124523, open; DeepSpeed #8443 for
    Muon): k steps per window on 1/k-weighted gradients, which Adam's scale invariance makes k full steps.
    Clipping, several processes, fp16 and float32 buffers are refused with it (runner.config.schema)."""

    every: bool = False

    def __post_init__(self):
        super().__post_init__()
        self._owner: Dict[nn.Parameter, torch.optim.Optimizer] = {}  # parameter -> its optimizer
        self._stepping = False  # whether this backward's hooks step
        self._stepped: List[torch.Tensor] = []  # the squared norms of the gradients the hooks stepped with

    def begin(self, optimizers) -> None:
        """Register each parameter's hook, once (on the first step: the probes before training
        backward the model without them); then zero_grad."""
        if not self._owner:
            for opt in optimizers:
                for p in parameters_of([opt]):
                    self._owner[p] = opt
                    if p.requires_grad:
                        p.register_post_accumulate_grad_hook(self._step_parameter)
        super().begin(optimizers)

    def before_backward(self, last: bool, optimizers=None) -> None:
        self._stepping = last or self.every

    @torch.no_grad()
    def _step_parameter(self, p: nn.Parameter) -> None:
        """Called by autograd once p.grad holds this backward's gradient: step p and free p.grad."""
        if not self._stepping:
            return  # the window goes on: .grad accumulates
        opt = self._owner[p]
        self._stepped.append(p.grad.detach().double().pow(2).sum())
        self.first_gradient.keep([p])
        self.engine.step(opt)
        opt.zero_grad(set_to_none=True)

    def apply(self, optimizers, micro_batches: int = 1, average: bool = True) -> torch.Tensor:
        """The step's remainder once the hooks stepped: the schedules, GradScaler's update, the EMA.
        Returns the norm of the gradients the hooks stepped with (the window's gradient for `last`;
        for `every`, the root of the k micro-batch steps' squared norms)."""
        self._stepping = False
        self.advance_schedules(optimizers, micro_batches)
        self.engine.after_step()
        if average:
            self.average()
        stepped, self._stepped = self._stepped, []
        dtype = next(iter(self._owner)).dtype
        return torch.stack(stepped).sum().sqrt().to(dtype) if stepped else torch.zeros((), dtype=dtype)
