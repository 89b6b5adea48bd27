"""The per-step log: each optimizer step's numbers kept on the device, written to metrics.csv in
batches (one host transfer per batch, so logging never forces a sync per step on a GPU).

metrics.csv is opened at the first flush, when the loss's parts (loss_<name> columns) and the
strategy's extras are known. A non-finite loss or gradient ends the run at that step: rows
batched after it are not written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from runner import record


class StepLog:
    def __init__(self, model: torch.nn.Module, run_dir: Path, append: bool, extra_columns: List[str],
                 param_sums: Optional[Callable[[List[torch.Tensor]], List[torch.Tensor]]] = None):
        """`param_sums`: each parameter's sum (the parallel unit's: a sharded parameter's shards add up)."""
        self.run_dir, self.append, self.extra_columns = run_dir, append, extra_columns
        self.params = list(model.parameters())
        self.param_sums = param_sums or (lambda params: [p.detach().sum() for p in params])
        self.writer: Optional[record.MetricsWriter] = None
        self.columns: Optional[List[str]] = None
        self.steps: List[int] = []
        self.values: List[torch.Tensor] = []
        self.times: List[float] = []
        self.extras: List[Dict[str, float]] = []
        self.last_loss: Optional[torch.Tensor] = None
        self.peak_saved: Optional[int] = None  # the largest peak_saved_bytes measured

    def add(self, step: int, result, elapsed: float, host: Dict[str, float]) -> None:
        """`host`: the row's values known on the host (epoch, lr, the memory meter's peak)."""
        named = {"loss": result.loss, "grad_norm": result.grad_norm}
        named.update({f"loss_{k}": v for k, v in result.parts.items()})
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

    def flush(self) -> Optional[int]:
        """Write buffered rows. Returns the first step whose loss or gradient is not finite."""
        if not self.steps:
            return None
        if self.writer is None:
            self.writer = record.MetricsWriter(self.run_dir, self.columns[2:] + self.extra_columns,
                                               append=self.append)
        buffered = self.values  # one transfer for all buffered rows (no stack for a single row)
        table = [buffered[0].cpu().tolist()] if len(buffered) == 1 else torch.stack(buffered).cpu().tolist()
        rows, diverged_at = [], None
        width = len(self.columns)
        for step, values, elapsed, extra in zip(self.steps, table, self.times, self.extras):
            row = dict(zip(self.columns, values[:width]))
            # param_sum as the accumulation answer prints it: a Python sum of per-tensor sums
            row.update(step=step + 1, param_sum=sum(values[width:]), time_s=elapsed, **extra)
            for column in record.INTEGER_COLUMNS:  # counts, stacked with the floats for the one transfer
                if column in row:
                    row[column] = int(row[column])
            rows.append(row)
            # GradScaler skips a step whose gradient overflowed: fp16's routine, not a divergence.
            if not _finite(row["loss"]) or not (_finite(row["grad_norm"]) or row.get(record.STEP_SKIPPED_COLUMN)):
                diverged_at = step + 1
                break  # the run ends at this step: rows batched after it are not its record
        self.writer.write_rows(rows)
        self.steps, self.values, self.times, self.extras = [], [], [], []
        return diverged_at

    def position(self) -> int:
        return self.writer.position() if self.writer is not None else 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
