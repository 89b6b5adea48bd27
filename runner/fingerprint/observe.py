"""Observe, do not trust: which micro-batches a loop forwarded, and the gradient and learning rate its
optimizer saw at each step. Two hooks, nothing asked of the loop beyond calling the model and the
optimizer: a forward pre-hook on the model (the inputs say which of the lab's micro-batches entered),
and the optimizer's step pre-hook (torch.optim.Optimizer.register_step_pre_hook), which takes the
parameters, every .grad and each group's learning rate. A step called with a closure (PyTorch
Lightning's automatic optimisation runs the last micro-batch's forward and backward inside
optimizer.step) is observed after its closure ran.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn


class NotTheLabsData(ValueError):
    """The loop forwarded inputs that are none of the probe's micro-batches."""


def row_keys(inputs: torch.Tensor) -> List[bytes]:
    """Each row's content: what identifies it, whatever dtype or device the loop moved it to."""
    flat = inputs.detach().reshape(inputs.shape[0], -1).to(device="cpu", dtype=torch.float64)
    return [row.numpy().tobytes() for row in flat]


@dataclass
class ProbeBatch:
    """One micro-batch of the probe's stream, as the lab's loader drew it."""

    epoch: int
    index: int  # its place in the epoch
    inputs: torch.Tensor
    targets: torch.Tensor
    rows: int
    count: int  # what its exact weight divides: rows, or scored tokens for a token loss


class Stream:
    """The probe's micro-batches as the lab's loader draws them, epoch after epoch (`epoch(e)`, drawn on
    first use), each known by its rows' content; `identify` maps a forward's inputs to them."""

    def __init__(self, loader_of_epoch, count):
        self._loader_of_epoch, self._count = loader_of_epoch, count
        self.positions: List[ProbeBatch] = []  # the stream, epoch after epoch
        self._epochs: List[List[ProbeBatch]] = []
        self._by_first_row: Dict[bytes, List[int]] = {}
        self._keys: List[Tuple[bytes, ...]] = []
        self._cursor = 0

    def epoch(self, e: int) -> List[ProbeBatch]:
        while len(self._epochs) <= e:
            drawn = len(self._epochs)
            batches = []
            for index, (x, y) in enumerate(self._loader_of_epoch(drawn)):
                mb = ProbeBatch(drawn, index, x, y, x.shape[0], int(self._count(y)))
                keys = tuple(row_keys(x))
                self._by_first_row.setdefault(keys[0], []).append(len(self.positions))
                self._keys.append(keys)
                self.positions.append(mb)
                batches.append(mb)
            self._epochs.append(batches)
        return self._epochs[e]

    @property
    def micro_batches_per_epoch(self) -> int:
        return len(self.epoch(0))

    def identify(self, inputs: torch.Tensor) -> List[int]:
        """The stream positions a forward's inputs are made of, in order (one, or a window's several).
        Where the same micro-batch appears twice, the first not yet forwarded is taken."""
        keys, found, at = row_keys(inputs), [], 0
        while at < len(keys):
            candidates = [p for p in self._by_first_row.get(keys[at], [])
                          if keys[at:at + len(self._keys[p])] == list(self._keys[p])]
            if not candidates:
                raise NotTheLabsData(f"it forwarded {len(keys)} rows that are not the probe's micro-batches (a loop "
                                     "under test forwards the loader's micro-batches as they come)")
            later = [p for p in candidates if p >= self._cursor]
            position = min(later) if later else min(candidates)
            found.append(position)
            self._cursor = max(self._cursor, position + 1)
            at += len(self._keys[position])
        return found


@dataclass
class Seen:
    """One optimizer step as the hooks saw it."""

    positions: List[int]  # the micro-batches forwarded (with a graph) since the previous step
    params: List[torch.Tensor]  # float64 copies, in the model's parameter order
    grad: torch.Tensor  # every .grad, flattened, float64 (a parameter without one counts as zeros)
    lrs: List[float]  # each parameter group's learning rate


@dataclass
class Observer:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    stream: Stream
    steps: List[Seen] = field(default_factory=list)
    pending: List[int] = field(default_factory=list)
    _handles: List = field(default_factory=list)

    def __enter__(self) -> "Observer":
        self._handles = [self.model.register_forward_pre_hook(self._forward, with_kwargs=True),
                         self.optimizer.register_step_pre_hook(self._step)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _forward(self, module, args, kwargs) -> None:
        if not torch.is_grad_enabled():
            return  # an evaluation or logging pass: no gradient comes of it
        inputs = args[0] if args else next(iter(kwargs.values()))
        self.pending.extend(self.stream.identify(inputs))

    def _step(self, optimizer, args, kwargs) -> Optional[Tuple[tuple, dict]]:
        # `args` holds the optimizer itself first (torch's step wrapper), then a positional closure.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._snapshot()
            return None

        def observed():
            with torch.enable_grad():
                loss = closure()
            self._snapshot()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": observed}
        return (args[0], observed, *args[2:]), kwargs

    def _snapshot(self) -> None:
        params = list(self.model.parameters())
        grads = [p.grad.detach().reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)
                 for p in params]
        self.steps.append(Seen(self.pending, [p.detach().to("cpu", torch.float64).clone() for p in params],
                               torch.cat([g.to("cpu", torch.float64) for g in grads]),
                               [float(group["lr"]) for group in self.optimizer.param_groups]))
        self.pending = []
