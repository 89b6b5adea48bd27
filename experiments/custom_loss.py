"""A user's own losses, for `loss=custom` (the custom-loss answer, made runnable).

    python -m runner loss=custom loss._target_=runner.experiments.custom_loss.SoftF1Loss +loss.smooth=1.0
    python -m runner loss=custom loss._target_=runner.experiments.custom_loss.HardF1Loss       # not differentiable
    python -m runner loss=custom loss._target_=runner.experiments.custom_loss.RewrappedF1Loss  # not differentiable
    python -m runner loss=custom loss._target_=runner.experiments.custom_loss.NoBackwardF1Loss # not differentiable
    python -m runner -m experiment=custom_loss                                                # all four, with claims

A loss is an nn.Module, as torch.nn's losses are: it composes (nn.Sequential, .to(device)),
carries its own hyper-parameters, and may hold learnable parameters. Its output needs no
`requires_grad=True`: it inherits a gradient from the model's outputs, as long as every
operation on the way is differentiable.
"""
import torch
from torch import nn


class SoftF1Loss(nn.Module):
    """1 - F1, with the counts of true/false positives taken from probabilities instead of
    thresholded predictions, so the loss is differentiable (a common "soft" surrogate)."""

    def __init__(self, smooth: float = 1.0, reduction: str = "mean"):
        super().__init__()
        self.smooth = smooth
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        tp = (p * targets).sum(0)
        fp = (p * (1 - targets)).sum(0)
        fn = ((1 - p) * targets).sum(0)
        f1 = (2 * tp + self.smooth) / (2 * tp + fp + fn + self.smooth)
        return 1 - f1.mean()


class HardF1Loss(SoftF1Loss):
    """The same formula on thresholded predictions: `logits > 0` is a comparison, which has no
    gradient, so the loss has no grad_fn and the runner refuses it before training."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.where(logits > 0, 100.0, -100.0), targets)


class RewrappedF1Loss(SoftF1Loss):
    """The classic wrong fix for a loss that "does not train": take the value out with .item()
    and wrap it in a new tensor with requires_grad=True. The result does require grad, but it is a
    new leaf with no history, so no gradient can reach the model: requires_grad on the loss is
    never what makes it trainable (the custom-loss answer's second question)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        value = super().forward(logits, targets).item()
        return torch.tensor(value, requires_grad=True)


class _DoubleWithoutBackward(torch.autograd.Function):
    """A custom operation that forgot its backward (the custom-loss answer's first example)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


class NoBackwardF1Loss(SoftF1Loss):
    """Soft F1 through a custom autograd.Function with no backward: the forward works and the
    output even has a grad_fn, but backward raises NotImplementedError. The runner finds it on
    the first batch and records "not differentiable: _DoubleWithoutBackward has no backward"."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().forward(_DoubleWithoutBackward.apply(logits) / 2, targets)
