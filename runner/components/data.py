"""Seeded synthetic data and the split of a batch into weighted micro-batches.

Labels come from a hidden random teacher network, so a student can learn them and loss curves
fall. Everything here draws from its own `torch.Generator` seeded by `seed` alone: data, data
order and held-out split never depend on the loss or backward choice, and building a data set
leaves the global RNG untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch

Targets = Union[torch.Tensor, Dict[str, torch.Tensor]]

# Offsets keep the generators of different concerns independent of each other.
_TEACHER_STREAM = 1_000_003
_ORDER_STREAM = 2_000_003
_SPLIT_STREAM = 3_000_017

# The label of a position that is not scored (padding): torch's cross_entropy ignore_index default.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TaskSpec:
    """What a model consumes and predicts; the data set is built to match it."""

    input_shape: tuple  # one example, e.g. (3, 10, 10)
    kind: str  # multilabel | multiclass | multitask | regression | sequence (next-token labels) | retrieval (pairs)
    outputs: int  # labels (multilabel), classes (multiclass)
    stages: tuple = ()  # names of a chained model's outputs, each scored against the targets


@dataclass
class MicroBatch:
    inputs: torch.Tensor
    targets: Targets
    weight: float  # the factor the strategy's scale gives it (scale=size: its share of the batch's rows)
    share: float  # its share of the batch's rows, whatever the scale


def map_targets(targets: Targets, fn) -> Targets:
    if isinstance(targets, dict):
        return {k: fn(v) for k, v in targets.items()}
    return fn(targets)


def split_targets(targets: Targets, k: Union[int, List[int]]) -> List[Targets]:
    """tensor_split into k pieces, or split into pieces of the given sizes."""
    cut = (lambda t: torch.tensor_split(t, k)) if isinstance(k, int) else (lambda t: torch.split(t, k))
    if isinstance(targets, dict):
        pieces = {name: cut(t) for name, t in targets.items()}
        return [{name: pieces[name][i] for name in targets} for i in range(k if isinstance(k, int) else len(k))]
    return list(cut(targets))


def micro_batches(inputs: torch.Tensor, targets: Targets, k: int, scale: str = "size",
                  sizes: Optional[List[int]] = None) -> List[MicroBatch]:
    """`torch.tensor_split` into k micro-batches (sizes differ by at most one), or into the given
    `sizes` (loader mode: the micro-batches the DataLoader drew, however many there are).

    scale="size" weights each micro-batch by its share of the batch, which makes the weighted sum
    of mean losses equal the full-batch mean loss exactly (the identity of the accumulation answer,
    f(x,y) = (i/b) f(x[:i],y[:i]) + (1-i/b) f(x[i:],y[i:])). scale="mean" divides by k, which is the
    same only when k divides the batch; it is kept to show that error on uneven splits. scale="none"
    divides by nothing: k times the batch's loss on even splits.
    """
    batch = inputs.shape[0]
    if sizes is None:
        if not 1 <= k <= batch:
            raise ValueError(f"cannot split a batch of {batch} into {k} micro-batches")
        xs, ys = torch.tensor_split(inputs, k), split_targets(targets, k)
    else:
        xs, k = torch.split(inputs, sizes), len(sizes)
        ys = split_targets(targets, sizes)
    shares = [x.shape[0] / batch for x in xs]
    if scale == "size":
        weights = shares
    elif scale == "mean":
        weights = [1.0 / k] * k
    elif scale == "none":  # each micro-batch's mean loss undivided: k times the batch's (a Trainer's compute_loss_func)
        weights = [1.0] * k
    else:
        raise ValueError(f"scale must be 'size', 'mean' or 'none', got {scale!r}")
    return [MicroBatch(x, y, w, share) for x, y, w, share in zip(xs, ys, weights, shares)]


class Teacher(torch.nn.Module):
    """A random two-layer network whose outputs define the labels."""

    def __init__(self, in_features: int, outputs: int, generator: torch.Generator, hidden: int = 32):
        super().__init__()
        self.w1 = torch.randn(in_features, hidden, generator=generator) / in_features**0.5
        self.w2 = torch.randn(hidden, outputs, generator=generator) / hidden**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.flatten(1) @ self.w1) @ self.w2


def _binary_labels(scores: torch.Tensor, positive_rate: float, noise: float, g: torch.Generator) -> torch.Tensor:
    # Thresholds per output at the (1 - rate) quantile give about `rate` positives in every column.
    thresholds = torch.quantile(scores, 1.0 - positive_rate, dim=0, keepdim=True)
    labels = (scores > thresholds).float()
    if noise > 0:
        flip = torch.rand(labels.shape, generator=g) < noise
        labels = torch.where(flip, 1.0 - labels, labels)
    return labels


def make_examples(spec: TaskSpec, n: int, seed: int, positive_rate: float = 0.5, noise: float = 0.0):
    """n examples (float32 inputs, targets) for `spec`, a pure function of the seed."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn((n, *spec.input_shape), generator=g)
    teacher_g = torch.Generator().manual_seed(seed + _TEACHER_STREAM)
    in_features = int(torch.tensor(spec.input_shape).prod())
    if spec.kind == "multilabel":
        scores = Teacher(in_features, spec.outputs, teacher_g)(inputs)
        targets: Targets = _binary_labels(scores, positive_rate, noise, g)
    elif spec.kind == "multiclass":
        scores = Teacher(in_features, spec.outputs, teacher_g)(inputs)
        targets = scores.argmax(dim=1)
    elif spec.kind == "multitask":
        scores = Teacher(in_features, 2, teacher_g)(inputs)
        targets = {
            "cls": _binary_labels(scores[:, :1], positive_rate, noise, g),
            "reg": scores[:, 1:2].clone(),
        }
    else:
        raise ValueError(f"unknown task kind {spec.kind!r}")
    return inputs, targets


