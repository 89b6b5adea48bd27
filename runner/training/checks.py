"""Checks made before training, on the first batch, that leave no trace.

`check_outputs_fit` refuses a model whose output does not have the shape a built-in loss needs.
`probe_coupling` finds, before any step, whether micro-batches can equal the batch at all: a
model that mixes examples (BatchNorm's batch statistics) or draws random numbers (dropout's
masks) cannot give the full batch's gradient from micro-batches, whatever the weighting.

`probe_loss_identity` asks the same of the loss alone: on the model's outputs for the first batch,
is loss(all) the share-weighted sum of loss(first part) and loss(second part), value and gradient,
as the accumulation answer's identity says? A loss that fails it (InfoNCE's in-batch negatives, a
router's load-balancing term, a soft F1) couples examples even when the model does not.

`probe_loss` answers "can this loss train this model?" before any step: the loss must return a
scalar tensor with a gradient path to the parameters. A loss whose backward is not implemented
(a custom torch.autograd.Function without backward) or that cuts the graph is not
differentiable: that is a finding, recorded as the run's result. A loss (or model) that raises
is the user's bug: UserCodeError, reported as bad input. The probe restores the RNG, runs the
model in eval mode (no BatchNorm statistics change) and takes gradients with autograd.grad,
which leaves .grad untouched.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional

import torch

from runner.config.schema import ConfigError, first_line


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


def output_width(model: torch.nn.Module, length: int = 2) -> Optional[int]:
    """How many tokens a token model scores: its output's last dimension on one sequence of `length`
    zero tokens (0 is in any vocabulary), or None where the forward fails or gives no tensor (the
    loss probe then names it). Leaves no trace: eval mode (no BatchNorm statistics), no graph, the
    RNG restored."""
    tokens = torch.zeros(1, length, dtype=torch.long, device=next(model.parameters(), torch.empty(0)).device)
    was_training = model.training
    with torch.random.fork_rng(devices=[tokens.device] if tokens.device.type == "cuda" else []), torch.no_grad():
        model.eval()
        try:
            outputs = _first_tensor(model(tokens))
        except Exception:
            return None
        finally:
            model.train(was_training)
    return int(outputs.shape[-1]) if outputs is not None and outputs.dim() > 0 else None


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

    batch_coupled: Optional[bool]  # None: not tested (a batch of one, or integer inputs no nn.Embedding looks up)
    stochastic: bool
    modules: List[str]  # "name: Type" of the modules responsible, where they can be named


def probe_coupling(model: torch.nn.Module, inputs, rows: int = 4) -> Coupling:
    """In train mode, on `rows` examples: does output i depend on input j != i (autograd of the
    first and the last output with respect to all inputs, or, for token inputs, to the embeddings
    of the tokens), and does the forward draw random numbers (the generator's state before and
    after)? Leaves no trace: the RNG is restored, buffers (BatchNorm's running statistics) are put
    back, no .grad is written."""
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
            with _embedding_leaves(model, probe_input) as leaves:
                outputs = model(probe_input)
            stochastic = not torch.equal(before, torch.get_rng_state())
            if devices:
                stochastic = stochastic or _cuda_rng_moved(model, batch)
            flat = _first_tensor(outputs)
            if leaves and len(batch) > 1 and flat is not None and flat.requires_grad:
                coupled = _depends_on_others(flat, leaves)
        except Exception:  # a forward that fails in train mode on a few examples: not decided here
            coupled, stochastic = None, False  # (training on the real batch reports its own error)
        finally:
            model.train(was_training)
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    buffer.copy_(buffers[name])
    named = (coupling_named if coupled else []) + (random_named if stochastic else [])
    return Coupling(coupled, stochastic, named)


@contextmanager
def _embedding_leaves(model: torch.nn.Module, probe_input: torch.Tensor) -> Iterator[List[torch.Tensor]]:
    """The tensors whose gradient says which example an output depends on: the input itself when it
    takes a gradient; for token inputs, which have none, the output of every nn.Embedding lookup of
    the input's own tokens (a forward hook swaps it for a leaf, filled in during the forward). A
    lookup of anything else (positions) is left alone: its rows are not the batch's examples."""
    leaves: List[torch.Tensor] = []
    if probe_input.requires_grad:
        yield [probe_input]
        return

    def as_leaf(module, args, output):
        if args and _looks_up(args[0], probe_input) and isinstance(output, torch.Tensor) \
                and output.is_floating_point():
            leaf = output.detach().requires_grad_()  # its own leaf: the embedding weights' .grad is never written
            leaves.append(leaf)
            return leaf
        return None

    handles = [m.register_forward_hook(as_leaf) for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    try:
        yield leaves
    finally:
        for handle in handles:
            handle.remove()


def _looks_up(indices, tokens: torch.Tensor) -> bool:
    """Are these an embedding's indices for the batch's tokens, one row per example (a model may
    reshape them)?"""
    return isinstance(indices, torch.Tensor) and indices.device == tokens.device \
        and indices.numel() == tokens.numel() and indices.shape[:1] == tokens.shape[:1] \
        and torch.equal(indices.reshape(tokens.shape), tokens)


def _depends_on_others(outputs: torch.Tensor, leaves: List[torch.Tensor]) -> bool:
    """Does the first or the last example's output have a gradient on another example's row of a leaf?"""
    for i in (0, len(outputs) - 1):
        grads = torch.autograd.grad(outputs[i].sum(), leaves, retain_graph=True, allow_unused=True)
        for grad in grads:
            if grad is not None and bool(torch.cat([grad[:i], grad[i + 1:]]).abs().sum() > 0):
                return True
    return False


# The identity holds to float32 rounding for a loss that averages over examples; coupled losses
# miss it by tens of percent (InfoNCE at half the negatives, a soft F1's ratio of sums).
IDENTITY_RTOL = 1e-4


def probe_loss_identity(model: torch.nn.Module, loss_fn, inputs, targets) -> Optional[List[str]]:
    """The identity on the loss: [] when loss(all) equals the share-weighted sum of the losses of
    the batch's two halves (value and gradient with respect to the outputs), ["loss: Name"] (with
    the parts that fail it, for a loss of named parts) when it does not, None when it cannot be
    tested (a batch of one, outputs without floating tensors, a loss that refuses a part).
    The shares are the parts' exact shares (runner.components.losses.exact_share: tokens for a token
    mean). Leaves no trace: the model runs once in eval mode without a graph, the RNG restored."""
    from runner.components.data import split_targets
    from runner.components.losses import TokenLoss, exact_share, offers

    rows = inputs.shape[0]
    if rows < 2:
        return None
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    was_training = model.training
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            outputs = model(inputs)
        except Exception:  # probe_loss has already named a model that fails
            return None
        finally:
            model.train(was_training)
    leaves = _leaves(outputs)
    if not leaves:
        return None
    halves_out, halves_y = split_targets(outputs_of(leaves, outputs), 2), split_targets(targets, 2)
    shares = [_rows(part) / rows for part in halves_out]
    try:
        whole = _identity_terms(loss_fn, outputs_of(leaves, outputs), targets)
        split = [_identity_terms(loss_fn, out, y) for out, y in zip(halves_out, halves_y)]
    except Exception:  # a loss that needs the whole batch (a fixed size, say): not decided here
        return None
    batch_tokens = loss_fn.count_tokens(targets) if offers(loss_fn, TokenLoss) else None
    weights = [float(exact_share(loss_fn, y, batch_tokens, share)) for y, share in zip(halves_y, shares)]
    failing = []
    for term in whole:
        combined = sum(w * parts[term] for w, parts in zip(weights, split))
        if not _same(whole[term], combined, list(leaves.values())):
            failing.append(term)
    if not failing:
        return []
    parts = [t for t in failing if t != ""]
    return [f"loss: {type(loss_fn).__name__}" + (f" ({', '.join(parts)})" if parts else "")]


def _leaves(outputs) -> dict:
    """The outputs' floating tensors as leaves that take a gradient, by key (or position)."""
    items = outputs.items() if isinstance(outputs, dict) else enumerate(outputs) \
        if isinstance(outputs, (list, tuple)) else [(None, outputs)]
    return {key: value.detach().clone().requires_grad_() for key, value in items
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0}


def outputs_of(leaves: dict, outputs):
    """`outputs` with its floating tensors replaced by the leaves."""
    if isinstance(outputs, dict):
        return {key: leaves.get(key, value) for key, value in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(leaves.get(i, v) for i, v in enumerate(outputs))
    return leaves.get(None, outputs)


def _rows(outputs) -> int:
    first = _first_tensor(outputs)
    return first.shape[0]


def _identity_terms(loss_fn, outputs, targets) -> dict:
    """The loss ("") and, for a loss of named parts, each part: what the identity is tested on."""
    from runner.components.losses import loss_parts

    terms = {"": loss_fn(outputs, targets)}
    terms.update(loss_parts(loss_fn, outputs, targets))
    return terms


def _same(whole: torch.Tensor, combined: torch.Tensor, leaves: List[torch.Tensor]) -> bool:
    """Value and gradient with respect to the outputs agree to IDENTITY_RTOL (relative)."""
    if not torch.isclose(whole.double(), combined.double(), rtol=IDENTITY_RTOL, atol=1e-7):
        return False
    if not (whole.requires_grad and combined.requires_grad):  # a term the outputs do not reach
        return whole.requires_grad == combined.requires_grad
    grads_whole = torch.autograd.grad(whole, leaves, retain_graph=True, allow_unused=True)
    grads_combined = torch.autograd.grad(combined, leaves, retain_graph=True, allow_unused=True)
    for a, b in zip(grads_whole, grads_combined):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        if a is None:
            continue
        scale = max(float(a.double().norm()), 1e-12)
        if float((a.double() - b.double()).norm()) > IDENTITY_RTOL * scale:
            return False
    return True


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
