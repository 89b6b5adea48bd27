"""The exact weight of every loss a strategy backwards: each micro-batch's, and each rank's.

The identity every weight here serves: the weighted losses of a window's micro-batches (and of the
ranks' shares) add up to the loss the whole batch computes, so their gradients add up to its
gradient. A strategy asks for the weighted loss by name (`Weighting.score`) and hands it to the
engine's backward; the bug modes are other weights, chosen by backward.scale, partial_window and
loss.normalize, and named where they are chosen.

- Mean-reduced losses: a micro-batch's share of the batch's rows (scale=size; the accumulation
  answer's f(x,y) = (i/b) f(x[:i],y[:i]) + (1-i/b) f(x[i:],y[i:])); scale=mean divides by k instead.
- Sum-reduced losses are additive over examples: weight 1.
- Token losses normalised by tokens are handed the window's token count (num_items_in_batch),
  counted from the targets before any forward: weight 1 (nanoGPT's `loss / k` is this weighting for
  equal-size batches). normalize=double also divides by k (TRL #2617).
- Loader mode, partial_window=k: a window of k' < k micro-batches is scaled by k'/k (Lightning #19987).
- A token loss with count_window=M (loss=grpo) divides by M micro-batches' tokens, the window's count x M/k:
  its backwarded loss is weighted k/M (TRL PR #6024), its logged value stays the batch's.
- Ranks: data-parallel engines average gradients over ranks, so a rank's loss is weighted by world x its
  share of the batch (rows, or scored tokens counted over every rank). loss.rank_normalize keeps the
  two cross-rank bugs of token losses: `local` divides by the rank's own count (transformers #34242),
  `no_world` by the global count without undoing the mean over ranks, 1/world (torchtitan #1842).
  trainer.sequence_parallel=N: a group of N ranks shares its rows, each scoring a slice of the positions;
  loss.count_group=world counts each sequence N times, 1/N (VeOmni PR #338).

The logged value is always the micro-batch's exact share of the batch's loss, whatever the weighting:
the `loss` column never changes with the split (except a load-balancing term computed from each
micro-batch's own expert load, loss.aux_stats=micro_batch: `loss_aux` logs what it trained on).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from runner.components.data import IGNORE_INDEX, MicroBatch, labels_of, micro_batches
from runner.components.losses import (
    RoutedLoss,
    TokenLoss,
    exact_share,
    is_sum_reduced,
    loss_parts,
    offers,
)
from runner.recording.record import EXPERT_LOAD_CV_COLUMN, TOKENS_COLUMN


def loss_with_parts(loss_fn, outputs, targets, **kwargs):
    """(loss, its parts detached). A loss made of parts is computed once: its total is the sum
    of its parts, as its forward() is. `kwargs` go to the loss (a token count)."""
    parts = loss_parts(loss_fn, outputs, targets, **kwargs)
    loss = sum(parts.values()) if parts else loss_fn(outputs, targets, **kwargs)
    return loss, {name: value.detach() for name, value in parts.items()}


@dataclass
class Scored:
    """One micro-batch's loss: what is backwarded, and its exact share of the batch's loss (logged)."""

    loss: torch.Tensor
    logged: torch.Tensor
    parts: Dict[str, torch.Tensor]
    load: Optional[torch.Tensor] = None  # a routed loss's tokens per expert in this micro-batch


class Weighting:
    """The weights of one window's micro-batches: built per step from the batch, then `score`d
    micro-batch by micro-batch. `batch_tokens`: a token loss's count of the window's scored tokens;
    `handed`: what else every micro-batch's loss is handed (the window's expert load, window_load)."""

    def __init__(self, loss_fn, accumulation: int, scale: str, window: float = 1.0,
                 batch_tokens: Optional[torch.Tensor] = None, handed: Optional[Dict] = None):
        self.loss_fn, self.accumulation, self.scale, self.window = loss_fn, accumulation, scale, window
        self.batch_tokens, self.handed = batch_tokens, handed or {}
        self.normalization = loss_fn.normalization() if batch_tokens is not None else None

    def split(self, inputs, targets, sizes=None) -> List[MicroBatch]:
        """The window's micro-batches: tensor_split into k, or the loader's sizes."""
        return micro_batches(inputs, targets, self.accumulation, self.scale, sizes)

    def score(self, outputs, mb: MicroBatch) -> Scored:
        """The micro-batch's weighted loss (run it under the forward's autocast)."""
        loss_fn = self.loss_fn
        if self.normalization in ("tokens", "double"):
            loss, parts = loss_with_parts(loss_fn, outputs, mb.targets, num_items_in_batch=self.batch_tokens,
                                          **self.handed)
            # double: divided by the window's tokens and again by k (TRL #2617). count_window=M: by M micro-batches'
            # tokens, the window's count x M / k (TRL PR #6024).
            weight, share = (1.0 / self.accumulation if self.normalization == "double" else 1.0), 1.0
            counted = getattr(loss_fn, "count_window", 0)
            weight = weight * self.accumulation / counted if counted else weight
        else:
            loss, parts = loss_with_parts(loss_fn, outputs, mb.targets, **self.handed)
            weight = 1.0 if is_sum_reduced(loss_fn) else mb.weight
            share = exact_share(loss_fn, mb.targets, self.batch_tokens, mb.share)
        factor = weight * self.window
        return Scored(loss if factor == 1.0 else factor * loss, loss.detach() * share,
                      {name: value * share for name, value in parts.items()}, routed_load(loss_fn, outputs, mb.targets))


def add_parts(total: Dict[str, torch.Tensor], new: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {name: total.get(name, 0) + value for name, value in new.items()}


def token_count(loss_fn, targets) -> Dict[str, torch.Tensor]:
    """The `tokens` column (scored tokens of the step) for a token loss, else nothing."""
    return {TOKENS_COLUMN: loss_fn.count_tokens(targets)} if offers(loss_fn, TokenLoss) else {}


def routed_load(loss_fn, outputs, targets) -> Optional[torch.Tensor]:
    """A routed loss's tokens per expert in a forward's output (detached), else None."""
    return loss_fn.count_load(outputs["expert_mask"], targets).detach() if offers(loss_fn, RoutedLoss) else None


def load_spread(loss_fn, loads: List[Optional[torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The `expert_load_cv` column for a routed loss: the coefficient of variation (std / mean over
    the experts) of the step's tokens per expert, as its forwards routed them; else nothing."""
    if not offers(loss_fn, RoutedLoss):
        return {}
    load = torch.stack(loads).sum(dim=0)
    return {EXPERT_LOAD_CV_COLUMN: load.std(correction=0) / load.mean()}


