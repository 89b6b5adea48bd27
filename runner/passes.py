"""How a strategy's passes run: autocast, loss scaling, float32 accumulation of low-precision
gradients, a rank's loss weight and DDP's gradient synchronisation.

A strategy calls these hooks where it would call `model(...)`, `loss.backward()` and
`optimizer.step()`. With the defaults they are exactly those calls, so each strategy stays one
unit and every wrapper applies to all of them (DESIGN: wrappers, not copies of each strategy).

- `forward()` wraps a forward and its loss: torch.autocast (trainer.autocast=bf16|fp16).
- `micro_batch(i, count)` wraps micro-batch i's forward and backward: under DDP, `model.no_sync()`
  where this micro-batch must not synchronise (backward.sync).
- `backward(loss)`: the rank's weight, GradScaler's scale (fp16), then backward; with
  backward.grad_accum_dtype=float32 the new gradient moves into a float32 buffer.
- `before_step(optimizers)`, once per optimizer step: the float32 buffer back into .grad, then
  GradScaler's unscale_, so clipping and the optimizer see true gradients.
- `step(optimizer)`, `after_step()`: GradScaler's step (skipped when a gradient overflowed) and
  one update per optimizer step, never inside an accumulation window (PyTorch's AMP examples).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Dict, List, Optional

import torch

from runner.record import GRAD_SCALE_COLUMN, STEP_SKIPPED_COLUMN

AUTOCAST_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SYNC_POLICIES = ("last", "every", "first")


class Passes:
    def __init__(self, device_type: str = "cpu", autocast: str = "off", grad_accum_dtype: str = "param",
                 init_scale: float = 2.0 ** 16, sync: str = "last", first_grad: bool = True):
        self.device_type = device_type
        self.autocast_dtype = AUTOCAST_DTYPES[autocast]
        # fp16's narrow range needs loss scaling; bf16 has float32's range and does not.
        self.scaler = torch.amp.GradScaler(device_type, init_scale=init_scale) if autocast == "fp16" else None
        self.float32_grads = grad_accum_dtype == "float32"
        self._buffers: Dict[int, torch.Tensor] = {}  # id(parameter) -> its float32 running gradient
        self.sync = sync
        self.ddp: Optional[torch.nn.Module] = None  # the DistributedDataParallel wrapper (runner.processes)
        # A rank's weight, world size x its share of the batch (runner.processes); None in one process.
        self.loss_factor = None
        # id(parameter) -> the gradient its optimizer first applied; None once written (or off)
        self.first_grad: Optional[Dict[int, torch.Tensor]] = {} if first_grad else None
        self._columns: Dict[str, torch.Tensor] = {}
        self.params: List[torch.nn.Parameter] = []  # every optimizer's parameters (set by runner.build)

    def forward(self):
        """The context of a forward and its loss."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def micro_batch(self, index: int, count: int):
        """The context of micro-batch `index` of `count` (its forward and, where the strategy
        backwards it, its backward): DDP synchronises gradients only in the micro-batch that
        backward.sync picks; the others run under no_sync and add up locally."""
        if self.ddp is None:
            return nullcontext()
        synced = {"last": index == count - 1, "every": True, "first": index == 0}[self.sync]
        return nullcontext() if synced else self.ddp.no_sync()

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        if self.loss_factor is not None:
            loss = loss * self.loss_factor
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward(retain_graph=retain_graph)
        if self.float32_grads:
            self._to_buffers()

    def _to_buffers(self) -> None:
        """Add each new low-precision gradient into a float32 buffer and clear .grad, so the next
        micro-batch's gradient is not added in bf16 (what Megatron-LM's main_grad does)."""
        for p in self.params:
            if p.grad is None or p.grad.dtype in (torch.float32, torch.float64):
                continue
            buffer = self._buffers.get(id(p))
            self._buffers[id(p)] = p.grad.float() if buffer is None else buffer.add_(p.grad)
            p.grad = None

    def before_step(self, optimizers, params: List[torch.nn.Parameter]) -> None:
        """Once per optimizer step, before clipping: the float32 buffers back into .grad (in the
        parameter's dtype, which the optimizer expects), then GradScaler's unscale_."""
        for p in params:
            buffer = self._buffers.pop(id(p), None)
            if buffer is not None:
                p.grad = buffer.to(p.dtype)
        if self.scaler is not None:
            for opt in optimizers:
                self.scaler.unscale_(opt)

    def take_first_grad(self, params: List[torch.nn.Parameter]) -> None:
        """Keep each parameter's gradient the first time an optimizer is about to apply it."""
        if self.first_grad is None:
            return
        for p in params:
            if p.grad is not None and id(p) not in self.first_grad:
                self.first_grad[id(p)] = p.grad.detach().clone()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)  # skipped when unscale_ found an inf or NaN

    def after_step(self) -> None:
        """GradScaler's one update per optimizer step: the scale halves after an overflow (the
        step was skipped) and grows after 2000 clean steps. Records grad_scale and step_skipped."""
        if self.scaler is None:
            return
        scale = self.scaler._get_scale_async().clone()  # the scale this step's backwards used (on device)
        self.scaler.update()
        skipped = self.scaler._get_scale_async() < scale  # only an overflow lowers the scale
        self._columns = {GRAD_SCALE_COLUMN: scale.reshape(()), STEP_SKIPPED_COLUMN: skipped.reshape(()).float()}

    def columns(self) -> Dict[str, torch.Tensor]:
        """This step's metrics.csv columns (grad_scale, step_skipped under fp16), as tensors."""
        return dict(self._columns)
