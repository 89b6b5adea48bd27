"""Name each dimension of a loop's accumulation from its solved steps, with the lab's own mode spellings
(OPTION=VALUE, as the lab's keys set them), or report the weights themselves where no name fits: a
pattern with no name is never forced into the nearest one.

Weights are compared relative to the largest predicted weight; a mode is named when every step it
covers is within TOLERANCE of its prediction (float32 gradients solve to about 1e-6).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from runner.fingerprint.observe import ProbeBatch
from runner.fingerprint.weights import Solved

TOLERANCE = 1e-3
# The exact spelling of each dimension; a loop is the exact fix where every dimension observed one of these.
EXACT = {"normalization": ("scale=size", "normalize=tokens"), "window": ("partial_window=exact",),
         "schedule": ("scheduler_every=step",), "clipping": ("clip_every=step",)}

# A normalisation rule: (the window's micro-batches, the divisor a window of them uses, k) -> the weight
# of each one's sum-reduced loss. `d` is the window's micro-batch count for a mean of means (the lab's
# partial_window=exact on a short window), k for a full one.
Rule = Callable[[List[ProbeBatch], int, int], torch.Tensor]


def _counts(mbs: List[ProbeBatch]):
    return (torch.tensor([float(mb.count) for mb in mbs], dtype=torch.float64),
            torch.tensor([float(mb.rows) for mb in mbs], dtype=torch.float64))


def _rule(weights) -> Rule:
    def predict(mbs, d, k):
        c, r = _counts(mbs)
        return weights(c, r, d, k)
    return predict


def _boundaries_twice(mbs, d, k):
    """loss.boundaries=twice on packed rows: the window's count less each row's documents after its first (the
    exact count where no row is packed, which the exact rule names first)."""
    c, _ = _counts(mbs)
    again = sum(float((mb.targets["documents"] - 1).sum()) if isinstance(mb.targets, dict) and
                "documents" in mb.targets else 0.0 for mb in mbs)
    return torch.ones_like(c) / (c.sum() - again)


EXAMPLE_RULES: Dict[str, Rule] = {
    "scale=size": _rule(lambda c, r, d, k: torch.ones_like(c) / c.sum()),  # the window's mean: exact
    "scale=mean": _rule(lambda c, r, d, k: 1.0 / (d * c)),  # each micro-batch's mean / k (Lightning, Accelerate)
    "scale=none": _rule(lambda c, r, d, k: 1.0 / c),  # each micro-batch's mean, never divided
}
TOKEN_RULES: Dict[str, Rule] = {
    "normalize=tokens": _rule(lambda c, r, d, k: torch.ones_like(c) / c.sum()),  # the window's tokens: exact
    "normalize=double": _rule(lambda c, r, d, k: torch.ones_like(c) / (k * c.sum())),  # ... and / k again
    "normalize=micro_batch": _rule(lambda c, r, d, k: r / (r.sum() * c)),  # own tokens, weighted by rows
    "normalize=micro_batch scale=mean": _rule(lambda c, r, d, k: 1.0 / (d * c)),  # own tokens / k
    "normalize=micro_batch scale=none": _rule(lambda c, r, d, k: 1.0 / c),  # own tokens, never divided
    "boundaries=twice": _boundaries_twice,  # packed rows' boundaries removed from the count again
}


def count_window(steps: Sequence[Solved], k: int) -> Optional[Named]:
    """loss.count_window=M: the window's token mean divided by M micro-batches' tokens (the window's x M / k), so
    every weight is k / M times the exact one (TRL PR #6024). M is read off the weights and named where it is a
    whole number of micro-batches that fits every step."""
    exact = TOKEN_RULES["normalize=tokens"]
    factor = float(torch.stack([(s.weights / exact(s.micro_batches, k, k)).mean() for s in steps]).mean())
    if factor <= 0:
        return None
    windows = round(k / factor)
    if windows < 1 or windows == k:
        return None
    worst = max(error(s.weights, exact(s.micro_batches, k, k) * k / windows) for s in steps)
    return Named("normalization", f"count_window={windows}", False, worst) if worst < TOLERANCE else None


def _kept(rule: Rule, which: int) -> Rule:
    """The accumulator keeps one micro-batch's gradient (keep=first: index 0; keep=last: -1)."""
    def predict(mbs, d, k):
        full = rule(mbs, d, k)
        kept = torch.zeros_like(full)
        kept[which] = full[which]
        return kept
    return predict


def rules(tokens: bool) -> Dict[str, Rule]:
    """Every normalisation the fingerprint names, the exact one first."""
    base = TOKEN_RULES if tokens else EXAMPLE_RULES
    exact = next(iter(base))
    named = dict(base)
    for keep, which in (("keep=last", -1), ("keep=first", 0)):
        for name, rule in base.items():
            named[keep if name == exact else f"{keep} {name}"] = _kept(rule, which)
    return named


@dataclass
class Named:
    dimension: str
    observed: str
    exact: bool
    error: Optional[float] = None  # the largest weight error against the named mode
    detail: str = ""  # what no name says: the weights themselves, or why nothing was named


def error(weights: torch.Tensor, predicted: torch.Tensor) -> float:
    scale = predicted.abs().max()
    return float((weights - predicted).abs().max() / scale) if scale > 0 else float(weights.abs().max())


def _unnamed(dimension: str, steps: Sequence[Solved], exact: Callable[[Solved], torch.Tensor], what: str) -> Named:
    """No mode fits: the micro-batch furthest from its exact weight, and that step's weights / exact."""
    worst, at, index = -1.0, None, 0
    for step in steps:
        ratios = step.weights / exact(step)
        i = int((ratios - 1).abs().argmax())
        if abs(float(ratios[i]) - 1) > worst:
            worst, at, index = abs(float(ratios[i]) - 1), step, i
    ratios = at.weights / exact(at)
    mb = at.micro_batches[index]
    unit = f"{mb.count} tokens" if mb.count != mb.rows else f"{mb.rows} rows"
    shown = " ".join(f"{float(r):.3f}" for r in ratios)
    return Named(dimension, f"{what}: micro-batch {index + 1} of {len(ratios)} ({unit}) got {float(ratios[index]):.3f}x "
                            f"its exact weight", False, None, f"weights / exact: {shown}")


def normalization(steps: Sequence[Solved], k: int, tokens: bool) -> Named:
    """Named on the full windows (k micro-batches): how each micro-batch's loss is weighted."""
    full = [s for s in steps if len(s.micro_batches) == k]
    if not full:
        return Named("normalization", f"not named: no step held k={k} micro-batches", False)
    for name, rule in rules(tokens).items():
        worst = max(error(s.weights, rule(s.micro_batches, k, k)) for s in full)
        if worst < TOLERANCE:
            return Named("normalization", name, name in EXACT["normalization"], worst)
    counted = count_window(full, k) if tokens else None
    if counted is not None:
        return counted
    exact = next(iter(rules(tokens).values()))
    return _unnamed("normalization", full, lambda s: exact(s.micro_batches, k, k), "no named normalisation")


def terms(steps: Sequence[Solved], k: int) -> Named:
    """A loss of several terms, solved per term: the first term's weights named as any token loss's, then each
    other term against it. Weighted alike, the first term's name stands; divided by each micro-batch's own tokens
    where the first is divided by the window's, `term_normalize=micro_batch` (transformers #46731: k times its
    weight on equal micro-batches)."""
    named = normalization(steps, k, tokens=True)
    full = [s for s in steps if len(s.micro_batches) == k and s.terms is not None]
    if not full or named.observed.startswith(("no named", "not named")):
        return named
    others = [(s, t) for s in full for t in range(1, s.terms.shape[1])]
    if max(error(s.terms[:, t], s.terms[:, 0]) for s, t in others) < TOLERANCE:
        return named

    def own_count(s: Solved) -> torch.Tensor:  # the first term's weight x the window's tokens / the micro-batch's
        c, _ = _counts(s.micro_batches)
        return s.terms[:, 0] * c.sum() / c
    worst = max(error(s.terms[:, t], own_count(s)) for s, t in others)
    if worst < TOLERANCE and named.observed == "normalize=tokens":
        return Named("normalization", "term_normalize=micro_batch", False, worst)
    s, t = max(others, key=lambda pair: error(pair[0].terms[:, pair[1]], pair[0].terms[:, 0]))
    ratios = " ".join(f"{float(r):.3f}" for r in s.terms[:, t] / s.terms[:, 0])
    return Named("normalization", f"no named term weighting: with the first term {named.observed}, term {t + 1} "
                                  "got other weights", False, None, f"term {t + 1} / term 1 per micro-batch: {ratios}")


def window(steps: Sequence[Solved], k: int, per_epoch: int, rule: Optional[Rule]) -> Named:
    """An epoch's short last window: weighted by what it holds (exact), divided by k as if full (k),
    skipped (drop), or completed by the next epoch's first micro-batches (carry)."""
    spanning = [s for s in steps if len({mb.epoch for mb in s.micro_batches}) > 1]
    if spanning:
        first = spanning[0].micro_batches
        worst = max(error(s.weights, rule(s.micro_batches, k, k)) for s in spanning) if rule else None
        return Named("window", "partial_window=carry", False, worst,
                     f"a step held epoch {first[0].epoch}'s micro-batch {first[0].index + 1} and epoch "
                     f"{first[-1].epoch}'s micro-batch {first[-1].index + 1}")
    short = [s for s in steps if 0 < len(s.micro_batches) < k]
    if short:
        if rule is None:
            return Named("window", "not named: the normalisation has no name", False)
        for name, factor in (("partial_window=exact", lambda m: 1.0), ("partial_window=k", lambda m: m / k)):
            worst = max(error(s.weights, rule(s.micro_batches, len(s.micro_batches), k) * factor(len(s.micro_batches)))
                        for s in short)
            if worst < TOLERANCE:
                return Named("window", name, name in EXACT["window"], worst)
        return _unnamed("window", short, lambda s: rule(s.micro_batches, len(s.micro_batches), k),
                        "a short window fits no named mode")
    rest = per_epoch % k
    if not rest:
        return Named("window", f"not named: k={k} divides the epoch's {per_epoch} micro-batches", False)
    weighted = {(mb.epoch, mb.index) for s in steps for mb, w in zip(s.micro_batches, s.weights)
                if abs(float(w)) > TOLERANCE * float(s.weights.abs().max())}
    epochs = {mb.epoch for s in steps for mb in s.micro_batches}
    trailing = {(e, i) for e in epochs for i in range(per_epoch - rest, per_epoch)}
    if epochs and not weighted & trailing:
        return Named("window", "partial_window=drop", False, None,
                     f"the last {rest} micro-batch(es) of each epoch never reached a step")
    return Named("window", "not named: no short window was stepped", False)


def schedule(steps: Sequence[Solved], lr_at: Callable[[int], float]) -> Named:
    """The learning rate at each step against the schedule's: advanced once per optimizer step, or once
    per micro-batch (k times too fast). `lr_at(i)`: the schedule's rate after i advances."""
    if len(steps) < 2:
        return Named("schedule", "not named: fewer than two steps", False)

    def off(observed: float, index: int) -> float:
        expected = lr_at(index)
        return abs(observed - expected) / max(abs(expected), 1e-12)

    per_step = max(off(s.lrs[0], i) for i, s in enumerate(steps))
    per_micro_batch, done = 0.0, 0
    for s in steps:
        m = len(s.micro_batches)
        per_micro_batch = max(per_micro_batch, min(off(s.lrs[0], done + j) for j in (0, m - 1, m)))
        done += m
    if per_step < TOLERANCE:
        return Named("schedule", "scheduler_every=step", True, per_step)
    if per_micro_batch < TOLERANCE:
        return Named("schedule", "scheduler_every=micro_batch", False, per_micro_batch)
    shown = ", ".join(f"{s.lrs[0]:.3g}" for s in steps)
    return Named("schedule", "no named schedule: the learning rates fit neither cadence", False, None,
                 f"learning rates at the steps: {shown}; the schedule's first: "
                 + ", ".join(f"{lr_at(i):.3g}" for i in range(len(steps))))


def clipped(basis: torch.Tensor, weights: torch.Tensor, clip_norm: float, every: str) -> torch.Tensor:
    """The weights after clip_grad_norm_(max_norm=clip_norm) per step, after each micro-batch's backward
    (the running gradient), or never; torch's coefficient max_norm / (norm + 1e-6), at most 1."""
    if every == "none":
        return weights
    if every == "step":
        return weights * min(1.0, clip_norm / (float((basis @ weights).norm()) + 1e-6))
    running = torch.zeros_like(weights)
    for i in range(len(weights)):
        running[i] = weights[i]
        running = running * min(1.0, clip_norm / (float((basis @ running).norm()) + 1e-6))
    return running


def clipping(steps: Sequence[Solved], k: int, clip_norm: float, rule: Optional[Rule]) -> Named:
    """Given the normalisation, simulate each clipping cadence on the step's own basis and compare."""
    if rule is None:
        return Named("clipping", "not named: the normalisation has no name", False)
    if not steps:
        return Named("clipping", "not named: no optimizer step", False)
    for name, every in (("clip_every=step", "step"), ("clip_every=micro_batch", "micro_batch"), ("clip=none", "none")):
        worst = max(error(s.weights, clipped(s.basis, rule(s.micro_batches, len(s.micro_batches), k), clip_norm, every))
                    for s in steps)
        if worst < TOLERANCE:
            return Named("clipping", name, name in EXACT["clipping"], worst)
    return _unnamed("clipping", steps, lambda s: clipped(s.basis, rule(s.micro_batches, len(s.micro_batches), k),
                                                         clip_norm, "step"), "no named clipping")
