"""Plain nn.Modules. Each built-in model is an option of the `model` group by one YAML naming its class
by `_target_` (conf/model/mlp.yaml: `_target_: runner.components.models.MLP`, its arguments beside it), as
a model of your own is. The class declares its keys next to itself (`Keys`: model.hidden, model.depth, ...,
each with its help and range; runner.config.components), takes the group's own keys (model.outputs,
model.vocab) where its constructor names them, and says what its data must be (`spec()`, a TaskSpec).

Models output logits (no sigmoid): losses use the with-logits forms, which are stable.
Initialisation draws from the global RNG, which the runner seeds with `seed` right before
building, so initial parameters depend on the seed and the model choice alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from runner.components.data import TaskSpec, documents_of
from runner.config.keys import at_least, half_open, key

IMAGE_SHAPE = (3, 10, 10)
PAIR_SHAPE = (2, 16)  # dual_encoder, data=pairs: a query view and a key view of 16 features each
POSITIVE_INT = at_least(1, integer=True)


def hidden_key(default: int):
    return key(default, "hidden units per layer", allowed=POSITIVE_INT)


def depth_key(default: int):
    return key(default, "layers: of the shared trunk (multitask), recurrent or attention (seq, moe), of each tower "
                        "(dual_encoder)", allowed=POSITIVE_INT)


def batchnorm_key():
    return key(False, "add BatchNorm, which couples the examples of a batch")


def cell_key():
    return key("gru", "the sequence layer: gru, or transformer (causal self-attention)", values="gru | transformer")


class MLP(nn.Module):
    """Flattened 3x10x10 inputs -> one hidden layer (+BatchNorm) -> `outputs` logits."""

    @dataclass
    class Keys:
        hidden: int = hidden_key(64)
        batchnorm: bool = batchnorm_key()

    def __init__(self, hidden: int = 64, outputs: int = 5, batchnorm: bool = False):
        super().__init__()
        in_features = math.prod(IMAGE_SHAPE)
        self.hidden = nn.Linear(in_features, hidden)
        self.norm = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.out = nn.Linear(hidden, outputs)

    def spec(self) -> TaskSpec:
        return TaskSpec(IMAGE_SHAPE, "multilabel", self.out.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.norm(self.hidden(x.flatten(1)))))


class ConvNet(nn.Module):
    """The gradient-accumulation answer's model, returning logits instead of sigmoid outputs."""

    @dataclass
    class Keys:
        batchnorm: bool = batchnorm_key()

    def __init__(self, outputs: int = 5, batchnorm: bool = False):
        super().__init__()
        self.conv_layer = nn.Conv2d(3, 10, 3, 1, 1)
        self.norm = nn.BatchNorm2d(10) if batchnorm else nn.Identity()
        self.fc_layer = nn.Linear(10 * 5 * 5, outputs)

    def spec(self) -> TaskSpec:
        return TaskSpec(IMAGE_SHAPE, "multilabel", self.fc_layer.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv_layer(x))
        x = F.max_pool2d(x, 2, 2, 0, 1, False, False)
        x = F.relu(x)
        return self.fc_layer(x.flatten(start_dim=1))


class MultiTaskNet(nn.Module):
    """A shared trunk of `depth` Linear+ReLU layers, a binary classification head and a
    regression head. With depth >= 2 the trunk's later layers save their weights for backward,
    which is what makes stepping between per-task backwards fail on current PyTorch."""

    @dataclass
    class Keys:
        hidden: int = hidden_key(64)
        depth: int = depth_key(2)

    def __init__(self, hidden: int = 64, depth: int = 2):
        super().__init__()
        sizes = [math.prod(IMAGE_SHAPE)] + [hidden] * depth
        self.trunk = nn.Sequential(*[layer for i in range(depth)
                                     for layer in (nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU())])
        self.cls = nn.Linear(hidden, 1)
        self.reg = nn.Linear(hidden, 1)

    def shared_parameters(self):
        return list(self.trunk.parameters())

    def spec(self) -> TaskSpec:
        return TaskSpec(IMAGE_SHAPE, "multitask", 1)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.trunk(x.flatten(1))
        return {"cls": self.cls(features), "reg": self.reg(features)}


