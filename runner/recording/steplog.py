"""The per-step log: each optimizer step's numbers kept on the device and turned into rows in batches,
one host transfer per batch, so logging never forces a sync per step on a GPU; the loop announces each
batch of rows to its subscribers (runner.recording.events: metrics.csv, the progress bar, the trackers).

A row's columns are declared in runner.recording.record: loss, grad_norm, loss_<name> for each part of the
loss, the strategy's and the precision's per-step columns, param_sum, time_s, and the host's
(loader, lr, memory). A non-finite loss or gradient ends the run at that step: rows batched after
it are not the run's record.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from runner.recording import record
from runner.recording.events import Row


class StepLog:
    def __init__(self, model: torch.nn.Module, param_sums: Callable[[List[torch.Tensor]], List[torch.Tensor]]):
        """`param_sums`: each parameter's sum (the parallel unit's: a sharded parameter's shards add up)."""
        self.params = list(model.parameters())
        self.param_sums = param_sums
        self.columns: Optional[List[str]] = None
        self.steps: List[int] = []
        self.values: List[torch.Tensor] = []
        self.times: List[float] = []
        self.extras: List[Dict[str, float]] = []
        self.last_loss: Optional[torch.Tensor] = None
        self.peak_saved: Optional[int] = None  # the largest peak_saved_bytes measured

    def add(self, step: int, result, elapsed: float, host: Dict[str, float]) -> None:
        """`host`: the row's values known on the host (epoch, lr, the memory meter's peak)."""
        named = {record.BASE_COLUMNS[1]: result.loss, record.BASE_COLUMNS[2]: result.grad_norm}
        named.update({record.loss_part_column(k): v for k, v in result.parts.items()})
        named.update(result.extras)
        if self.columns is None:
            self.columns = list(named)
        values = [named[c] for c in self.columns] + self.param_sums(self.params)
        try:  # one op when every value has the run's dtype (the common case)
            self.values.append(torch.stack(values))
        except RuntimeError:
            self.values.append(torch.stack([v.reshape(()).to(torch.float64) for v in values]))
        self.steps.append(step)
        self.times.append(elapsed)
        self.extras.append(host)
        self.last_loss = result.loss
        if host.get(record.MEMORY_COLUMN) is not None:
            self.peak_saved = max(self.peak_saved or 0, host[record.MEMORY_COLUMN])

    def flush(self) -> Tuple[List[Row], Optional[int]]:
        """The buffered rows, and the first step whose loss or gradient is not finite (its row the last)."""
        if not self.steps:
            return [], None
        buffered = self.values  # one transfer for all buffered rows (no stack for a single row)
        table = [buffered[0].cpu().tolist()] if len(buffered) == 1 else torch.stack(buffered).cpu().tolist()
        rows, diverged_at = [], None
        width = len(self.columns)
        step_column, _, _, param_sum_column, time_column = record.BASE_COLUMNS
        for step, values, elapsed, extra in zip(self.steps, table, self.times, self.extras):
            row = {step_column: step + 1, **dict(zip(self.columns, values[:width]))}
            # param_sum as the accumulation answer prints it: a Python sum of per-tensor sums
            row.update({param_sum_column: sum(values[width:]), time_column: elapsed}, **extra)
            for column in record.INTEGER_COLUMNS:  # counts, stacked with the floats for the one transfer
                if column in row:
                    row[column] = int(row[column])
            rows.append(row)
            if diverges(row):
                diverged_at = step + 1
                break  # the run ends at this step: rows batched after it are not its record
        self.steps, self.values, self.times, self.extras = [], [], [], []
        return rows, diverged_at


def diverges(row: Row) -> bool:
    """A row whose loss or gradient is not finite ends the run. GradScaler skips a step whose gradient
    overflowed: fp16's routine, not a divergence."""
    return not _finite(row["loss"]) or not (_finite(row["grad_norm"]) or row.get(record.STEP_SKIPPED_COLUMN))


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
