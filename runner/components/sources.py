"""The data sources of the `data` group: each an option by one YAML naming its class by `_target_`
(conf/data/seq.yaml: `_target_: runner.components.sources.Sequences`, its arguments beside it), as a model
or a loss is. The class declares its keys next to itself (`Keys`: data.max_length, data.path, ...;
runner.config.components) and builds the data set a model's TaskSpec asks for (`build`). The group's own
keys (data.batch_size, data.train_size, data.eval_size, data.micro_batch_size) stay in
runner.config.schema: the loader and the strategies read them too.

Data comes from its own generators, seeded by `seed` alone: whatever the model, loss or strategy (data=rollouts'
old log-probabilities are the model's own at its initial weights, which the seed decides).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

from runner.components import user_data
from runner.components.data import (
    Dataset,
    TaskSpec,
    packed_sequences,
    pairs,
    preference_pairs,
    rollouts,
    sequences,
    split,
    synthetic,
    train_rows,
)
from runner.components.models import PAIR_SHAPE
from runner.config.keys import at_least, half_open, key, strictly_between


@dataclass
class Request:
    """What a source is asked for: the model's TaskSpec (a model of your own: `model.outputs` labels of
    3x10x10 inputs), the seed, the sizes, and how messages name the model and the batch size."""

    spec: TaskSpec
    seed: int
    train_size: int
    eval_size: int
    batch_size: int  # data.batch_size, or data.micro_batch_size in loader mode
    batch_key: str  # which of the two it is: "data.batch_size" or "data.micro_batch_size"
    model_label: str  # model=seq
    own_model: bool  # a model of your own fits any data
    vocab: int  # model.vocab: the tokens data=seq draws
    outputs: int  # model.outputs: the embedding's dimensions data=pairs describes
    model: Optional[Any] = None  # the model at its initial weights: data=rollouts' old policy


def misfit(request: Request, source: str, needs: str) -> ValueError:
    return ValueError(f"{request.model_label} does not fit data={source}: {needs}")


SEQUENCES_NEED = "token sequences need model=seq or moe with data=seq or text and loss=lm (or model=custom on them)"
PAIRS_NEED = "paired views need model=dual_encoder with data=pairs and loss=infonce (or model=custom on data=pairs)"


def check_kind(request: Request, source: str, kind: Optional[str]) -> None:
    """A source of `kind` (sequence, retrieval, or None for the image-like rest) fits a built-in model whose
    spec is of that kind; a model of your own fits any."""
    model_kind = request.spec.kind if request.spec.kind in ("sequence", "retrieval") else None
    if model_kind == kind or (request.own_model and kind is not None):
        return
    raise misfit(request, source, SEQUENCES_NEED if "sequence" in (kind, model_kind) else PAIRS_NEED)


def min_length_key(help_text: str):
    return key(2, help_text, allowed=at_least(2, integer=True, note=" (a token to predict)"))


def sort_lengths_key():
    return key(False, "each batch ordered by scored tokens, so that with several processes rank 0's share holds the "
                      "short sequences and the last rank's the long ones (the skew of transformers #34242)")


def path_key():
    return key(None, "your file", values="a file path")


def eval_fraction_key():
    return key(0.2, "the share held out, chosen by seed", allowed=half_open(0, 1))


def check_lengths(min_length: int, max_length: int) -> None:
    if max_length < min_length:
        raise ValueError(f"data.max_length={max_length} is not allowed: expected >= data.min_length ({min_length})")


class Synthetic:
    """data=default, imbalanced: 3x10x10 inputs labelled by a hidden teacher (multi-label, class or
    multi-task targets, as the model's spec asks), train_size to train on, eval_size held out."""

    @dataclass
    class Keys:
        positive_rate: float = key(0.5, "the share of positive labels the hidden teacher produces",
                                   allowed=strictly_between(0, 1))
        noise: float = key(0.0, "label noise: the share of flipped binary labels", allowed=half_open(0, 0.5))

    def __init__(self, positive_rate: float = 0.5, noise: float = 0.0):
        self.positive_rate, self.noise = positive_rate, noise

    def build(self, request: Request, name: str) -> Tuple[Dataset, TaskSpec]:
        check_kind(request, name, None)
        return synthetic(request.spec, request.seed, request.train_size, request.eval_size, request.batch_size,
                         self.positive_rate, self.noise), request.spec


class Sequences:
    """data=seq: token sequences of varying lengths from hidden Markov chains, over model.vocab tokens."""

    @dataclass
    class Keys:
        min_length: int = min_length_key("the shortest sequence (min_length - 1 predicted tokens); text: shorter "
                                         "paragraphs are left out")
        max_length: int = key(32, "the longest sequence (text: where a paragraph's bytes are cut); shorter sequences "
                                  "are right-padded, their labels -100", values="an integer >= data.min_length")
        topics: int = key(0, "0 = one Markov chain; T > 0: T topics, each with its own chain favouring its share of "
                             "the vocabulary, each batch ordered by topic, so that a micro-batch's statistics (an MoE "
                             "router's expert load) differ from the window's", allowed=at_least(0, integer=True))
        sort_lengths: bool = sort_lengths_key()
        packing: bool = key(False, "several documents per row, data.pack_length tokens each: positions restart at each "
                                   "document, no attention crosses a boundary, and no position predicts the next "
                                   "document's first token (needs model.cell=transformer)")
        pack_length: int = key(64, "data.packing=true: the tokens of a packed row", allowed=at_least(2, integer=True))

    def __init__(self, min_length: int = 2, max_length: int = 32, topics: int = 0, sort_lengths: bool = False,
                 packing: bool = False, pack_length: int = 64):
        check_lengths(min_length, max_length)
        if packing and topics:
            raise ValueError(f"data.topics={topics} is not allowed with data.packing=true: a packed row holds "
                             "documents of several topics, expected data.topics=0 (or data.packing=false)")
        self.min_length, self.max_length, self.topics, self.sort_lengths = min_length, max_length, topics, sort_lengths
        self.packing, self.pack_length = packing, pack_length

    def build(self, request: Request, name: str) -> Tuple[Dataset, TaskSpec]:
        check_kind(request, name, "sequence")
        spec = TaskSpec((), "sequence", request.vocab)
        if not self.packing:
            return sequences(spec, request.seed, request.train_size, request.eval_size, request.batch_size,
                             self.min_length, self.max_length, self.sort_lengths, self.topics), spec
        read_packed_rows(request)
        inputs, targets = packed_sequences(request.vocab, request.train_size + request.eval_size, request.seed,
                                           self.min_length, self.max_length, self.pack_length)
        return Dataset(inputs, targets, request.seed, request.train_size, request.batch_size, self.sort_lengths), spec


def read_packed_rows(request: Request) -> None:
    """Packed rows need a model that restarts positions at each document and keeps attention within it: the source
    tells the model its rows are packed (`read_packed_rows()`, runner.components.models.CausalLM's), which answers
    whether it can read the marks of runner.components.data.mark_starts. Told once here, the model never inspects
    its inputs for marks (on a GPU that would be a host read per forward)."""
    reads = getattr(request.model, "read_packed_rows", None)
    if request.model is not None and not (callable(reads) and reads()):
        raise ValueError(f"data.packing=true is not allowed with {request.model_label}: it cannot restart positions at "
                         "each document, expected model.cell=transformer (model=seq or moe), or a model of your own "
                         "with read_packed_rows() (or data.packing=false)")


class Rollouts:
    """data=rollouts: fixed rollouts of a policy-gradient update: prompts, data.group_size completions each, their
    group-normalised advantages and the initial policy's log-probabilities (runner.components.data.rollouts)."""

    @dataclass
    class Keys:
        group_size: int = key(4, "completions per prompt; their advantages are normalised within the group",
                              allowed=at_least(2, integer=True, note=" (group-normalised advantages need two "
                                                                     "completions)"))
        prompt_length: int = key(3, "each prompt's tokens (not scored)", allowed=at_least(1, integer=True))
        min_length: int = key(2, "the shortest completion", allowed=at_least(1, integer=True))
        max_length: int = key(12, "the longest completion; shorter ones are right-padded, their labels -100",
                              values="an integer >= data.min_length")

    def __init__(self, group_size: int = 4, prompt_length: int = 3, min_length: int = 2, max_length: int = 12):
        check_lengths(min_length, max_length)
        self.group_size, self.prompt_length = group_size, prompt_length
        self.min_length, self.max_length = min_length, max_length

    def build(self, request: Request, name: str) -> Tuple[Dataset, TaskSpec]:
        check_kind(request, name, "sequence")
        inputs, targets = rollouts(request.vocab, request.train_size + request.eval_size, request.seed,
                                   self.group_size, self.prompt_length, self.min_length, self.max_length, request.model)
        return Dataset(inputs, targets, request.seed, request.train_size, request.batch_size), \
            TaskSpec((), "rollout", request.vocab)


class PreferencePairs:
    """data=preference_pairs: a prompt, a chosen and a rejected completion per row, and each sequence's log-probability
    under the initial policy (loss=dpo's reference; runner.components.data.preference_pairs)."""

    @dataclass
    class Keys:
        prompt_length: int = key(3, "each prompt's tokens (not scored)", allowed=at_least(1, integer=True))
        min_length: int = key(2, "the shortest completion", allowed=at_least(1, integer=True))
        max_length: int = key(12, "the longest completion; shorter ones are right-padded, their labels -100",
                              values="an integer >= data.min_length")

    def __init__(self, prompt_length: int = 3, min_length: int = 2, max_length: int = 12):
        check_lengths(min_length, max_length)
        self.prompt_length, self.min_length, self.max_length = prompt_length, min_length, max_length

    def build(self, request: Request, name: str) -> Tuple[Dataset, TaskSpec]:
        check_kind(request, name, "sequence")
        inputs, targets = preference_pairs(request.vocab, request.train_size + request.eval_size, request.seed,
                                           self.prompt_length, self.min_length, self.max_length, request.model)
        return Dataset(inputs, targets, request.seed, request.train_size, request.batch_size), \
            TaskSpec((), "preference", request.vocab)


class Pairs:
    """data=pairs: a query view and a key view of hidden latents, for a dual encoder and in-batch negatives."""

    @dataclass
    class Keys:  # the group's own keys only
        pass

    def build(self, request: Request, name: str) -> Tuple[Dataset, TaskSpec]:
        check_kind(request, name, "retrieval")
        spec = TaskSpec(PAIR_SHAPE, "retrieval", request.outputs)
        return pairs(spec, request.seed, request.train_size, request.eval_size, request.batch_size), spec


class YourRows:
    """Rows of a file of yours, split into train and held-out parts by seed (data.train_size and
    data.eval_size do not apply: the file says how many rows there are)."""

    reads_a_file = True

    def rows(self, request: Request, inputs, targets, sort_lengths: bool = False) -> Dataset:
        rows = train_rows(len(inputs), self.eval_fraction)
        if request.batch_size > rows:
            raise ValueError(f"{request.batch_key}={request.batch_size} is not allowed with data.path={self.path}: "
                             f"expected at most its {rows} training rows")
        return split(inputs, targets, request.seed, self.eval_fraction, request.batch_size, sort_lengths)

    def tabular(self, request: Request, name: str, read) -> Tuple[Dataset, TaskSpec]:
        """A table's or a tensor file's rows: the file describes its own task; a built-in model must take
        its inputs' shape."""
        check_kind(request, name, None)
        inputs, targets, found, columns = read()
        if not request.own_model and found.input_shape != request.spec.input_shape:
            raise ValueError(f"{request.model_label} takes inputs of shape {request.spec.input_shape}, and "
                             f"data={name} ({self.path}) has {found.input_shape}: use model=custom "
                             "model._target_=... (your model)")
        dataset = self.rows(request, inputs, targets)
        dataset.columns = columns  # a table's features and what was left out of them (user_data.Columns)
        return dataset, found


class Table(YourRows):
    """data=csv: your CSV table, its numeric feature columns and its target column(s)
    (runner.components.user_data.read_csv)."""

    @dataclass
    class Keys:
        path: Optional[str] = path_key()
        target: Any = key(None, "the target column, or several (A,B or [A, B]) for a multi-label target")
        features: Any = key(None, "the feature columns (A,B or [A, B]), each numeric; null = every numeric column "
                                   "but the target(s), and the non-numeric ones left out are named in a warning")
        eval_fraction: float = eval_fraction_key()

    def __init__(self, path: Optional[str] = None, target: Any = None, features: Any = None,
                 eval_fraction: float = 0.2):
        self.path, self.target, self.features, self.eval_fraction = path, target, features, eval_fraction

    def build(self, request: Request, name: str) -> Tuple[Dataset, TaskSpec]:
        return self.tabular(request, name, lambda: user_data.read_csv(self.path, self.target, self.features))


class TensorFile(YourRows):
    """data=tensors: a file torch.save'd as {'inputs': tensor, 'targets': tensor}, one row per example
    (runner.components.user_data.read_tensors)."""

    @dataclass
    class Keys:
        path: Optional[str] = path_key()
        eval_fraction: float = eval_fraction_key()

    def __init__(self, path: Optional[str] = None, eval_fraction: float = 0.2):
        self.path, self.eval_fraction = path, eval_fraction

    def build(self, request: Request, name: str) -> Tuple[Dataset, TaskSpec]:
        return self.tabular(request, name, lambda: user_data.read_tensors(self.path))


class Text(YourRows):
    """data=text: your UTF-8 text, a sequence per paragraph, its bytes as tokens
    (runner.components.user_data.read_text): the model must score 256 tokens."""

    tokens = user_data.BYTE_VOCAB

    @dataclass
    class Keys:
        path: Optional[str] = path_key()
        eval_fraction: float = eval_fraction_key()
        min_length: int = min_length_key("the shortest sequence (min_length - 1 predicted tokens); text: shorter "
                                         "paragraphs are left out")
        max_length: int = key(64, "the longest sequence (text: where a paragraph's bytes are cut); shorter "
                                  "sequences are right-padded, their labels -100",
                              values="an integer >= data.min_length")
        sort_lengths: bool = sort_lengths_key()

    def __init__(self, path: Optional[str] = None, eval_fraction: float = 0.2, min_length: int = 2,
                 max_length: int = 64, sort_lengths: bool = False):
        check_lengths(min_length, max_length)
        self.path, self.eval_fraction, self.sort_lengths = path, eval_fraction, sort_lengths
        self.min_length, self.max_length = min_length, max_length

    def build(self, request: Request, name: str) -> Tuple[Dataset, TaskSpec]:
        check_kind(request, name, "sequence")
        inputs, labels = user_data.read_text(self.path, self.max_length, self.min_length)
        return self.rows(request, inputs, labels, self.sort_lengths), TaskSpec((), "sequence", self.tokens)
