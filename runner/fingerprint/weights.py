"""The fingerprint of one optimizer step: the weight w_i each forwarded micro-batch's sum-reduced loss got
in the gradient the optimizer saw, g = sum_i w_i grad L_i(theta), solved in float64 by least squares
(torch.linalg.lstsq) on a float64 copy of the model at the step's parameters, with the relative residual
|g - G w| / |g|: about 1e-7 when g is float32 and the loop is a weighted sum of its micro-batches.

A loss of several terms (runner.components.losses.MultiPartLoss) can be solved per term, g = sum_i sum_t w_it
grad L_it: a loop that divides one term by another count than the others shows in that term's weights.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List, Optional

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
    terms: Optional[torch.Tensor] = None  # solved per term: (micro-batches, terms); `weights` is the first term's


class Basis:
    """Each micro-batch's sum-reduced loss gradient at given parameters, in float64. `loss_fn` with no
    count handed divides by the micro-batch's own (rows or tokens); multiplying by that count undoes it."""

    def __init__(self, model: nn.Module, loss_fn, terms: bool = False):
        """`terms`: a column per term of each micro-batch's loss (the loss's `parts`), in the parts' order."""
        self.model = copy.deepcopy(model).to(torch.float64)
        self.loss_fn, self.terms = loss_fn, terms

    def _gradient(self, own: List[nn.Parameter], loss: torch.Tensor, retain: bool) -> torch.Tensor:
        grads = torch.autograd.grad(loss, own, retain_graph=retain, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, own)])

    def gradients(self, params: List[torch.Tensor], micro_batches: List[ProbeBatch]) -> torch.Tensor:
        """(parameters, columns): a column per micro-batch, or per micro-batch and term."""
        own = list(self.model.parameters())
        with torch.no_grad():
            for p, value in zip(own, params):
                p.copy_(value)
        columns = []
        for mb in micro_batches:
            inputs = mb.inputs.to(torch.float64) if mb.inputs.is_floating_point() else mb.inputs
            with torch.enable_grad():
                outputs = self.model(inputs)
                if self.terms:
                    parts = list(self.loss_fn.parts(outputs, mb.targets).values())
                    columns += [self._gradient(own, part * mb.count, i < len(parts) - 1)
                                for i, part in enumerate(parts)]
                else:
                    columns.append(self._gradient(own, self.loss_fn(outputs, mb.targets) * mb.count, False))
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
        if not self.terms:
            return Solved(mbs, weights, residual, basis, seen.grad, seen.lrs)
        per_term = weights.view(len(mbs), -1)
        first = basis.view(basis.shape[0], len(mbs), -1)[:, :, 0]
        return Solved(mbs, per_term[:, 0].clone(), residual, first, seen.grad, seen.lrs, per_term)