class TwoStage(nn.Module):
    """Two chained models as in the chained-models answer: stage 2 consumes stage 1's output,
    and each stage's output has its own loss (Linear(10, 2) -> Linear(2, 2) by default). The answer
    scores both stages' outputs with cross-entropy against the same labels, so stage 1's width is
    the number of classes, `outputs`."""

    FEATURES = 10

    @dataclass
    class Keys:  # model.outputs only (the group's own key)
        pass

    def __init__(self, outputs: int = 2):
        super().__init__()
        if outputs < 2:
            raise ValueError(f"model.outputs={outputs} is not allowed for model=two_stage: expected >= 2 classes")
        self.stage1 = nn.Linear(self.FEATURES, outputs)
        self.stage2 = nn.Linear(outputs, outputs)

    def spec(self) -> TaskSpec:
        classes = self.stage2.out_features
        return TaskSpec((self.FEATURES,), "multiclass", classes, stages=("stage1", "stage2"))

    def forward(self, x: torch.Tensor, detach: bool = False) -> Dict[str, torch.Tensor]:
        a = self.stage1(x)
        return {"stage1": a, "stage2": self.stage2(a.detach() if detach else a)}


class CausalLM(nn.Module):
    """A small causal language model: token embedding -> `layers` GRU layers, or Transformer
    layers with a causal mask -> a logit per vocabulary token at every position.

    Position t sees tokens 0..t only, so right-padding never changes the logits of real tokens.
    No dropout: a stochastic forward could not give the same gradient from micro-batches.
    """

    CELLS = ("gru", "transformer")

    @dataclass
    class Keys:
        hidden: int = hidden_key(32)
        depth: int = depth_key(1)
        cell: str = cell_key()

    def __init__(self, vocab: int = 16, hidden: int = 32, depth: int = 1, cell: str = "gru"):
        super().__init__()
        if cell not in self.CELLS:
            raise ValueError(f"model.cell={cell} is not allowed: expected one of {list(self.CELLS)}")
        self.cell, layers = cell, depth
        self.packed = False  # rows that pack several documents (read_packed_rows)
        self.embed = nn.Embedding(vocab, hidden)
        if cell == "gru":
            self.body = nn.GRU(hidden, hidden, num_layers=layers, batch_first=True)
        else:
            layer = nn.TransformerEncoderLayer(hidden, nhead=max(1, hidden // 16), dim_feedforward=2 * hidden,
                                               dropout=0.0, batch_first=True)
            self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(hidden, vocab)

    def spec(self) -> TaskSpec:
        return TaskSpec((), "sequence", self.embed.num_embeddings)

    def checkpoint_blocks(self) -> List[nn.Module]:
        """Each Transformer layer (it keeps attention scores and feed-forward activations, many
        times its input); the GRU as one block (its layers are one module)."""
        return list(self.body.layers) if self.cell == "transformer" else [self.body]

    def read_packed_rows(self) -> bool:
        """data.packing=true: from now on each row packs documents, their first tokens marked
        (runner.components.data.mark_starts), positions restarting and attention kept within each. The Transformer
        can (a mask per row); the GRU cannot, its state running on across the row: False, and nothing changes."""
        self.packed = self.cell == "transformer"
        return self.packed

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The hidden state at every position, (B, T, hidden), before the output layer."""
        if self.packed:
            return self.packed_features(tokens)
        x = self.embed(tokens)
        if self.cell == "gru":
            x, _ = self.body(x)
        else:
            length = tokens.shape[1]
            mask = nn.Transformer.generate_square_subsequent_mask(length, device=x.device, dtype=x.dtype)
            x = self.body(x + sinusoid_positions(length, x.shape[-1], x), mask=mask, is_causal=True)
        return x

    def packed_features(self, marked: torch.Tensor) -> torch.Tensor:
        """Packed rows: each document's positions restart at 0 and attend to its own earlier tokens only (what
        flash-attention's varlen kernels do from position_ids), so a document's features are those it has alone."""
        tokens, positions, documents = documents_of(marked)
        x = self.embed(tokens)
        length = tokens.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        allowed = causal & (documents[:, :, None] == documents[:, None, :])  # (B, T, T): query, key
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        heads = self.body.layers[0].self_attn.num_heads
        table = sinusoid_positions(length, x.shape[-1], x)
        return self.body(x + table[positions], mask=mask.repeat_interleave(heads, dim=0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() == 3:  # a pair of sequences per row (data=preference_pairs): each scored on its own
            return self.forward(tokens.flatten(0, 1)).unflatten(0, tokens.shape[:2])
        return self.out(self.features(tokens))


@runtime_checkable
class Router(Protocol):
    """A model with a mixture-of-experts layer whose routing can be read without a graph: `route`
    runs the model up to the router and stops there (the experts never run), returning the expert
    assignment (B, T, experts) of 0/1, k ones per position. A strategy calls it once per window
    to count the window's expert load before any micro-batch's forward (loss.aux_stats=window)."""

    def route(self, inputs: torch.Tensor) -> torch.Tensor: ...


class MixtureOfExperts(nn.Module):
    """A top-k mixture-of-experts feed-forward layer: a bias-free linear router, a softmax over
    the experts, and each position sent to its k most probable experts, whose outputs are added
    weighted by their (not renormalised) router probabilities, so that the router also learns
    from the main loss (Switch Transformer's gate at k = 1, Fedus et al. 2021). No capacity
    limit and no token dropping: a position's output depends on that position alone, so the
    layer couples no examples; only the load-balancing loss's statistics do."""

    def __init__(self, hidden: int, experts: int, top_k: int):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"model.top_k={top_k} is not allowed: expected an integer in 1..model.experts ({experts})")
        self.top_k = top_k
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                                   nn.Linear(2 * hidden, hidden)) for _ in range(experts))

    def assign(self, x: torch.Tensor):
        """(router probabilities, the chosen experts' indices and probabilities, the 0/1 assignment)."""
        probs = torch.softmax(self.router(x), dim=-1)
        gates, chosen = probs.topk(self.top_k, dim=-1)
        assignment = torch.zeros_like(probs).scatter_(-1, chosen, 1.0)
        return probs, chosen, gates, assignment

    def forward(self, x: torch.Tensor):
        """(output, router probabilities, assignment). Each expert runs once, on its positions only."""
        probs, chosen, gates, assignment = self.assign(x)
        flat, experts = x.reshape(-1, x.shape[-1]), probs.shape[-1]
        weights = torch.zeros_like(probs).scatter(-1, chosen, gates).reshape(-1, experts)
        mine = assignment.reshape(-1, experts).bool()
        out = torch.zeros_like(flat)
        for index, expert in enumerate(self.experts):
            rows = mine[:, index].nonzero().squeeze(1)
            # Each row appears once per expert: index_add_ adds no two values into one row (deterministic).
            contribution = weights[rows, index, None] * expert(flat[rows])
            out = out.index_add(0, rows, contribution.to(out.dtype))  # autocast: the experts' dtype may differ
        return out.view_as(x), probs, assignment


