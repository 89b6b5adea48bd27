"""Losses as nn.Modules, shaped like torch.nn's: a validated `reduction`, 'mean' by default.

A loss made of named parts (multi-task, chained stages) also offers `parts(outputs, targets)`,
a dict of already-weighted components that sum to `forward`'s value; strategies that backward
the parts one by one use it, and the records log each as `loss_<name>`.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict

import torch
from torch import nn
import torch.nn.functional as F

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0, reduction: str = "mean") -> torch.Tensor:
    """FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) for binary 0/1 targets (Lin et al. 2017).

    Same value as torchvision.ops.sigmoid_focal_loss, computed in log space: (1 - p_t)^gamma is
    exp(gamma * logsigmoid(-z)) with z the signed logit, so saturated logits (|x| ~ 100, even
    beyond float32's sigmoid range) give no NaN in the loss or its gradient, also for 0 < gamma < 1,
    where the power form's derivative gamma * (1 - p_t)^(gamma - 1) would be infinite at p_t = 1.
    """
    check_reduction(reduction)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if gamma != 0:
        signed = logits * (2 * targets - 1)  # z: log-odds of the true class; p_t = sigmoid(z)
        ce = torch.exp(gamma * F.logsigmoid(-signed)) * ce
    if alpha >= 0:
        ce = (alpha * targets + (1 - alpha) * (1 - targets)) * ce
    return reduce(ce, reduction)


class FocalLoss(nn.Module):
    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean"):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if alpha > 1:
            raise ValueError(f"alpha must be <= 1 (or < 0 to disable), got {alpha}")
        self.alpha, self.gamma, self.reduction = alpha, gamma, check_reduction(reduction)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sigmoid_focal_loss(logits, targets, self.alpha, self.gamma, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


def import_class(path: str):
    """`package.module.Class` -> the class; a clear ValueError when it cannot be found."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"loss._target_={path} is not an import path like package.module.Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"loss._target_={path}: cannot import module {module_name!r} ({exc})") from None
    if not hasattr(module, attr):
        raise ValueError(f"loss._target_={path}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _bce(cfg, kwargs):
    return nn.BCEWithLogitsLoss(reduction=cfg.reduction)


def _focal(cfg, kwargs):
    return FocalLoss(alpha=cfg.alpha, gamma=cfg.gamma, reduction=cfg.reduction)


def _custom(cfg, kwargs):
    if not cfg._target_ or cfg._target_ == "???":
        raise ValueError("loss._target_ is missing: loss=custom needs loss._target_=package.module.Class")
    cls = import_class(cfg._target_)
    try:
        loss = cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"loss._target_={cfg._target_}: cannot build it with {kwargs} ({exc})") from None
    if not callable(loss):
        raise ValueError(f"loss._target_={cfg._target_} did not build a callable loss")
    return loss


# name -> builder(loss_cfg, extra_kwargs) -> loss module
BUILDERS: Dict[str, Callable] = {"bce": _bce, "focal": _focal, "custom": _custom}


def build_loss(cfg, kwargs: dict | None = None) -> nn.Module:
    if cfg.name not in BUILDERS:
        raise ValueError(f"loss={cfg.name} is unknown: expected one of {sorted(BUILDERS)}")
    return BUILDERS[cfg.name](cfg, kwargs or {})


def loss_parts(loss_fn, outputs, targets) -> Dict[str, torch.Tensor]:
    """The loss's named components (weighted, summing to the total), or {} for a one-part loss."""
    parts = getattr(loss_fn, "parts", None)
    return parts(outputs, targets) if callable(parts) else {}


def is_sum_reduced(loss_fn) -> bool:
    return getattr(loss_fn, "reduction", "mean") == "sum"