def synthetic(spec: TaskSpec, seed: int, train_size: int, eval_size: int, batch_size: int,
              positive_rate: float = 0.5, noise: float = 0.0) -> "Dataset":
    """The teacher's examples for `spec`: train_size to train on, eval_size held out."""
    inputs, targets = make_examples(spec, train_size + eval_size, seed, positive_rate, noise)
    return Dataset(inputs, targets, seed, train_size, batch_size)


def markov_sequences(vocab: int, n: int, seed: int, min_length: int, max_length: int, topics: int = 0,
                     with_topics: bool = False):
    """n token sequences from a hidden random Markov chain, as (inputs, next-token labels).

    Lengths are drawn uniformly from min_length..max_length; a sequence of length L gives L - 1
    scored positions. Rows are right-padded to max_length - 1: padded inputs are token 0 and
    padded labels IGNORE_INDEX, so a token loss must count the scored positions, not the rows.
    `topics` > 0: each sequence draws a topic, and each topic has its own chain, which favours
    the topic's slice of the vocabulary (first token included): sequences of one topic share
    tokens and so routes through a mixture of experts. `with_topics`: also return each sequence's topic.
    """
    g = torch.Generator().manual_seed(seed)
    chain = torch.Generator().manual_seed(seed + _TEACHER_STREAM)
    # Peaked transitions: each token has a few likely successors, so the loss can fall well below log(vocab).
    logits = 3.0 * torch.randn(max(topics, 1), vocab, vocab, generator=chain)
    lengths = torch.randint(min_length, max_length + 1, (n,), generator=g)
    topic = torch.zeros(n, dtype=torch.long)
    first = torch.zeros(max(topics, 1), vocab)
    if topics:  # drawn after the default stream's lengths, so topics=0 gives the sequences it always gave
        favoured = (torch.arange(vocab)[None, :] * topics // vocab) == torch.arange(topics)[:, None]
        logits, first = logits + 4.0 * favoured[:, None, :], 4.0 * favoured.float()
        topic = torch.randint(0, topics, (n,), generator=g)
    transitions = torch.softmax(logits, dim=2)
    tokens = torch.zeros(n, max_length, dtype=torch.long)
    tokens[:, 0] = torch.multinomial(torch.softmax(first[topic], dim=1), 1, generator=g).squeeze(1) if topics \
        else torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, max_length):
        tokens[:, t] = torch.multinomial(transitions[topic, tokens[:, t - 1]], 1, generator=g).squeeze(1)
    position = torch.arange(max_length)[None, :]
    tokens = tokens.masked_fill(position >= lengths[:, None], 0)
    labels = tokens[:, 1:].masked_fill(position[:, 1:] >= lengths[:, None], IGNORE_INDEX)
    if with_topics:
        return tokens[:, :-1].contiguous(), labels.contiguous(), topic
    return tokens[:, :-1].contiguous(), labels.contiguous()


