"""Checks made before training, on the first batch, that leave no trace.

`probe_loss` answers "can this loss train this model?" before any step: the loss must return a
scalar tensor with a gradient path to the parameters. A loss whose backward is not implemented
(a custom torch.autograd.Function without backward) or that cuts the graph is not
differentiable: that is a finding, recorded as the run's result. A loss (or model) that raises
is the user's bug: UserCodeError, reported as bad input. The probe restores the RNG, runs the
model in eval mode (no BatchNorm statistics change) and takes gradients with autograd.grad,
which leaves .grad untouched.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from runner.schema import ConfigError


class NotDifferentiable(ValueError):
    """The loss gives no gradient: a result to record, not a crash."""


class UserCodeError(ConfigError):
    """The user's own code (a loss or model `_target_`) raised: one line naming it."""


# PyTorch's messages for misuses common enough to deserve a hint.
HINTS = {
    "all elements of input should be between 0 and 1":
        "torch.nn.BCELoss expects probabilities, and the models output logits: use loss=bce "
        "(BCEWithLogitsLoss, which takes logits)",
}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def raised(label: str, exc: Exception) -> UserCodeError:
    message = f"{label} raised {type(exc).__name__}: {first_line(exc)}"
    hint = next((h for needle, h in HINTS.items() if needle in str(exc)), None)
    return UserCodeError(message + (f" (hint: {hint})" if hint else ""))


def function_without_backward(loss: torch.Tensor) -> Optional[str]:
    """The name of a custom autograd.Function in the loss's graph that defines no backward."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        function = getattr(node, "_forward_cls", None)  # set on custom Functions' backward nodes
        if function is not None and function.backward is torch.autograd.Function.backward \
                and function.vjp is torch.autograd.Function.vjp:
            return function.__name__
        stack.extend(next_node for next_node, _ in node.next_functions)
    return None


def probe_loss(model: torch.nn.Module, loss_fn, inputs, targets, label: str,
               model_label: str) -> List[str]:
    """Raise NotDifferentiable or UserCodeError, else return the names of the parameters that
    receive no gradient from the loss."""
    was_training = model.training
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.eval()
        try:
            try:
                outputs = model(inputs)
            except Exception as exc:
                raise raised(model_label, exc) from None
            try:
                loss = loss_fn(outputs, targets)
            except Exception as exc:
                raise raised(label, exc) from None
        finally:
            model.train(was_training)
        if not isinstance(loss, torch.Tensor):
            raise NotDifferentiable(
                f"{label} returned {type(loss).__name__}, not a tensor: it is not differentiable "
                "(a .item() or float() inside the loss cuts the graph); return a torch tensor")
        if loss.dim() != 0:
            raise NotDifferentiable(f"{label} returned shape {tuple(loss.shape)}, not a scalar: "
                                    "reduce it (reduction=mean or sum) to train with it")
        if loss.grad_fn is None:
            raise NotDifferentiable(
                f"{label} is not differentiable: its output has no grad_fn (an argmax, a comparison, "
                ".detach(), .item() or a new torch.tensor(...) inside the loss cuts the graph)")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        try:
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        except NotImplementedError as exc:
            function = function_without_backward(loss)
            if function is None:
                raise raised(label, exc) from None
            raise NotDifferentiable(f"{label} is not differentiable: {function} has no backward "
                                    "(a custom torch.autograd.Function needs a backward staticmethod)") from None
        except Exception as exc:
            raise raised(label, exc) from None
    return [n for (n, _), g in zip(named, grads) if g is None]
