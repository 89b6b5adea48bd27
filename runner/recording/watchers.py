"""The loop's own watchers of each step, subscribers of its events (runner.recording.events): the memory
meter (trainer.memory: peak_saved_bytes measured around the steps it measures) and first_grad.pt
(trainer.first_grad: the first optimizer step's gradient, written right after that step). Checkpoints
are the third (runner.recording.checkpoint.Checkpoints).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, ContextManager, Dict, Iterator

import torch

from runner.execution.memory import SavedTensorsMeter
from runner.recording import record
from runner.recording.events import NOTHING, RunStart, Subscriber


class MemoryMeter(Subscriber):
    """trainer.memory=every|first: the saved-tensor meter around every step, or the run's first (a resumed
    run's first too); its peak goes into the step's host values as the peak_saved_bytes column."""

    def __init__(self, every: bool):
        self.every, self.first = every, 0

    def run_start(self, run: RunStart) -> None:
        self.first = run.start_step

    def step(self, step: int, host: Dict[str, Any]) -> ContextManager:
        return self._measured(host) if self.every or step == self.first else NOTHING

    @contextmanager
    def _measured(self, host: Dict[str, Any]) -> Iterator[None]:
        with SavedTensorsMeter() as meter:
            yield
        host[record.MEMORY_COLUMN] = meter.peak


class FirstGradientFile(Subscriber):
    """first_grad.pt: parameter name -> the gradient the first optimizer step applied (a learnable loss's
    parameters as loss.NAME), as full tensors. Taken right after the first step: the capture (the update
    rule's `first_gradient`) keeps each parameter's first gradient until taken. A resumed run wrote it before."""

    def __init__(self, training, run_dir: Path):
        self.training, self.run_dir = training, Path(run_dir)
        self.first, self.resumed = 0, False

    def run_start(self, run: RunStart) -> None:
        self.first, self.resumed = run.start_step, run.start_step > 0

    def step(self, step: int, host: Dict[str, Any]) -> ContextManager:
        return self._then_written() if step == self.first else NOTHING

    @contextmanager
    def _then_written(self) -> Iterator[None]:
        yield
        t = self.training
        grads = t.update.first_gradient.take()
        if not grads or self.resumed:
            return
        named = list(t.model.named_parameters())
        if isinstance(t.loss_fn, torch.nn.Module):
            named += [(f"loss.{name}", p) for name, p in t.loss_fn.named_parameters()]
        record.write_first_grad(self.run_dir, t.engine.full({name: grads[id(p)] for name, p in named if id(p) in grads}))
