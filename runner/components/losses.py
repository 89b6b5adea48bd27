"""Losses as nn.Modules, shaped like torch.nn's: a validated `reduction`, 'mean' by default.

Each built-in loss is an option of the `loss` group by one YAML naming it by `_target_`
(conf/loss/focal.yaml: `_target_: runner.components.losses.FocalLoss`, its arguments beside it), as
a loss of your own is. The class declares its keys next to itself (`Keys`: loss.alpha, loss.gamma,
each with its help and range; runner.config.components) and the task kinds it can score (`fits`,
runner.components.data.TaskSpec.kind; a loss that declares none fits any). `loss.reduction` is
handed to every class whose constructor takes it.

A loss made of named parts (multi-task, chained stages) also offers `parts(outputs, targets)`,
a dict of already-weighted components that sum to `forward`'s value; strategies that backward
the parts one by one use it, and the records log each as `loss_<name>`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Optional, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from runner.components.data import labels_of
from runner.config.keys import Choice, above, at_least, at_most, half_open, key

REDUCTIONS = ("none", "mean", "sum")


class BCE(nn.BCEWithLogitsLoss):
    """Binary cross-entropy on logits (torch.nn.BCEWithLogitsLoss): multi-label 0/1 targets."""

    fits = frozenset({"multilabel"})

    @dataclass
    class Keys:  # loss.reduction only (the group's own key)
        pass


class CE(nn.CrossEntropyLoss):
    """Cross-entropy over classes (torch.nn.CrossEntropyLoss): integer class targets."""

    fits = frozenset({"multiclass"})

    @dataclass
    class Keys:  # loss.reduction only (the group's own key)
        pass


@runtime_checkable
class MultiPartLoss(Protocol):
    """A loss made of named, already-weighted parts that sum to its value (loss_<name> columns;
    backward=separate backwards them one by one)."""

    def parts(self, outputs, targets) -> Dict[str, torch.Tensor]: ...


@runtime_checkable
class TokenLoss(Protocol):
    """A loss over the tokens of sequences (loss=lm), whose labels mark padding with an ignore
    index. The targets alone give the scored tokens, so a strategy counts the effective batch's
    before any forward. `normalization()` says what the loss divides by: "tokens" (the count it
    is handed as num_items_in_batch), "micro_batch" (its own tokens) or "sequence" (a mean per
    sequence, then over sequences)."""

    def count_tokens(self, targets) -> torch.Tensor: ...

    def normalization(self) -> str: ...


@runtime_checkable
class RoutedLoss(Protocol):
    """A loss with a load-balancing term over a mixture-of-experts router's statistics (loss=lm
    with loss.aux_weight > 0 on model=moe). `count_load(expert_mask, targets)`: tokens per expert
    over the scored positions. `load_statistics()`: "window" when every micro-batch's term needs
    the whole window's load, counted first and handed to it as `expert_load` (as a token count
    is handed as num_items_in_batch), "micro_batch" when each uses its own."""

    def count_load(self, expert_mask, targets) -> torch.Tensor: ...

    def load_statistics(self) -> str: ...


def logits_of(outputs) -> torch.Tensor:
    """The logits of a model's output: the output itself, or the `logits` entry of a mapping (model=moe's
    dict, a Hugging Face ModelOutput, which subclasses OrderedDict)."""
    return outputs["logits"] if isinstance(outputs, Mapping) else outputs


@runtime_checkable
class EmbeddingLoss(Protocol):
    """A loss over a batch of embeddings, (B, 2, dim): query i against every key of the batch
    (in-batch negatives). Its value couples the batch, so backward=gradcache takes it on the whole
    batch's embeddings at once. `similarity(queries, keys)` is the (Q, K) score it ranks keys by
    (cosine for infonce, which held-out retrieval ranks by too)."""

    def similarity(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor: ...


def offers(obj, protocol) -> bool:
    """isinstance(obj, protocol) for a Protocol of methods, decided once per class: the step
    asks on every micro-batch, and a runtime Protocol check costs microseconds each time."""
    return _class_offers(type(obj), protocol)


@lru_cache(maxsize=None)
def _class_offers(cls: type, protocol) -> bool:
    return issubclass(cls, protocol)


def per_count(total: torch.Tensor, count) -> torch.Tensor:
    """total / count, 0 where nothing is scored: a micro-batch, or a sequence-parallel rank's slice of the positions,
    may hold no scored token (count 0, total 0), and adds nothing rather than NaN (prime-rl's max(loss_scale, 1))."""
    return total / (count.clamp(min=1) if isinstance(count, torch.Tensor) else max(count, 1))


def divisor(loss_fn, targets, num_items_in_batch=None):
    """What a token loss (TokenLoss) divides its summed loss by: the window's count it is handed as
    num_items_in_batch under normalize=tokens or double, else its own count of the targets."""
    if num_items_in_batch is not None and loss_fn.normalize in ("tokens", "double"):
        return num_items_in_batch
    return loss_fn.count_tokens(targets)


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


def softmax_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0, reduction: str = "mean") -> torch.Tensor:
    """The multi-class (softmax) form: FL = -alpha (1 - p_t)^gamma log(p_t), with p_t the softmax
    probability of the true class (Lin et al. 2017; alpha is one weight for all classes here).

    log(1 - p_t) is computed as logsumexp over the other classes minus logsumexp over all, which
    stays finite, with a finite gradient, when p_t rounds to 1.
    """
    check_reduction(reduction)
    log_norm = torch.logsumexp(logits, dim=1)
    loss = log_norm - logits.gather(1, targets[:, None]).squeeze(1)  # -log p_t
    if gamma != 0:
        true_class = F.one_hot(targets, logits.shape[1]).bool()
        log_rest = torch.logsumexp(logits.masked_fill(true_class, float("-inf")), dim=1)
        loss = torch.exp(gamma * (log_rest - log_norm)) * loss
    if alpha >= 0:
        loss = alpha * loss
    return reduce(loss, reduction)