def sequences(spec: TaskSpec, seed: int, train_size: int, eval_size: int, batch_size: int,
              min_length: int, max_length: int, sort_lengths: bool = False, topics: int = 0) -> "Dataset":
    """Markov-chain token sequences over spec.outputs tokens: train_size to train on, eval_size held
    out. `sort_lengths`: each batch ordered by scored tokens, shortest first (data.sort_lengths).
    `topics` > 0: sequences of `topics` chains, each batch ordered by topic (data.topics)."""
    inputs, labels, topic = markov_sequences(spec.outputs, train_size + eval_size, seed, min_length, max_length,
                                             topics, with_topics=True)
    return Dataset(inputs, labels, seed, train_size, batch_size, sort_lengths, topic[:train_size] if topics else None)


def labels_of(targets: Targets) -> torch.Tensor:
    """The next-token labels of a sequence batch's targets: the tensor itself, or its `labels` entry (data=rollouts,
    preference_pairs, and packed rows, whose targets carry more)."""
    return targets["labels"] if isinstance(targets, dict) else targets


def mark_starts(tokens: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Packed rows' inputs: a document's first token stored as -1 - token, so that one token tensor carries what a
    Hugging Face batch carries as position_ids restarting at 0 (DataCollatorWithFlattening), and slices, moves and
    splits like any batch. A model that restarts positions reads it back with `documents_of`."""
    return torch.where(starts, -1 - tokens, tokens)


def documents_of(inputs: torch.Tensor):
    """(tokens, position ids, document ids) of inputs marked by `mark_starts`: positions restart at 0 at each
    document's first token, document ids count the starts so far (each (B, T)). Unmarked inputs are one document
    per row, positions 0..T-1."""
    starts = inputs < 0
    tokens = torch.where(starts, -1 - inputs, inputs)
    index = torch.arange(inputs.shape[-1], device=inputs.device).expand_as(inputs)
    start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return tokens, index - start, starts.long().cumsum(dim=-1)


def packed_sequences(vocab: int, rows: int, seed: int, min_length: int, max_length: int, pack_length: int):
    """data.packing=true: the Markov documents of data=seq, in order, packed into rows of exactly pack_length tokens;
    the document that overflows a row is cut at its end, its rest beginning the next row as a document of its own
    (TRL's `wrapped` packing), so every row is full and no label is padding. As (inputs, targets): inputs the rows'
    first pack_length - 1 tokens with each document's first token marked (`mark_starts`), targets {"labels": the
    next tokens, -100 where the next token starts a document (no position predicts across a boundary: TRL >=
    0.23.1's labels[position_ids == 0] = -100, transformers' DataCollatorWithFlattening), "documents": the documents
    each row holds}. A row of T tokens and N documents scores T - N tokens."""
    mean_length = (min_length + max_length) / 2
    drawn = int(rows * pack_length / mean_length * 1.3) + 8
    while True:
        inputs, labels = markov_sequences(vocab, drawn, seed, min_length, max_length)
        lengths = (labels != IGNORE_INDEX).sum(dim=1) + 1
        if int(lengths.sum()) >= rows * pack_length:
            break
        drawn *= 2
    tokens = torch.cat([inputs, labels[:, -1:].clamp(min=0)], dim=1)  # each document's tokens, right-padded
    valid = torch.arange(max_length)[None, :] < lengths[:, None]
    flat, first = tokens[valid][:rows * pack_length], torch.zeros_like(tokens, dtype=torch.bool)
    first[:, 0] = True
    starts = first[valid][:rows * pack_length].view(rows, pack_length)
    starts[:, 0] = True  # a row begins a document: the rest of one cut at the row before is one of its own
    flat = flat.view(rows, pack_length)
    targets = {"labels": flat[:, 1:].masked_fill(starts[:, 1:], IGNORE_INDEX), "documents": starts.sum(dim=1)}
    return mark_starts(flat[:, :-1], starts[:, :-1]).contiguous(), targets


def rollouts(vocab: int, n: int, seed: int, group_size: int, prompt_length: int, min_length: int, max_length: int,
             policy: Optional[torch.nn.Module]):
    """n fixed rollouts for a policy-gradient update (data=rollouts), as (inputs, targets): n // group_size
    seeded prompts of prompt_length tokens, group_size completions each of min_length..max_length tokens
    (uniform random tokens), right-padded. targets: `labels`, the next-token labels with the prompt and the
    padding ignored (-100); `advantages`, the reward (the hidden rule: the share of a completion's tokens in
    the lower half of the vocabulary) normalised within each prompt's group, (r - mean) / (std + 1e-4); and
    `old_logprobs`, each label's log-probability under `policy`, the model's initial weights (0 where
    ignored). No generation: verl, TRL and OpenRLHF's update phase trains on fixed rollouts too."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-n // group_size)
    prompts = torch.randint(0, vocab, (groups, prompt_length), generator=g).repeat_interleave(group_size, dim=0)
    completions, lengths, reward = _completions(vocab, (groups * group_size,), min_length, max_length, g)
    by_group = reward.view(groups, group_size)
    advantages = ((by_group - by_group.mean(dim=1, keepdim=True)) / (by_group.std(dim=1, correction=0, keepdim=True)
                                                                       + 1e-4)).flatten()
    inputs, labels = _scored(prompts, completions, lengths)
    old = _label_logprobs(policy, inputs, labels)
    targets = {"labels": labels, "advantages": advantages.float(), "old_logprobs": old}
    return inputs[:n], map_targets(targets, lambda t: t[:n])


def _completions(vocab: int, shape, min_length: int, max_length: int, g: torch.Generator):
    """Uniform random completions of min_length..max_length tokens, right-padded with 0: (tokens, lengths, the
    hidden reward: the share of a completion's tokens in the lower half of the vocabulary)."""
    lengths = torch.randint(min_length, max_length + 1, shape, generator=g)
    tokens = torch.randint(0, vocab, (*shape, max_length), generator=g)
    valid = torch.arange(max_length) < lengths[..., None]
    tokens = tokens.masked_fill(~valid, 0)
    return tokens, lengths, ((tokens < vocab // 2) & valid).sum(dim=-1) / lengths


def _scored(prompts: torch.Tensor, completions: torch.Tensor, lengths: torch.Tensor):
    """(inputs, next-token labels) of prompt + completion, only the completion's tokens scored."""
    prompt_length = prompts.shape[-1]
    tokens = torch.cat([prompts, completions], dim=-1)
    position = torch.arange(1, tokens.shape[-1])  # the position each label predicts
    scored = (position >= prompt_length) & (position < prompt_length + lengths[..., None])
    return tokens[..., :-1], tokens[..., 1:].masked_fill(~scored, IGNORE_INDEX)


def _label_logprobs(policy: Optional[torch.nn.Module], inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each label's log-probability under `policy` (0 where ignored, or without a policy)."""
    if policy is None:
        return torch.zeros(labels.shape)
    with torch.no_grad():
        outputs = policy(inputs)
        logits = (outputs["logits"] if isinstance(outputs, dict) else outputs).float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return logp * (labels != IGNORE_INDEX)


def preference_pairs(vocab: int, n: int, seed: int, prompt_length: int, min_length: int, max_length: int,
                     policy: Optional[torch.nn.Module]):
    """n preference pairs (data=preference_pairs), as (inputs (n, 2, L), targets): a seeded prompt, two completions
    of min_length..max_length tokens, the one with the higher hidden reward first (chosen), then the other
    (rejected). targets: `labels` (n, 2, L), the completion's next tokens (prompt and padding -100), and
    `ref_logps` (n, 2), each sequence's summed log-probability under `policy`, the model's initial weights."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab, (n, 1, prompt_length), generator=g).expand(n, 2, prompt_length)
    completions, lengths, reward = _completions(vocab, (n, 2), min_length, max_length, g)
    order = torch.stack([reward[:, 1] > reward[:, 0], reward[:, 1] <= reward[:, 0]], dim=1).long()
    completions = completions.gather(1, order[..., None].expand_as(completions))
    lengths = lengths.gather(1, order)
    inputs, labels = _scored(prompts, completions, lengths)
    return inputs, {"labels": labels, "ref_logps": _label_logprobs(policy, inputs, labels).sum(dim=-1)}


# data=pairs: each latent's views, and how much of a view is noise rather than its latent.
PAIR_LATENTS = 8
PAIR_NOISE = 0.1


def paired_views(n: int, seed: int, features: int, latents: int = PAIR_LATENTS, noise: float = PAIR_NOISE):
    """n pairs of views of hidden latents, as (inputs (n, 2, features), targets (n,)).

    Each example is a latent z ~ N(0, I); its query view is tanh(z A) and its key view tanh(z B)
    for two hidden random maps A and B (unit variance before the tanh), each view plus its own
    noise. A view says little about the other view's coordinates, only about the shared latent, so
    a dual encoder has to learn both maps for a query to find its own key among the others
    (retrieval accuracy rises from 1/n). The targets are the examples' indices: the pair's
    identity, which in-batch negatives do not need.
    """
    g = torch.Generator().manual_seed(seed)
    maps = torch.Generator().manual_seed(seed + _TEACHER_STREAM)
    query_map, key_map = (torch.randn(latents, features, generator=maps) / latents ** 0.5 for _ in range(2))
    z = torch.randn(n, latents, generator=g)
    views = [torch.tanh(z @ m) + noise * torch.randn(n, features, generator=g) for m in (query_map, key_map)]
    return torch.stack(views, dim=1), torch.arange(n)


def pairs(spec: TaskSpec, seed: int, train_size: int, eval_size: int, batch_size: int) -> "Dataset":
    """Paired views (spec.input_shape = (2, features)): train_size to train on, eval_size held out."""
    inputs, targets = paired_views(train_size + eval_size, seed, spec.input_shape[-1])
    return Dataset(inputs, targets, seed, train_size, batch_size)


def train_rows(n: int, eval_fraction: float) -> int:
    return n - int(round(eval_fraction * n))


def split(inputs: torch.Tensor, targets: Targets, seed: int, eval_fraction: float, batch_size: int,
          sort_lengths: bool = False) -> "Dataset":
    """A data set of the user's (runner.components.user_data), split into train and held-out parts by `seed`."""
    n = inputs.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + _SPLIT_STREAM))
    return Dataset(inputs[order], map_targets(targets, lambda t: t[order]), seed, train_rows(n, eval_fraction),
                   batch_size, sort_lengths)


class Dataset:
    """A training set drawn in seeded epochs plus a held-out split.

    The batch of optimizer step s is a pure function of (seed, s): epoch e uses the permutation
    from a generator seeded with (seed, e), so a resumed run sees exactly the data it would have
    seen, and two strategies see the same batches.
    """

    def __init__(self, inputs: torch.Tensor, targets: Targets, seed: int, train_size: int, batch_size: int,
                 sort_lengths: bool = False, topics: Optional[torch.Tensor] = None):
        """The first `train_size` examples train, the rest are held out. `sort_lengths`: a batch's
        sequences in order of their scored tokens (the same examples, so the same batch loss).
        `topics`: each training row's topic; a batch's rows are then grouped by topic, so that
        tensor_split's contiguous micro-batches hold different topics (data.topics)."""
        if batch_size > train_size:
            raise ValueError(f"batch_size {batch_size} exceeds train_size {train_size}")
        self.seed = seed
        self.batch_size = batch_size
        self.sort_lengths = sort_lengths
        self.train_topics = topics
        self.train_inputs = inputs[:train_size]
        self.train_targets = map_targets(targets, lambda t: t[:train_size])
        self.eval_inputs = inputs[train_size:]
        self.eval_targets = map_targets(targets, lambda t: t[train_size:])
        self.batches_per_epoch = train_size // batch_size
        self._epoch = -1
        self._order = None
        self.columns = None  # the user's table: its feature columns and a warning (user_data.Columns)

    def to(self, device: torch.device, dtype: torch.dtype) -> "Dataset":
        """Move every tensor once; floating point tensors take the run's dtype."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

        self.train_inputs = move(self.train_inputs)
        self.eval_inputs = move(self.eval_inputs)
        self.train_targets = map_targets(self.train_targets, move)
        self.eval_targets = map_targets(self.eval_targets, move)
        if self.train_topics is not None:
            self.train_topics = self.train_topics.to(device)
        return self

    def _order_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * _ORDER_STREAM + epoch)
            n = self.train_inputs.shape[0]
            self._order = torch.randperm(n, generator=g).to(self.train_inputs.device)
            self._epoch = epoch
        return self._order

    def batch(self, step: int):
        """(inputs, targets) of optimizer step `step` (0-based)."""
        epoch, index = divmod(step, self.batches_per_epoch)
        order = self._order_for(epoch)
        rows = order[index * self.batch_size:(index + 1) * self.batch_size]
        if self.sort_lengths:
            scored = (labels_of(self.train_targets)[rows] != IGNORE_INDEX).sum(dim=1)
            rows = rows[torch.argsort(scored, stable=True)]
        if self.train_topics is not None:
            rows = rows[torch.argsort(self.train_topics[rows], stable=True)]
        return self.train_inputs[rows], map_targets(self.train_targets, lambda t: t[rows])

