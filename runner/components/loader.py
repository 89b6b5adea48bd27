"""Where each optimizer step's examples come from: a batch, or a window of loader micro-batches.

Batch mode (the default): step s trains on `Dataset.batch(s)`, `data.batch_size` examples that
the strategy splits into micro-batches itself.

Loader mode (`data.micro_batch_size=M`), as users accumulate when only M examples fit at a time:
a torch.utils.data.DataLoader draws micro-batches of M from the training rows, shuffled per epoch
by a generator seeded with (seed, epoch); `backward.accumulation` = k of them make one window,
one optimizer step, and steps run on through epochs. When an epoch's micro-batches do not divide
by k its last window is partial (k' < k micro-batches; the very last micro-batch may be short):
it is trained (weighted as partial_window says) or, with partial_window=drop, skipped. With
partial_window=carry windows know no epochs: window s holds the stream's micro-batches s*k .. s*k+k-1,
so an epoch's last ones share a window with the next epoch's first (DeepSpeed's boundary).

Both are pure functions of (seed, step), so a resumed run sees the data it would have seen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from runner.components.data import Dataset, Targets, map_targets
from runner.recording import record

_LOADER_STREAM = 4_000_037  # keeps the loader's shuffles independent of the data's other generators


@dataclass
class Window:
    """One optimizer step's examples; `sizes` are the loader's micro-batches (None in batch mode)."""

    inputs: torch.Tensor
    targets: Targets
    sizes: Optional[List[int]] = None
    epoch: Optional[int] = None

    def columns(self) -> Dict[str, int]:
        """metrics.csv's loader columns: the epoch and the examples the window holds."""
        return {} if self.sizes is None else dict(zip(record.LOADER_COLUMNS, (self.epoch, sum(self.sizes))))


class Batches:
    """Batch mode: the dataset's seeded batches of data.batch_size."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def window(self, step: int) -> Window:
        return Window(*self.dataset.batch(step))


class _Rows(torch.utils.data.Dataset):
    """The training rows, fetched a micro-batch at a time: the sampler yields lists of indices and
    one tensor index gathers them (no per-example collation)."""

    def __init__(self, dataset: Dataset):
        self.inputs, self.targets = dataset.train_inputs, dataset.train_targets

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, rows: List[int]):
        index = torch.as_tensor(rows, device=self.inputs.device)
        return self.inputs[index], map_targets(self.targets, lambda t: t[index])


class LoaderWindows:
    """Loader mode: windows of k micro-batches of M through a DataLoader (see the module doc)."""

    def __init__(self, dataset: Dataset, micro_batch_size: int, k: int, drop_partial: bool, carry: bool = False):
        self.rows, self.seed = _Rows(dataset), dataset.seed
        self.micro_batch_size, self.k, self.carry = micro_batch_size, k, carry
        n = len(self.rows)
        if micro_batch_size > n:
            raise ValueError(f"data.micro_batch_size={micro_batch_size} is not allowed: expected at most the "
                             f"{n} training rows")
        self.micro_batches_per_epoch = math.ceil(n / micro_batch_size)
        full, rest = divmod(self.micro_batches_per_epoch, k)
        self.windows_per_epoch = full + (1 if rest and not drop_partial else 0)
        if self.windows_per_epoch == 0:
            raise ValueError(f"backward.partial_window=drop leaves no window: an epoch holds "
                             f"{self.micro_batches_per_epoch} micro-batches of {micro_batch_size}, fewer than "
                             f"backward.accumulation={k}; expected exact or k, or a smaller accumulation")
        self._next = None  # (epoch, window) the open iterator yields next
        self._batches = None

    def loader(self, epoch: int) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed * _LOADER_STREAM + epoch)
        sampler = BatchSampler(RandomSampler(self.rows, generator=generator), self.micro_batch_size, drop_last=False)
        return DataLoader(self.rows, sampler=sampler, batch_size=None)

    def window(self, step: int) -> Window:
        if self.carry:  # the stream's micro-batches step*k .. step*k+k-1, whichever epochs they come from
            stream = range(step * self.k, (step + 1) * self.k)
            drawn = [self._draw(*divmod(g, self.micro_batches_per_epoch)) for g in stream]
            return self._window(drawn, stream[0] // self.micro_batches_per_epoch)
        epoch, index = divmod(step, self.windows_per_epoch)
        first = index * self.k
        last = min(first + self.k, self.micro_batches_per_epoch)
        return self._window([self._draw(epoch, i) for i in range(first, last)], epoch)

    def _draw(self, epoch: int, index: int):
        """Micro-batch `index` of `epoch`, from the open iterator where it is the next one."""
        if self._next != (epoch, index):  # a jump (the first step, a resume, a new epoch): reopen and skip
            self._batches = iter(self.loader(epoch))
            for _ in range(index):
                next(self._batches)
        self._next = (epoch, index + 1)
        return next(self._batches)

    @staticmethod
    def _window(drawn, epoch: int) -> Window:
        inputs = torch.cat([x for x, _ in drawn])
        first = drawn[0][1]
        targets = {name: torch.cat([y[name] for _, y in drawn]) for name in first} if isinstance(first, dict) \
            else torch.cat([y for _, y in drawn])
        return Window(inputs, targets, [x.shape[0] for x, _ in drawn], epoch)
