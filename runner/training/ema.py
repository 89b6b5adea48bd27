"""trainer.ema: an exponential moving average of the weights, updated once per optimizer step or
(ema_every=micro_batch, the bug) once per micro-batch.

The average is torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn(decay): its first update
copies the weights, each later one sets ema <- decay * ema + (1 - decay) * θ. Buffers are averaged too
(use_buffers=True, as timm's ModelEmaV2 does), so the averaged model evaluates as is (BatchNorm's
running statistics included) without swa_utils.update_bn.

Where the update runs is the whole question:
- per step (torch's swa_utils docs, diffusers' EMAModel under `accelerator.sync_gradients`, DINO's
  main_dino.py): after each optimizer step, once, on the stepped weights. Under gradient accumulation
  that is the full batch's EMA.
- per micro-batch: lightly-train's DINO updates its teacher in every training_step, i.e. on each of the
  k micro-batches of a window (lightly-train issue #968, fix PR #969); F5-TTS updated its EMA in the
  loop body, outside the `sync_gradients` branch (F5-TTS #631). Either way the average moves k times
  per optimizer step with an effective decay of decay**k, and k-1 of the k updates read weights the
  window has not stepped yet. Here the update runs where such a loop body puts it: after each
  micro-batch's backward, the last one after the step, so k=1 is the per-step average (lightly's own
  order runs all k before the step; the two differ only in that last update's timing).
"""
from __future__ import annotations

from typing import Dict

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightAverage:
    """The EMA of one model's weights; `every` is step or micro_batch (trainer.ema_every)."""

    def __init__(self, model: torch.nn.Module, decay: float, every: str = "step"):
        self.decay, self.every = decay, every
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.requires_grad_(False)  # a copy that is averaged into, never trained

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model, named as the trained one (for evaluation and the records)."""
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.averaged.update_parameters(model)

    def after_micro_batch(self, model: torch.nn.Module) -> None:
        """A micro-batch's backward is done and more follow before the step: only the bug averages here."""
        if self.every == "micro_batch":
            self.update(model)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """AveragedModel's state (the average and n_averaged), for checkpoints."""
        return self.averaged.state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.averaged.load_state_dict(state)
