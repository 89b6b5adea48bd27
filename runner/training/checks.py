"""Checks made before training, on the first batch, that leave no trace.

`check_outputs_fit` refuses a model whose output does not have the shape a built-in loss needs.
`probe_coupling` finds, before any step, whether micro-batches can equal the batch at all: a
model that mixes examples (BatchNorm's batch statistics) or draws random numbers (dropout's
masks) cannot give the full batch's gradient from micro-batches, whatever the weighting.

`probe_loss` answers "can this loss train this model?" before any step: the loss must return a
scalar tensor with a gradient path to the parameters. A loss whose backward is not implemented
(a custom torch.autograd.Function without backward) or that cuts the graph is not
differentiable: that is a finding, recorded as the run's result. A loss (or model) that raises
is the user's bug: UserCodeError, reported as bad input. The probe restores the RNG, runs the
model in eval mode (no BatchNorm statistics change) and takes gradients with autograd.grad,
which leaves .grad untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch

from runner.config.schema import ConfigError


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


def probe_loss(model: torch.nn.Module, loss_fn, inputs, targets, label: str, model_label: str,
               check_outputs: Optional[Callable[[Any], None]] = None) -> List[str]:
    """Raise NotDifferentiable or UserCodeError, else return the names of the parameters that
    receive no gradient from the loss. `check_outputs` sees the model's output first (its shape
    against the targets), so that a misfit is named as such, not as the loss's error."""
    was_training = model.training
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.eval()
        try:
            try:
                outputs = model(inputs)
            except Exception as exc:
                raise raised(model_label, exc) from None
            if check_outputs is not None:
                check_outputs(outputs)
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


def check_outputs_fit(outputs, targets, spec, model_label: str, data_label: str, loss_label: str) -> None:
    """The model's output must have the targets' shape for a built-in loss (a logit per class for
    class-index targets). UserCodeError naming both shapes otherwise."""
    if spec.kind not in ("multilabel", "regression", "multiclass") or spec.stages:
        return  # the built-in multi-part models and their losses fit by construction
    shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
    if spec.kind == "multiclass":
        fits = isinstance(outputs, torch.Tensor) and outputs.dim() == 2 and outputs.shape[0] == len(targets) \
            and outputs.shape[1] >= spec.outputs
        wanted = f"({len(targets)}, {spec.outputs}): a logit per class"
    else:
        fits = isinstance(outputs, torch.Tensor) and tuple(outputs.shape) == tuple(targets.shape)
        wanted = f"{tuple(targets.shape)}, the targets' shape"
    if not fits:
        raise UserCodeError(f"{model_label} outputs shape {shape} on a batch of {len(targets)}, and the targets "
                            f"of {data_label} have shape {tuple(targets.shape)}: {loss_label} expects {wanted}")


# Module types that mix the examples of a batch in train mode, and those that draw random numbers.
COUPLING_TYPES = (torch.nn.modules.batchnorm._BatchNorm,)
RANDOM_TYPES = (torch.nn.modules.dropout._DropoutNd, torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout,
                torch.nn.RReLU)


@dataclass
class Coupling:
    """Can a micro-batch's gradient be the batch's? Not when examples mix or masks are random."""

    batch_coupled: Optional[bool]  # None: not tested (a batch of one, or inputs without gradients)
    stochastic: bool
    modules: List[str]  # "name: Type" of the modules responsible, where they can be named


def probe_coupling(model: torch.nn.Module, inputs, rows: int = 4) -> Coupling:
    """In train mode, on `rows` examples: does output i depend on input j != i (autograd of the
    first and the last output with respect to all inputs), and does the forward draw random
    numbers (the generator's state before and after)? Leaves no trace: the RNG is restored,
    buffers (BatchNorm's running statistics) are put back, no .grad is written."""
    suspects = {name: module for name, module in model.named_modules() if name}
    coupling_named = [f"{n}: {type(m).__name__}" for n, m in suspects.items() if isinstance(m, COUPLING_TYPES)]
    random_named = [f"{n}: {type(m).__name__}" for n, m in suspects.items() if isinstance(m, RANDOM_TYPES)]
    batch = inputs[:rows]
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    coupled: Optional[bool] = None
    stochastic = False
    with torch.random.fork_rng(devices=devices):
        model.train()
        try:
            before = torch.get_rng_state()
            probe_input = batch.detach().clone().requires_grad_(batch.is_floating_point())
            outputs = model(probe_input)
            stochastic = not torch.equal(before, torch.get_rng_state())
            if devices:
                stochastic = stochastic or _cuda_rng_moved(model, batch)
            flat = _first_tensor(outputs)
            if probe_input.requires_grad and len(batch) > 1 and flat is not None and flat.requires_grad:
                coupled = False
                for i in (0, len(batch) - 1):
                    (grad,) = torch.autograd.grad(flat[i].sum(), probe_input, retain_graph=True, allow_unused=True)
                    if grad is not None:
                        others = torch.cat([grad[:i], grad[i + 1:]])
                        coupled = coupled or bool(others.abs().sum() > 0)
        except Exception:  # a forward that fails in train mode on a few examples: not decided here
            coupled, stochastic = None, False  # (training on the real batch reports its own error)
        finally:
            model.train(was_training)
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    buffer.copy_(buffers[name])
    named = (coupling_named if coupled else []) + (random_named if stochastic else [])
    return Coupling(coupled, stochastic, named)


def _first_tensor(outputs) -> Optional[torch.Tensor]:
    """The output to differentiate: a tensor, or the first tensor of a dict or tuple of them."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    values = outputs.values() if isinstance(outputs, dict) else outputs if isinstance(outputs, (list, tuple)) else []
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def _cuda_rng_moved(model: torch.nn.Module, batch) -> bool:
    before = torch.cuda.get_rng_state()
    with torch.no_grad():
        model(batch)
    return not torch.equal(before, torch.cuda.get_rng_state())