class FocalLoss(nn.Module):
    """Sigmoid focal loss for binary 0/1 targets; the softmax form for integer class targets."""

    fits = frozenset({"multilabel", "multiclass"})

    @dataclass
    class Keys:
        alpha: float = key(0.25, "focal: the weight of positives; < 0 turns the alpha weighting off",
                           allowed=at_most(1, note=" (or < 0 to disable)"))
        gamma: float = key(2.0, "focal: the focusing parameter (gamma=0 with alpha<0 is bce)", allowed=at_least(0))

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean"):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if alpha > 1:
            raise ValueError(f"alpha must be <= 1 (or < 0 to disable), got {alpha}")
        self.alpha, self.gamma, self.reduction = alpha, gamma, check_reduction(reduction)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not targets.is_floating_point():
            return softmax_focal_loss(logits, targets, self.alpha, self.gamma, self.reduction)
        return sigmoid_focal_loss(logits, targets, self.alpha, self.gamma, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


class Normalize(Choice):
    tokens = "tokens", "the summed loss / the effective batch's non-ignored tokens: exact under any split"
    micro_batch = "micro_batch", "the mean over each micro-batch's tokens (the Trainer before transformers #34191)"
    sequence = "sequence", "the mean over each sequence's tokens, then over sequences (another objective)"
    double = "double", ("tokens, then divided again by backward.accumulation when backwarded (TRL #2617, "
                        "axolotl #2262): the gradient is 1/k of the batch's, which only some optimizers notice")


class TermNormalize(Choice):
    """lm with a second term (loss.label_smoothing, or the load-balancing term): what that term divides by."""

    window = "window", ("the window's count, as the main term (num_items_in_batch): exact (transformers PR #47261)")
    micro_batch = "micro_batch", ("each micro-batch's own, the term kept as a per-micro-batch mean after the main term "
                                  "moved to num_items_in_batch: k times its weight (transformers #46731, verl #7200, "
                                  "NeMo-RL PR #3791)")


class Boundaries(Choice):
    """lm on packed rows (data.packing=true): how the token count treats each document boundary."""

    once = "once", ("a boundary's label is masked, and not counted: the row's scored tokens (unsloth-zoo PR #1066)")
    twice = "twice", ("the masked boundaries subtracted from the count once more, so a row of T tokens and N documents "
                      "divides by T - 2N + 1 instead of T - N (unsloth-zoo PR #348, fixed by PR #1066)")


class AuxStats(Choice):
    window = "window", "f_i over the whole window, counted first by a router-only pass: exact (torchtitan PR #4772)"
    micro_batch = "micro_batch", "each micro-batch's own f_i: accumulation's default (refused by torchtitan PR #3000)"


class TokenCrossEntropy(nn.Module):
    """Next-token cross-entropy over scored positions (labels != ignore_index), normalised by:

    - "tokens": the summed loss / the number of scored tokens. A micro-batch's call is handed
      the effective batch's count (num_items_in_batch, counted from the targets first), so
      micro-batch losses add up to the full batch's exactly: the Hugging Face Trainer's fix of
      2024 (transformers PRs #34191, #34198) and torchtune's (PR #1875).
    - "micro_batch": each call's own token mean, whatever it is handed. Weighted per example by
      the strategy, (x1/n1) + (x2/n2) is not (x1 + x2)/(n1 + n2) when n1 != n2: the old bug.
    - "sequence": each sequence's token mean, then the mean over sequences: a mean over examples,
      so the usual per-example weighting is exact (a different objective from "tokens").
    - "double": "tokens" here; the micro-batched strategies divide it again by the accumulation k
      when they backward it, as a trainer that hands num_items_in_batch and still divides by
      gradient_accumulation_steps does (TRL #2617, axolotl #2262, Liger-Kernel #802, unsloth PR
      #3597). The logged loss stays the batch's.
    """

    NORMALIZE = tuple(member.value for member in Normalize)

    def __init__(self, normalize: str = "tokens", ignore_index: int = -100, boundaries: str = "once"):
        super().__init__()
        if normalize not in self.NORMALIZE:
            raise ValueError(f"loss.normalize={normalize} is not allowed: expected one of {list(self.NORMALIZE)}")
        self.normalize, self.ignore_index, self.boundaries = normalize, ignore_index, boundaries
        self.reduction = "mean"

    def count_tokens(self, targets) -> torch.Tensor:
        """The tokens the loss divides by: the scored ones; with boundaries=twice on packed rows, less each row's
        documents after its first, whose masked boundaries were not counted already (unsloth-zoo PR #348)."""
        count = (labels_of(targets) != self.ignore_index).sum()
        if self.boundaries == "twice" and isinstance(targets, Mapping) and "documents" in targets:
            count = count - (targets["documents"] - 1).sum()
        return count

    def normalization(self) -> str:
        return self.normalize

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                num_items_in_batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        labels = labels_of(targets)
        per_token = F.cross_entropy(logits_of(logits).flatten(0, -2), labels.flatten(), ignore_index=self.ignore_index,
                                    reduction="none").view(labels.shape)
        if self.normalize == "sequence":
            scored = (labels != self.ignore_index).sum(dim=1).clamp(min=1)
            return (per_token.sum(dim=1) / scored).mean()
        return per_count(per_token.sum(), divisor(self, targets, num_items_in_batch))

    def extra_repr(self) -> str:
        return f"normalize={self.normalize!r}, ignore_index={self.ignore_index}, boundaries={self.boundaries!r}"


class SmoothedTokenLoss(TokenCrossEntropy):
    """lm with loss.label_smoothing=eps: (1 - eps) x the next-token cross-entropy (part `lm`) plus eps x the
    cross-entropy against the uniform distribution (part `smoothing`), together F.cross_entropy(label_smoothing=eps).
    Each term declares its denominator: `lm` the one loss.normalize says; `smoothing` the same with
    term_normalize=window (exact), or each micro-batch's own tokens with term_normalize=micro_batch (the bug)."""

    def __init__(self, normalize: str = "tokens", label_smoothing: float = 0.1, term_normalize: str = "window",
                 ignore_index: int = -100, boundaries: str = "once"):
        super().__init__(normalize, ignore_index, boundaries)
        if normalize == "sequence":
            raise ValueError("loss.label_smoothing is not allowed with loss.normalize=sequence: expected tokens, "
                             "micro_batch or double (or loss.label_smoothing=0)")
        self.label_smoothing, self.term_normalize = label_smoothing, term_normalize

    def parts(self, logits, targets, num_items_in_batch=None) -> Dict[str, torch.Tensor]:
        logp, labels = torch.log_softmax(logits_of(logits), dim=-1), labels_of(targets)
        scored = labels != self.ignore_index
        nll = -(logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * scored).sum()
        uniform = -(logp.mean(dim=-1) * scored).sum()
        own, count = self.count_tokens(targets), divisor(self, targets, num_items_in_batch)
        term_count = count if self.term_normalize == "window" else own
        return {"lm": per_count((1 - self.label_smoothing) * nll, count),
                "smoothing": per_count(self.label_smoothing * uniform, term_count)}

    def forward(self, logits, targets, num_items_in_batch=None) -> torch.Tensor:
        return sum(self.parts(logits, targets, num_items_in_batch).values())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, label_smoothing={self.label_smoothing}, term_normalize={self.term_normalize!r}"


class LoadBalancedTokenLoss(TokenCrossEntropy):
    """Next-token cross-entropy (part `lm`) plus Switch Transformer's load-balancing loss (part
    `aux`): aux_weight * E * sum_i f_i * P_i, with f_i the share of the routed assignments sent to
    expert i (k per scored token, so f sums to 1 and a perfectly even router scores 1) and P_i the
    mean router probability of expert i over the scored tokens (Fedus et al. 2021, eq. 4-6).

    f_i and P_i are statistics of a batch, so a micro-batch's own are not the window's (the
    load-balancing loss is batch-coupled). aux_stats="window" is exact: f_i is the window's,
    counted first by a pass that stops at the router (`expert_load`, runner.components.models.Router),
    and each micro-batch adds E * sum_i f_i * (its tokens' summed p_i) / (the window's tokens),
    that is f_i * P_i over its own tokens weighted by its share of them (torchtitan PR #4772,
    arXiv 2501.11873, global-batch load balancing). aux_stats="micro_batch" takes each
    micro-batch's own f_i: what accumulating micro-batches gives by default, which torchtitan
    refuses (PR #3000). P_i is divided as the lm part is: by the window's tokens when it is
    handed num_items_in_batch (normalize=tokens), else by its own.
    """

    AUX_STATS = tuple(member.value for member in AuxStats)

    def __init__(self, normalize: str = "tokens", aux_weight: float = 0.01, aux_stats: str = "window",
                 ignore_index: int = -100, term_normalize: str = "window", boundaries: str = "once"):
        super().__init__(normalize, ignore_index, boundaries)
        if aux_stats not in self.AUX_STATS:
            raise ValueError(f"loss.aux_stats={aux_stats} is not allowed: expected one of {list(self.AUX_STATS)}")
        self.aux_weight, self.aux_stats, self.term_normalize = aux_weight, aux_stats, term_normalize

    def count_load(self, expert_mask: torch.Tensor, targets) -> torch.Tensor:
        return expert_mask[labels_of(targets) != self.ignore_index].sum(dim=0)

    def load_statistics(self) -> str:
        return self.aux_stats

    def balance(self, outputs: Dict[str, torch.Tensor], targets: torch.Tensor,
                num_items_in_batch: Optional[torch.Tensor] = None,
                expert_load: Optional[torch.Tensor] = None) -> torch.Tensor:
        """E * sum_i f_i * P_i, unweighted; f from `expert_load` (the window's) when handed."""
        scored = labels_of(targets) != self.ignore_index
        load = expert_load if expert_load is not None else self.count_load(outputs["expert_mask"], targets)
        share = load / load.sum().clamp(min=1)  # f_i: no gradient (counts of a top-k)
        tokens = divisor(self, targets, num_items_in_batch) if self.term_normalize == "window" \
            else self.count_tokens(targets)
        mean_probs = per_count(outputs["router_probs"][scored].sum(dim=0), tokens)  # P_i, over `tokens`
        return load.shape[0] * (share * mean_probs).sum()

    def parts(self, outputs, targets, num_items_in_batch=None, expert_load=None) -> Dict[str, torch.Tensor]:
        return {"lm": super().forward(outputs, targets, num_items_in_batch),
                "aux": self.aux_weight * self.balance(outputs, targets, num_items_in_batch, expert_load)}

    def forward(self, outputs, targets, num_items_in_batch=None, expert_load=None) -> torch.Tensor:
        return sum(self.parts(outputs, targets, num_items_in_batch, expert_load).values())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, aux_weight={self.aux_weight}, aux_stats={self.aux_stats!r}"


def language_model_loss(normalize: str = "tokens", aux_weight: float = 0.0, aux_stats: str = "window",
                        label_smoothing: float = 0.0, term_normalize: str = "window", boundaries: str = "once"):
    """loss=lm: next-token cross-entropy (TokenCrossEntropy), with Switch Transformer's load-balancing
    term where aux_weight > 0 (LoadBalancedTokenLoss: a model with a router, model=moe), or label smoothing's
    term where label_smoothing > 0 (SmoothedTokenLoss); the second term divided as term_normalize says, every
    count on packed rows as boundaries says."""
    normalize, aux_stats = getattr(normalize, "value", normalize), getattr(aux_stats, "value", aux_stats)
    term_normalize = getattr(term_normalize, "value", term_normalize)
    boundaries = getattr(boundaries, "value", boundaries)
    if aux_weight > 0 and label_smoothing > 0:
        raise ValueError(f"loss.label_smoothing={label_smoothing} is not allowed with loss.aux_weight={aux_weight}: "
                         "expected one second term, label smoothing or load balancing")
    if aux_weight > 0:
        return LoadBalancedTokenLoss(normalize, aux_weight, aux_stats, term_normalize=term_normalize,
                                     boundaries=boundaries)
    if label_smoothing > 0:
        return SmoothedTokenLoss(normalize, label_smoothing, term_normalize, boundaries=boundaries)
    return TokenCrossEntropy(normalize=normalize, boundaries=boundaries)


@dataclass
class _LanguageModelKeys:
    normalize: Normalize = key(Normalize.tokens, "lm: what the token loss is divided by")
    aux_weight: float = key(0.0, "lm on model=moe: the weight of Switch Transformer's load-balancing loss "
                                 "E * sum_i f_i * P_i (part `aux`); 0 = none (> 0 needs a model with a router)",
                            allowed=at_least(0, note=" (0 = no load-balancing loss)"))
    aux_stats: AuxStats = key(AuxStats.window, "lm with aux_weight > 0: whose expert load f_i a micro-batch's "
                                               "term uses")
    label_smoothing: float = key(0.0, "lm: the weight eps of the cross-entropy against the uniform distribution (part "
                                      "`smoothing`), as F.cross_entropy(label_smoothing=eps); 0 = none",
                                 allowed=half_open(0, 1, note=" (0 = no label smoothing)"))
    term_normalize: TermNormalize = key(TermNormalize.window, "lm with a second term (label_smoothing, aux_weight): "
                                                              "what that term divides by")
    boundaries: Boundaries = key(Boundaries.once, "lm on packed rows (data.packing=true): how the token count treats "
                                                  "each document boundary")


language_model_loss.Keys = _LanguageModelKeys
language_model_loss.fits = frozenset({"sequence"})


class Aggregation(Choice):
    """loss=grpo: how the per-token surrogate becomes the loss."""

    token_mean = "token_mean", ("the sum over scored tokens / their count (DAPO; verl loss_agg_mode=token-mean, "
                                "globally normalised by PR #3994; TRL loss_type=dapo): exact with loss.normalize=tokens")
    sequence_mean = "sequence_mean", "each sequence's token mean, then the mean over sequences (GRPO; TRL loss_type=grpo)"
    sequence_sum = "sequence_sum", "each sequence's token sum, then the mean over sequences (verl seq-mean-token-sum)"
    constant = "constant", ("the token sum / (sequences x the padded length): Dr. GRPO (arXiv 2503.20783; TRL "
                            "loss_type=dr_grpo)")


class PolicyGradient(nn.Module):
    """GRPO's clipped surrogate per scored token (Shao et al. 2024, DeepSeekMath; PPO's clip): with r = exp(logp -
    old_logp), -min(r A, clip(r, 1 - clip_ratio, 1 + clip_ratio) A), plus kl_weight x the k3 estimator of
    KL(policy || initial policy), exp(d) - d - 1 with d = old_logp - logp (the rollouts' old policy is the
    initial one). Targets: data=rollouts' `labels`, `advantages` and `old_logprobs`."""

    fits = frozenset({"rollout"})
    ignore_index = -100

    def __init__(self, clip_ratio: float = 0.2, kl_weight: float = 0.0):
        super().__init__()
        self.clip_ratio, self.kl_weight = clip_ratio, kl_weight
        self.reduction = "mean"

    def per_token(self, outputs, targets) -> torch.Tensor:
        """The surrogate at every position, 0 where the label is ignored."""
        labels = targets["labels"]
        scored = labels != self.ignore_index
        logp = torch.log_softmax(logits_of(outputs), dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        old, advantages = targets["old_logprobs"], targets["advantages"][:, None]
        ratio = torch.exp(logp - old)
        loss = -torch.minimum(ratio * advantages,
                              ratio.clamp(1 - self.clip_ratio, 1 + self.clip_ratio) * advantages)
        if self.kl_weight:
            delta = old - logp
            loss = loss + self.kl_weight * (torch.exp(delta) - delta - 1)
        return loss * scored

    def count_rows_tokens(self, targets) -> torch.Tensor:
        return (targets["labels"] != self.ignore_index).sum(dim=1)


class TokenMeanPolicyGradient(PolicyGradient):
    """aggregation=token_mean: a token loss, handed the window's scored tokens (num_items_in_batch) like lm."""

    def __init__(self, clip_ratio: float = 0.2, kl_weight: float = 0.0, normalize: str = "tokens",
                 count_window: int = 0):
        super().__init__(clip_ratio, kl_weight)
        if normalize not in ("tokens", "micro_batch", "double"):
            raise ValueError(f"loss.normalize={normalize} is not allowed with loss.aggregation=token_mean: expected "
                             "tokens, micro_batch or double")
        self.normalize = normalize
        # loss.count_window=M: the normaliser counts M micro-batches' tokens while the optimizer steps every k
        # (runner.training.weighting weights the backwarded loss by k/M; 0: the window's own count, exact).
        self.count_window = count_window

    def count_tokens(self, targets) -> torch.Tensor:
        return (targets["labels"] != self.ignore_index).sum()

    def normalization(self) -> str:
        return self.normalize

    def forward(self, outputs, targets, num_items_in_batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        return per_count(self.per_token(outputs, targets).sum(), divisor(self, targets, num_items_in_batch))


class SequencePolicyGradient(PolicyGradient):
    """aggregation=sequence_mean, sequence_sum or constant: a value per sequence, then the mean over sequences:
    a mean over examples, which the usual per-example weighting makes exact under any split."""

    def __init__(self, clip_ratio: float = 0.2, kl_weight: float = 0.0, aggregation: str = "sequence_mean"):
        super().__init__(clip_ratio, kl_weight)
        self.aggregation = aggregation

    def forward(self, outputs, targets) -> torch.Tensor:
        summed = self.per_token(outputs, targets).sum(dim=1)
        if self.aggregation == "sequence_mean":
            return (summed / self.count_rows_tokens(targets).clamp(min=1)).mean()
        if self.aggregation == "sequence_sum":
            return summed.mean()
        return (summed / targets["labels"].shape[1]).mean()  # constant: the padded length, the same in every batch


def policy_gradient_loss(aggregation: str = "token_mean", clip_ratio: float = 0.2, kl_weight: float = 0.0,
                         normalize: str = "tokens", count_window: int = 0):
    """loss=grpo: GRPO's clipped surrogate (PolicyGradient) aggregated as loss.aggregation says."""
    aggregation, normalize = getattr(aggregation, "value", aggregation), getattr(normalize, "value", normalize)
    if aggregation == "token_mean":
        return TokenMeanPolicyGradient(clip_ratio, kl_weight, normalize, count_window)
    if count_window:
        raise ValueError(f"loss.count_window={count_window} is not allowed with loss.aggregation={aggregation}: it "
                         "counts the tokens a token mean divides by, expected loss.aggregation=token_mean (or 0)")
    return SequencePolicyGradient(clip_ratio, kl_weight, aggregation)


@dataclass
class _PolicyGradientKeys:
    aggregation: Aggregation = key(Aggregation.token_mean, "grpo: how the per-token surrogate becomes the loss")
    clip_ratio: float = key(0.2, "grpo: the surrogate's clip, r in [1 - clip_ratio, 1 + clip_ratio]", allowed=above(0))
    kl_weight: float = key(0.0, "grpo: the weight of the k3 KL estimate to the initial policy; 0 = none",
                           allowed=at_least(0, note=" (0 = no KL term)"))
    normalize: Normalize = key(Normalize.tokens, "lm: what the token loss is divided by")
    count_window: int = key(0, "grpo with aggregation=token_mean: the normaliser counts the tokens of M micro-batches "
                               "(M micro-batches of the window's mean count) while the optimizer steps every k, as "
                               "TRL's num_items_in_batch counted steps_per_generation micro-batches (PR #6024): the "
                               "gradient is k/M of the exact one; 0 = the window's own count (exact)",
                            allowed=at_least(0, integer=True, note=" (0 = the window's own count)"))


policy_gradient_loss.Keys = _PolicyGradientKeys
policy_gradient_loss.fits = PolicyGradient.fits


class DPOLoss(nn.Module):
    """Direct Preference Optimisation (Rafailov et al. 2023): -log sigmoid(beta x ((logp_c - ref_c) - (logp_r - ref_r)))
    per pair, each sequence's log-probability summed over its scored tokens, the reference the initial policy's
    (data=preference_pairs' `ref_logps`); the mean over pairs. A mean over examples: weighting each micro-batch
    by its share of the window's pairs is exact, dividing each micro-batch's mean by k (backward.scale=mean) is
    not when the pairs are packed unevenly (ms-swift PR #10144: a 1+3 split weighted its pairs 1/2, 1/6, 1/6, 1/6)."""

    fits = frozenset({"preference"})
    ignore_index = -100

    @dataclass
    class Keys:
        beta: float = key(0.1, "dpo: the implicit reward's scale (the KL penalty's inverse)", allowed=above(0))

    def __init__(self, beta: float = 0.1):
        super().__init__()
        self.beta = beta
        self.reduction = "mean"

    def margins(self, outputs, targets) -> torch.Tensor:
        """beta x ((logp_c - ref_c) - (logp_r - ref_r)) per pair."""
        labels = targets["labels"]
        logp = torch.log_softmax(logits_of(outputs), dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        sequence = (logp * (labels != self.ignore_index)).sum(dim=-1) - targets["ref_logps"]
        return self.beta * (sequence[:, 0] - sequence[:, 1])

    def forward(self, outputs, targets) -> torch.Tensor:
        return -F.logsigmoid(self.margins(outputs, targets)).mean()


def cosine_similarity(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(Q, dim), (K, dim) -> (Q, K) cosine similarities."""
    return F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T


class InfoNCE(nn.Module):
    """InfoNCE with in-batch negatives (van den Oord et al. 2018; SimCLR, CLIP; sentence-transformers'
    MultipleNegativesRankingLoss): for embeddings (B, 2, dim), query i's positive is key i and the
    other B - 1 keys of the batch are its negatives; the loss is the cross-entropy of the cosine
    similarities divided by `temperature`. symmetric=True averages it with the keys-to-queries loss
    (CLIP's). The targets are not read. A micro-batch's loss sees only its own keys, so the sum
    of micro-batch losses is another objective: accumulating it is not the batch's gradient.
    """

    fits = frozenset({"retrieval"})

    @dataclass
    class Keys:
        temperature: float = key(0.05, "infonce: cosine similarities are divided by it before the softmax (0.05 = "
                                       "sentence-transformers' scale 20)", allowed=above(0))
        symmetric: bool = key(False, "infonce: also score each key against every query, and average the two losses")

    def __init__(self, temperature: float = 0.05, symmetric: bool = False, reduction: str = "mean"):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"loss.temperature={temperature} is not allowed: expected > 0")
        self.temperature, self.symmetric = temperature, symmetric
        self.reduction = check_reduction(reduction)

    def similarity(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return cosine_similarity(queries, keys)

    def forward(self, embeddings: torch.Tensor, targets=None) -> torch.Tensor:
        logits = self.similarity(embeddings[:, 0], embeddings[:, 1]) / self.temperature
        positives = torch.arange(len(logits), device=logits.device)
        loss = F.cross_entropy(logits, positives, reduction=self.reduction)
        if self.symmetric:
            loss = (loss + F.cross_entropy(logits.T, positives, reduction=self.reduction)) / 2
        return loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, symmetric={self.symmetric}, reduction={self.reduction!r}"


class PerStage(nn.Module):
    """One loss applied to each stage's output of a chained model: the answer's l1 and l2.

    parts() gives {"stage1": loss(a, y), "stage2": loss(b, y)}; forward() their sum.
    """

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.reduction = getattr(base, "reduction", "mean")

    def parts(self, outputs: Dict[str, torch.Tensor], targets) -> Dict[str, torch.Tensor]:
        return {name: self.base(output, targets) for name, output in outputs.items()}

    def forward(self, outputs, targets) -> torch.Tensor:
        return sum(self.parts(outputs, targets).values())


class MultiTaskLoss(nn.Module):
    """Weighted sum of named task losses: BCE-with-logits for `cls`, MSE for `reg`.

    weighting="fixed": sum_t w_t L_t. weighting="uncertainty" learns s_t = log(sigma_t^2) per task
    (Kendall, Gal & Cipolla 2018, in the stable log-variance form): exp(-s) L + s/2 for a
    classification task, exp(-s) L / 2 + s/2 for a regression task.
    """

    TASKS = {"cls": F.binary_cross_entropy_with_logits, "reg": F.mse_loss}
    REGRESSION = {"reg"}
    DEFAULT_WEIGHTS = {"cls": 0.5, "reg": 0.5}
    fits = frozenset({"multitask"})

    @dataclass
    class Keys:
        weights: Dict[str, float] = key(help="multitask: the weight of each task (loss.weights.cls, loss.weights.reg)",
                                        default_factory=lambda: dict(MultiTaskLoss.DEFAULT_WEIGHTS))
        weighting: str = key("fixed", "multitask: fixed weights, or uncertainty (learned, Kendall et al. 2018)",
                             values="fixed | uncertainty")

    def __init__(self, weights: Dict[str, float] | None = None, weighting: str = "fixed",
                 reduction: str = "mean"):
        super().__init__()
        unknown = set(weights or {}) - set(self.TASKS)
        if unknown:
            raise ValueError(f"loss.weights has unknown task(s) {sorted(unknown)}: expected {sorted(self.TASKS)}")
        if weighting not in ("fixed", "uncertainty"):
            raise ValueError(f"loss.weighting={weighting} is not allowed: expected fixed or uncertainty")
        self.weights = {**self.DEFAULT_WEIGHTS, **(weights or {})}
        self.weighting = weighting
        self.reduction = check_reduction(reduction)
        if weighting == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(len(self.TASKS)))

    def parts(self, outputs: Dict[str, torch.Tensor], targets: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        parts = {}
        for i, (name, fn) in enumerate(self.TASKS.items()):
            loss = fn(outputs[name], targets[name], reduction=self.reduction)
            if self.weighting == "fixed":
                parts[name] = self.weights[name] * loss
            else:
                s = self.log_vars[i]
                factor = 0.5 if name in self.REGRESSION else 1.0
                parts[name] = factor * torch.exp(-s) * loss + 0.5 * s
        return parts

    def forward(self, outputs, targets) -> torch.Tensor:
        return sum(self.parts(outputs, targets).values())


def per_stage(loss, spec):
    """Score every stage of a chained model with the loss (the chained answer's l1 and l2)."""
    return PerStage(loss) if spec.stages else loss


def loss_parts(loss_fn, outputs, targets, **kwargs) -> Dict[str, torch.Tensor]:
    """The loss's named components (weighted, summing to the total), or {} for a one-part loss.
    `kwargs`: what a strategy hands the loss (a token count, the window's expert load)."""
    return loss_fn.parts(outputs, targets, **kwargs) if offers(loss_fn, MultiPartLoss) else {}


def is_sum_reduced(loss_fn) -> bool:
    return getattr(loss_fn, "reduction", "mean") == "sum"


def exact_share(loss_fn, targets, batch_tokens, row_share: float):
    """A part's exact share of the batch's loss, the part normalised by itself: of the batch's
    scored tokens for a token mean (`batch_tokens`: the batch's count, None for other losses),
    all of it for a sum-reduced loss, else its share of the rows (sequences). Micro-batches and
    ranks (runner.execution.parallel) are weighted by it. A tensor for a token loss: no host sync."""
    if batch_tokens is not None and loss_fn.normalization() in ("tokens", "micro_batch", "double"):
        return loss_fn.count_tokens(targets) / batch_tokens
    return 1.0 if is_sum_reduced(loss_fn) else row_share
