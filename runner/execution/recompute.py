"""Activation checkpointing (backward.activation_checkpointing): blocks that recompute their
activations in backward instead of keeping them.

`recompute_blocks(model)` replaces each block's `forward` on the instance with one that runs the
original through torch.utils.checkpoint.checkpoint(use_reentrant=False): the block keeps only its
inputs for backward and runs its forward again when backward reaches it. Nothing is renamed or
wrapped, so the state_dict's names, the parameters and their hashes stay as they are. (Not to be
confused with runner.recording.checkpoint, which writes a run's state for resuming.)

Which blocks: the model's own `checkpoint_blocks()` (CheckpointBlocks) where it declares them; else
its direct children that hold parameters, descending into a lone nn.Sequential or nn.ModuleList.
A block saves memory only when it keeps more than its inputs: a Transformer layer (attention
scores, the feed-forward's activations) does; one Linear+ReLU layer, whose ReLU keeps its output,
the next layer's input, does not, and one block around all of a model saves nothing either: in
backward it holds all it recomputes at once (runner.execution.memory counts that).

What recomputing could change, and why it does not:
- BatchNorm in train mode would update its running statistics again (momentum applied twice,
  num_batches_tracked counted twice). The parameters would not change (train mode normalises with
  the batch's statistics, so the gradients are the same), but the buffers, and every evaluation,
  would. The block's running statistics are put back after each recomputation.
- A forward in eval mode may be differentiated after the model went back to train mode (the
  gradient-flow table does that); the recomputation runs in the modes of the forward, or
  BatchNorm and dropout would compute something else (checkpoint refuses the mismatch).
- Dropout draws the same masks: checkpoint keeps the RNG state of the forward and restores it
  around the recomputation (preserve_rng_state), so the run's later draws do not move either.
- Several inputs: positional and keyword tensors alike go to checkpoint as positional arguments,
  so that it saves each of them (and the saved-tensor meter counts them); other arguments (a
  flag, None) pass as they are. Outputs may be a tensor, a tuple or a dict of them.
- Forward hooks on a block run once per call, around the checkpointed forward; hooks on modules
  inside it run again in the recomputation.
- Without gradients (evaluation under no_grad) blocks run their plain forward.
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Callable, Iterator, List, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from runner.execution.memory import recomputation


@runtime_checkable
class CheckpointBlocks(Protocol):
    """A model that names the blocks worth recomputing, in forward order."""

    def checkpoint_blocks(self) -> List[nn.Module]: ...


def blocks_of(model: nn.Module) -> List[nn.Module]:
    """The model's declared blocks, else its direct children that hold parameters."""
    if isinstance(model, CheckpointBlocks):
        return list(model.checkpoint_blocks())
    children = [m for m in model.children() if any(True for _ in m.parameters())]
    # A lone nn.Sequential or nn.ModuleList holds the layers: its children are the blocks.
    while len(children) == 1 and isinstance(children[0], (nn.Sequential, nn.ModuleList)):
        children = [m for m in children[0].children() if any(True for _ in m.parameters())]
    return children


def recompute_blocks(model: nn.Module) -> List[str]:
    """Make each block of the model recompute its activations in backward; their names."""
    names = {id(m): name for name, m in model.named_modules()}
    done = []
    for block in blocks_of(model):
        if not getattr(block.forward, "recomputes", False):  # twice would nest checkpoints
            block.forward = checkpointed(block, block.forward)
        done.append(names.get(id(block), type(block).__name__))
    return done


def checkpointed(block: nn.Module, forward: Callable) -> Callable:
    """`forward` run through checkpoint: its first call is the forward, later ones recompute."""
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # The body's closure holds counts and names only: a tensor held here would escape the
        # saved-tensor meter, and checkpoint keeps the body until backward is done.
        positional, keywords = len(args), list(kwargs)
        modes = [m.training for m in block.modules()]  # train or eval, as this forward runs
        calls = itertools.count()

        def body(*inputs):
            if next(calls) == 0:
                return forward(*inputs[:positional], **dict(zip(keywords, inputs[positional:])))
            with as_in_forward(block, modes), recomputation():
                return forward(*inputs[:positional], **dict(zip(keywords, inputs[positional:])))

        return checkpoint(body, *args, *kwargs.values(), use_reentrant=False)

    run.recomputes = True
    return run


@contextmanager
def as_in_forward(block: nn.Module, modes: List[bool]) -> Iterator[None]:
    """Recompute in the train or eval modes the forward ran in, and put running statistics back."""
    # A forward in eval mode may be differentiated after the model went back to train mode (the
    # gradient-flow table does); BatchNorm would update its statistics a second time.
    modules = list(block.modules())
    now = [m.training for m in modules]
    for module, training in zip(modules, modes):
        module.training = training
    kept = [(b, b.clone()) for m in modules if m.training and getattr(m, "track_running_stats", False)
            for b in m.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in kept:
                buffer.copy_(value)
        for module, training in zip(modules, now):
            module.training = training
