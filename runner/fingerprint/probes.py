"""The probes: small seeded runs chosen so that no accumulation mode can hide.

Each probe is the lab's own model, data and loss set by overrides (the loader mode of
runner.components.loader: micro-batches of data.micro_batch_size drawn per epoch, k of them per
window), and names one dimension. Models without dropout or BatchNorm, so that the micro-batches'
gradients add up to the batch's and the weights are well defined.

    uneven        30 rows in micro-batches of 8, 8, 8, 6 at k=4: scale=size / mean / none, keep
    tokens        sequences of 4..12 tokens, padding ignored, uneven counts of tokens and rows at k=3
    policy        GRPO's token mean on rollouts, the same geometry: the count's window (count_window=M)
    packed        packed rows of several documents: each boundary counted once or twice (boundaries=twice)
    terms         the tokens probe with label smoothing: each of the loss's two terms weighted on its own
    short_window  5 micro-batches an epoch at k=2, two epochs: the short last window (exact, k, drop, carry)
    short_epoch   an epoch of 3 micro-batches, shorter than k=4, three epochs: carry against the rest
    warmup        a linear warmup at k=2: the schedule per optimizer step or per micro-batch
    clip          a clip that binds at every step, k=4: clipped per step, inside the window, or not at all
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

# The dimensions a fingerprint names, in the order it prints them.
DIMENSIONS = ("normalization", "window", "schedule", "clipping")

EXAMPLES = ("model=mlp", "data=default", "loss=bce", "optim=sgd")
TOKENS = ("model=seq", "data=seq", "loss=lm", "optim=sgd", "data.min_length=4", "data.max_length=12")
POLICY = ("model=seq", "data=rollouts", "loss=grpo", "optim=sgd", "data.min_length=1", "data.max_length=8",
          "data.group_size=2")
PACKED = ("model=seq", "model.cell=transformer", "data=seq", "loss=lm", "optim=sgd", "data.packing=true",
          "data.min_length=2", "data.max_length=6", "data.pack_length=12")
TERMS = (*TOKENS, "loss.label_smoothing=0.1")
TOKEN_LOSSES = ("loss=lm", "loss=grpo")  # the probes whose loss divides by a token count
# The clip probe's clip, as a fraction of the exact first step's gradient norm: it binds at every step
# and, inside a window, already after the first micro-batches.
CLIP_FRACTION = 0.1
WARMUP_STEPS = 1000  # longer than any probe: the learning rate rises at every schedule step


@dataclass(frozen=True)
class Probe:
    name: str
    dimension: str
    about: str
    settings: Tuple[str, ...]  # the lab's keys that make its model, data and loss
    train_size: int
    micro_batch_size: int
    accumulation: int
    epochs: int
    scheduled: bool = False
    clipped: bool = False

    @property
    def tokens(self) -> bool:
        return any(loss in self.settings for loss in TOKEN_LOSSES)

    @property
    def terms(self) -> bool:
        """Its loss has terms (runner.components.losses.MultiPartLoss), each weighted on its own."""
        return self.settings == TERMS

    def overrides(self) -> Tuple[str, ...]:
        """The probe's own keys: they win over a mode that sets the same key."""
        schedule = ("optim.scheduler=linear", f"optim.warmup_steps={WARMUP_STEPS}") if self.scheduled \
            else ("optim.scheduler=none",)
        return (*self.settings, f"data.train_size={self.train_size}", f"data.micro_batch_size={self.micro_batch_size}",
                f"backward.accumulation={self.accumulation}", *schedule,
                f"trainer.steps={10 * WARMUP_STEPS}", "trainer.eval=false")


PROBES: Dict[str, Probe] = {p.name: p for p in (
    Probe("uneven", "normalization", "micro-batches of 8, 8, 8 and 6 rows in each window: an exact weight "
          "(1/30 each) differs from a mean of means (1/32 and 1/24)", EXAMPLES, 30, 8, 4, 2),
    Probe("tokens", "normalization", "sequences of 4 to 12 tokens with padding ignored: each micro-batch scores "
          "another number of tokens, and the second window's last holds 2 sequences, not 4", TOKENS, 22, 4, 3, 2),
    Probe("policy", "normalization", "GRPO's token mean on rollouts of 1 to 8 tokens, the tokens probe's geometry: "
          "the window whose tokens the mean divides by", POLICY, 22, 4, 3, 2),
    Probe("packed", "normalization", "rows of 12 tokens packing documents of 2 to 6: each row scores 12 minus its "
          "documents, and a count that removes the boundaries again divides by less", PACKED, 22, 4, 3, 2),
    Probe("terms", "normalization", "the tokens probe with label smoothing 0.1: the next-token term and the "
          "smoothing term, each micro-batch's weighted on its own, so that a term divided by another count shows",
          TERMS, 22, 4, 3, 2),
    Probe("short_window", "window", "5 micro-batches an epoch at k=2: each epoch ends with a window of one",
          EXAMPLES, 38, 8, 2, 2),
    Probe("short_epoch", "window", "an epoch of 3 micro-batches at k=4, shorter than one window, three epochs",
          EXAMPLES, 20, 8, 4, 3),
    Probe("warmup", "schedule", f"a linear warmup over {WARMUP_STEPS} schedule steps at k=2: the learning rate "
          "says how often the schedule stepped", EXAMPLES, 32, 8, 2, 2, scheduled=True),
    Probe("clip", "clipping", f"the gradient clipped to {CLIP_FRACTION:g}x the exact first step's norm at k=4: it "
          "binds at every step", EXAMPLES, 32, 8, 4, 2, clipped=True),
)}