def window_load(model, loss_fn, inputs, targets, engine) -> Dict[str, torch.Tensor]:
    """loss.aux_stats=window: the window's tokens per expert, counted once before any micro-batch's
    forward by a pass without a graph that stops at the router (Router.route: the experts never
    run), handed to every micro-batch's loss as `expert_load`, as the token count is handed as
    num_items_in_batch (torchtitan PR #4772). Nothing for other losses or aux_stats=micro_batch."""
    if not offers(loss_fn, RoutedLoss) or loss_fn.load_statistics() != "window":
        return {}
    with torch.no_grad(), engine.autocast():
        return {"expert_load": loss_fn.count_load(model.route(inputs), targets)}


@dataclass
class Shard:
    """This rank's share of the batch and the weight of its loss (None: weight 1, one process)."""

    inputs: torch.Tensor
    targets: object
    share: float
    weight: Optional[object] = None


def rank_shard(inputs, targets, loss_fn, rank: int, world: int, rank_normalize: str = "global",
               sequence_parallel: int = 1, count_group: str = "data") -> Shard:
    """The rows of the batch this rank trains on (tensor_split, uneven allowed) and its loss weight.

    trainer.sequence_parallel=N: N consecutive ranks share their rows, each scoring a contiguous 1/N of every
    sequence's positions (`sequence_piece`); a token loss's count is the batch's tokens, each counted once
    (count_group=data), or over every rank, where an N-group's ranks count the same rows N times (world). The
    engine averages the gradients over all ranks, which world x share undoes: they add up within a group and
    average across groups."""
    if world <= 1:
        return Shard(inputs, targets, 1.0)
    group, piece = divmod(rank, sequence_parallel)
    mine = micro_batches(inputs, targets, world // sequence_parallel)[group]
    if sequence_parallel > 1:
        mine.targets = sequence_piece(mine.targets, piece, sequence_parallel)
    batch_tokens = loss_fn.count_tokens(targets) if offers(loss_fn, TokenLoss) else None
    if batch_tokens is not None and count_group == "world":
        batch_tokens = batch_tokens * sequence_parallel
    share = exact_share(loss_fn, mine.targets, batch_tokens, mine.share)
    # Ranks average their gradients: world x share undoes the mean exactly. `local` keeps the
    # rank's own normalisation (weight 1); `no_world` forgets the mean (weight = share).
    weight = {"global": world * share, "local": None, "no_world": share}[rank_normalize]
    return Shard(mine.inputs, mine.targets, share, weight)


def sequence_piece(targets, piece: int, pieces: int):
    """The targets of a rank that scores piece `piece` of `pieces` contiguous pieces of every sequence's positions
    (Ulysses, ring attention: each rank holds a slice of the sequence): the other positions' labels ignored. The rank
    still runs the whole forward, the lab's stand-in for attention's exchange of keys and values, so that each
    position's logits and their gradient are the whole sequence's."""
    labels = labels_of(targets)
    outside = torch.ones(labels.shape[-1], dtype=torch.bool, device=labels.device)
    outside[torch.tensor_split(torch.arange(labels.shape[-1]), pieces)[piece]] = False
    masked = labels.masked_fill(outside, IGNORE_INDEX)
    return {**targets, "labels": masked} if isinstance(targets, dict) else masked

