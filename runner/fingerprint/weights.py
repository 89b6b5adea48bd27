"""The fingerprint of one optimizer step: the weight w_i each forwarded micro-batch's sum-reduced loss got
in the gradient the optimizer saw, g = sum_i w_i grad L_i(theta), solved in float64 by least squares
(torch.linalg.lstsq) on a float64 copy of the model at the step's parameters, with the relative residual
|g - G w| / |g|: about 1e-7 when g is float32 and the loop is a weighted sum of its micro-batches.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List

import torch
from torch import nn

from runner.fingerprint.observe import ProbeBatch, Seen


@dataclass
class Solved:
    micro_batches: List[ProbeBatch]
    weights: torch.Tensor  # float64, one per micro-batch
    residual: float
    basis: torch.Tensor  # (parameters, micro-batches): each micro-batch's sum-reduced loss gradient
    grad: torch.Tensor
    lrs: List[float]


class Basis:
    """Each micro-batch's sum-reduced loss gradient at given parameters, in float64. `loss_fn` with no
    count handed divides by the micro-batch's own (rows or tokens); multiplying by that count undoes it."""

    def __init__(self, model: nn.Module, loss_fn):
        self.model = copy.deepcopy(model).to(torch.float64)
        self.loss_fn = loss_fn

    def gradients(self, params: List[torch.Tensor], micro_batches: List[ProbeBatch]) -> torch.Tensor:
        own = list(self.model.parameters())
        with torch.no_grad():
            for p, value in zip(own, params):
                p.copy_(value)
        columns = []
        for mb in micro_batches:
            self.model.zero_grad(set_to_none=True)
            inputs = mb.inputs.to(torch.float64) if mb.inputs.is_floating_point() else mb.inputs
            with torch.enable_grad():
                (self.loss_fn(self.model(inputs), mb.targets) * mb.count).backward()
            columns.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                      for p in own]))
        return torch.stack(columns, dim=1) if columns else torch.zeros(sum(p.numel() for p in own), 0,
                                                                        dtype=torch.float64)

    def solve(self, seen: Seen, stream_positions: List[ProbeBatch]) -> Solved:
        unique = list(dict.fromkeys(seen.positions))  # a micro-batch forwarded twice has one weight
        mbs = [stream_positions[p] for p in unique]
        basis = self.gradients(seen.params, mbs)
        if not mbs:
            return Solved([], torch.zeros(0, dtype=torch.float64), 0.0, basis, seen.grad, seen.lrs)
        weights = torch.linalg.lstsq(basis, seen.grad.unsqueeze(1)).solution.squeeze(1)
        norm = seen.grad.norm()
        residual = float((seen.grad - basis @ weights).norm() / norm) if norm > 0 else 0.0
        return Solved(mbs, weights, residual, basis, seen.grad, seen.lrs)
