"""Precision: how a strategy's passes run in reduced precision, built once from the config.

    trainer.autocast=bf16|fp16, trainer.dtype=bfloat16, backward.grad_accum_dtype=float32

A strategy calls these where it would call `model(...)`, `loss.backward()` and
`optimizer.step()`; with the defaults they are exactly those calls.

- `forward()` wraps a forward and its loss: torch.autocast (trainer.autocast=bf16|fp16).
- `backward(loss)`: GradScaler's scale (fp16), then backward; with grad_accum_dtype=float32 the
  new low-precision gradient moves into a float32 buffer.
- `before_step(optimizers, params)`, once per optimizer step: the float32 buffers back into
  .grad, then GradScaler's unscale_, so clipping and the optimizer see true gradients.
- `step(optimizer)`, `after_step()`: GradScaler's step (skipped when a gradient overflowed) and
  one update per optimizer step, never inside an accumulation window (PyTorch's AMP examples).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Dict, List, Sequence

import torch

from runner.recording.record import GRAD_SCALE_COLUMN, STEP_SKIPPED_COLUMN

AUTOCAST_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, device_type: str = "cpu", autocast: str = "off", grad_accum_dtype: str = "param",
                 init_scale: float = 2.0 ** 16, params: Sequence[torch.nn.Parameter] = ()):
        """`params`: every parameter an optimizer steps (the float32 buffers are theirs)."""
        self.device_type = device_type
        self.autocast_dtype = AUTOCAST_DTYPES[autocast]
        # fp16's narrow range needs loss scaling; bf16 has float32's range and does not.
        self.scaler = torch.amp.GradScaler(device_type, init_scale=init_scale) if autocast == "fp16" else None
        self.float32_grads = grad_accum_dtype == "float32"
        self.params: List[torch.nn.Parameter] = list(params)
        self._buffers: Dict[int, torch.Tensor] = {}  # id(parameter) -> its float32 running gradient
        self._columns: Dict[str, torch.Tensor] = {}

    def forward(self):
        """The context of a forward and its loss."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward(retain_graph=retain_graph)
        if self.float32_grads:
            self._to_buffers()

    def backward_from(self, outputs: torch.Tensor, grad: torch.Tensor) -> None:
        """backward() of `outputs` given their gradient, which a loss's backward() already gave
        (backward=gradcache's cached embedding gradient): scaled once there, not scaled again."""
        outputs.backward(grad)
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


class FirstGradient:
    """first_grad.pt's content: each parameter's gradient the first time an optimizer is about
    to apply it (after unscaling and clipping). Taken once; `take()` hands it over and stops."""

    def __init__(self, enabled: bool = True):
        self._grads: Dict[int, torch.Tensor] = {}
        self._open = enabled

    def keep(self, params: List[torch.nn.Parameter]) -> None:
        if not self._open:
            return
        for p in params:
            if p.grad is not None and id(p) not in self._grads:
                self._grads[id(p)] = p.grad.detach().clone()

    def take(self) -> Dict[int, torch.Tensor]:
        """id(parameter) -> gradient, once (after the first optimizer step); {} afterwards."""
        grads, self._grads, self._open = self._grads, {}, False
        return grads
