"""backward.* keys: the options each strategy reads, declared apart from the training code so that
the config side (runner.config.schema) and the analysis side read them without importing torch's models.

A strategy (runner.training.strategies) names its options class here by its own name in OPTIONS; the
config schema's `backward` node is the union of them all plus PassOptions, which every strategy
reads. Adding a strategy is its class, its entry here, and its YAML file in conf/backward/.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, List, Tuple

from runner.config.keys import Choice, at_least, key


class Scale(Choice):
    size = "size", "weight each micro-batch by its share of the batch: exact for mean losses"
    mean = "mean", "divide by the number of micro-batches, as common frameworks do (wrong on uneven splits)"
    none = "none", ("leave each micro-batch's loss undivided, as the transformers Trainer leaves a compute_loss_func's "
                    "(never divided by gradient_accumulation_steps, PR #34511): k times the batch's gradient")


class Keep(Choice):
    """backward=accumulate: whose gradients the accumulator holds when the optimizer steps."""

    all = "all", "every micro-batch's: .grad adds them up (exact)"
    last = "last", ("the last micro-batch's alone: each backward overwrites what the earlier ones left, as DeepSpeed "
                    "ZeRO-2 does when every backward is an accumulation boundary (open-instruct PR #1498, DeepSpeed "
                    "PR #7981, Megatron-LM PR #7186): the loss curve looks normal, the gradient is about 1/k of the "
                    "batch's")
    first = "first", ("the first micro-batch's alone: the later ones' gradients are dropped instead of added, as "
                      "DeepSpeed ZeRO-1/2 with CPU offload did (copied only at micro_step_id 0; PR #7967, "
                      "introduced by #6550): the gradient norm is about 1/k of the batch's")


class PartialWindow(Choice):
    """Loader mode: an epoch's last window may hold fewer than backward.accumulation micro-batches."""

    exact = "exact", "weight by what the window holds (examples, or tokens for loss=lm)"
    k = "k", "divide by k as if the window were full (PyTorch Lightning's behaviour, #19987)"
    drop = "drop", "skip it: the next epoch starts"
    carry = "carry", ("no epoch boundary: every window is k micro-batches, the next epoch's first ones completing "
                      "the last window of an epoch, as DeepSpeed's boundary (micro_steps % k) does")


class GradAccumDType(Choice):
    """Where micro-batch gradients add up when parameters are bf16 (trainer.dtype=bfloat16)."""

    param = "param", "in .grad, in the parameters' dtype (bf16 rounding at every addition)"
    float32 = "float32", "in a float32 buffer (Megatron-LM's main_grad), copied back into .grad before the step"


class Sync(Choice):
    """With several processes (trainer.processes > 1): which micro-batch's backward synchronises
    the gradients across ranks (runner.execution.parallel)."""

    last = "last", "the last: the others add up locally under no_sync (one round per step)"
    every = "every", "each one: the same gradient, k rounds of traffic per step"
    first = "first", "the first (an off-by-one bug, FunASR PR #3472): later micro-batches never reach the other ranks"


class StepInBackward(Choice):
    """backward=accumulate: step each parameter from its post-accumulate-grad hook, inside backward()
    (PyTorch's "fusing the optimizer step into the backward pass" tutorial), so that its .grad is
    freed at once instead of held until the optimizer step."""

    off = "off", "one optimizer step after the window's backwards"
    last = "last", "the hooks step on the window's last micro-batch only: the accumulated gradient (exact)"
    every = "every", "the hooks step on every micro-batch (pytorch #124523, DeepSpeed #8443): k steps per window"


# backward.accumulation, declared alike by every strategy that splits the batch.
ACCUMULATION = "micro-batches per optimizer step; strategies that do not split the batch record 1"
AT_LEAST_ONE = at_least(1, integer=True)


@dataclass
class PassOptions:
    """backward.* keys every strategy reads: how its passes run (runner.execution.precision,
    runner.execution.recompute)."""

    grad_accum_dtype: GradAccumDType = key(GradAccumDType.param, "trainer.dtype=bfloat16: where micro-batch "
                                                                 "gradients add up")
    activation_checkpointing: bool = key(False, "each block of the model keeps only its inputs and recomputes "
                                                "its activations in backward (torch.utils.checkpoint)")


@dataclass
class NoOptions:
    """A strategy that reads no backward.* key besides backward.name (full)."""


@dataclass
class MicroBatchOptions:
    """The strategies that split the batch into backward.accumulation micro-batches."""

    accumulation: int = key(1, ACCUMULATION, allowed=AT_LEAST_ONE)
    scale: Scale = key(Scale.size, "how micro-batch losses are weighted")
    partial_window: PartialWindow = key(PartialWindow.exact, "loader mode (data.micro_batch_size): an epoch's "
                                                             "short last window")


@dataclass
class AccumulateOptions(MicroBatchOptions):
    sync: Sync = key(Sync.last, "several processes: the micro-batch whose backward synchronises the gradients")
    step_in_backward: StepInBackward = key(StepInBackward.off, "the optimizer step inside backward, from each "
                                                               "parameter's post-accumulate-grad hook")
    keep: Keep = key(Keep.all, "whose gradients the accumulator holds when the optimizer steps")


@dataclass
class GradCacheOptions:
    """backward=gradcache: the loss is taken on the whole batch's embeddings, so no micro-batch is
    weighted (no scale) and a loader window of any length is exact (no partial_window)."""

    accumulation: int = key(1, ACCUMULATION, allowed=AT_LEAST_ONE)


@dataclass
class SeparateOptions:
    step_per_task: bool = key(False, "step the optimizer after each task's backward (fails in place on a deep trunk)")
    reforward: bool = key(False, "run the forward again after each step (so also step per task), as DCGAN does")


@dataclass
class ChainedOptions:
    joint: bool = key(False, "stage 2's optimizer owns both stages' parameters (the itertools.chain caveat)")


# backward.name -> the options that strategy reads.
OPTIONS: Dict[str, type] = {
    "full": NoOptions, "sum": MicroBatchOptions, "accumulate": AccumulateOptions, "separate": SeparateOptions,
    "naive": ChainedOptions, "retain_graph": ChainedOptions, "detach": ChainedOptions,
    "gradcache": GradCacheOptions,
}


# The strategies DDP and FSDP can wrap: one optimizer, a forward per micro-batch, one backward each
# (or one over all of them).
DDP_STRATEGIES = ("full", "sum", "accumulate")


# optim.* keys (and trainer.ema_every) that act per micro-batch (runner.training.strategies.Strategy.apply),
# by the strategies that read them. The others take one micro-batch per optimizer step, so "once per micro-batch" is
# once per step for them; sum backwards its micro-batches together, so there is nothing to clip
# (or average) between them.
PER_MICRO_BATCH_UPDATES: Dict[str, Tuple[str, ...]] = {
    "sum": ("scheduler_every",), "accumulate": ("scheduler_every", "clip_every", "ema_every")}


def readers_by_option() -> Dict[str, List[str]]:
    """backward.* option -> the strategies that read it."""
    readers: Dict[str, List[str]] = {}
    for name, options in OPTIONS.items():
        for f in fields(options):
            readers.setdefault(f.name, []).append(name)
    return readers


def readers_of(option: str) -> List[str]:
    return readers_by_option().get(option, [])


def option_defaults() -> Dict[str, object]:
    """backward.* option -> its declared default (the strategies declare each alike)."""
    return {f.name: f.default for options in OPTIONS.values() for f in fields(options)}