class MoELM(CausalLM):
    """The sequence model with a mixture-of-experts feed-forward layer (residual) before the
    output layer. Its output is a dict sliceable along dim 0: `logits` (B, T, vocab),
    `router_probs` (B, T, experts) and `expert_mask` (B, T, experts, the 0/1 assignment), which
    the load-balancing loss (loss=lm with loss.aux_weight > 0) reads."""

    @dataclass
    class Keys:
        hidden: int = hidden_key(32)
        depth: int = depth_key(1)
        cell: str = cell_key()
        experts: int = key(8, "experts in the mixture-of-experts feed-forward layer", allowed=POSITIVE_INT)
        top_k: int = key(2, "experts each token is sent to", values="an integer in 1..model.experts")

    def __init__(self, vocab: int = 16, hidden: int = 32, depth: int = 1, cell: str = "gru",
                 experts: int = 8, top_k: int = 2):
        super().__init__(vocab, hidden, depth, cell)
        out = self.out
        del self.out  # registered again after the experts: the output layer stays the last Linear (output_layer)
        self.moe = MixtureOfExperts(hidden, experts, top_k)
        self.out = out

    def forward(self, tokens: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.features(tokens)
        mixed, probs, assignment = self.moe(x)
        return {"logits": self.out(x + mixed), "router_probs": probs, "expert_mask": assignment}

    @torch.no_grad()
    def route(self, tokens: torch.Tensor) -> torch.Tensor:
        """The assignment alone: the trunk and the router, without a graph; no expert runs."""
        return self.moe.assign(self.features(tokens))[3]


class DualEncoder(nn.Module):
    """Two towers (or one, shared) that map the query and the key view of a pair to embeddings:
    inputs (B, 2, features) -> embeddings (B, 2, dim), row i from example i alone, so the output
    slices along dim 0 like the batch. Each tower: `depth` Linear+ReLU(+Dropout) layers, then a
    Linear to `dim`. Dropout draws fresh masks on every forward: a strategy that forwards twice
    (backward=gradcache) must replay the random state to get the same masks. `outputs`: the
    embedding's dimensions.
    """

    @dataclass
    class Keys:
        hidden: int = hidden_key(64)
        depth: int = depth_key(2)
        shared: bool = key(False, "one tower embeds both views (else a tower per view, each model.depth layers of "
                                  "model.hidden units, then model.outputs embedding dimensions)")
        dropout: float = key(0.0, "dropout probability inside each tower (gradcache replays its masks)",
                             allowed=half_open(0, 1))

    def __init__(self, hidden: int = 64, outputs: int = 16, depth: int = 2, shared: bool = False,
                 dropout: float = 0.0, features: int = PAIR_SHAPE[-1]):
        super().__init__()

        def tower() -> nn.Sequential:
            sizes = [features] + [hidden] * depth
            layers = [layer for i in range(depth) for layer in
                      (nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()) + ((nn.Dropout(dropout),) if dropout else ())]
            return nn.Sequential(*layers, nn.Linear(sizes[-1], outputs))

        self.query_tower = tower()
        self.key_tower = None if shared else tower()  # None: not registered twice in the state_dict

    def spec(self) -> TaskSpec:
        return TaskSpec(PAIR_SHAPE, "retrieval", self.query_tower[-1].out_features)

    def embed(self, pairs: torch.Tensor) -> torch.Tensor:
        key_tower = self.key_tower if self.key_tower is not None else self.query_tower
        return torch.stack([self.query_tower(pairs[:, 0]), key_tower(pairs[:, 1])], dim=1)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.embed(pairs)


def sinusoid_positions(length: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """The Transformer paper's fixed position encodings, (length, width)."""
    position = torch.arange(length, device=like.device, dtype=like.dtype)[:, None]
    frequency = torch.exp(torch.arange(0, width, 2, device=like.device, dtype=like.dtype) * (-math.log(1e4) / width))
    table = torch.zeros(length, width, device=like.device, dtype=like.dtype)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, :width // 2]
    return table


def output_layer(model: nn.Module) -> nn.Module:
    """The last Linear layer, whose bias a prior initialisation sets."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def init_prior_bias(layer: nn.Linear, prior: float) -> None:
    """RetinaNet's initialisation: every output starts predicting `prior` for the rare class."""
    with torch.no_grad():
        layer.bias.fill_(-math.log((1 - prior) / prior))
