"""Sinks: where a run's per-step rows go. The loop's StepLog hands every batch of rows to each
sink through one interface (`write(rows)`, `close()`): metrics.csv and the terminal's progress
today; a tracker is one more sink. Rows are plain dicts keyed by the columns record.py declares.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

from runner import record

Row = Dict[str, Any]


def number(value: Any) -> Optional[float]:
    """A figure a tracker can log (an int or float, not a bool), as a float; None otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def step_scalars(row: Row) -> Tuple[int, List[Tuple[str, float]]]:
    """A metrics row as (its optimizer step, its numeric columns but the step)."""
    step_column = record.BASE_COLUMNS[0]
    values = ((column, number(value)) for column, value in row.items() if column != step_column)
    return int(row[step_column]), [(column, value) for column, value in values if value is not None]


class Sink(Protocol):
    def write(self, rows: List[Row]) -> None: ...

    def close(self) -> None: ...


class MetricsFile:
    """metrics.csv: opened at the first write, when the loss's parts and the strategy's columns are
    known; `columns` are those only some rows carry (the memory meter's, the loader's), kept last."""

    def __init__(self, run_dir: Path, append: bool, columns: Sequence[str] = ()):
        self.run_dir, self.append, self.columns = run_dir, append, list(columns)
        self.writer: Optional[record.MetricsWriter] = None

    def write(self, rows: List[Row]) -> None:
        if self.writer is None:
            first = [c for c in rows[0] if c not in record.BASE_COLUMNS and c not in self.columns]
            self.writer = record.MetricsWriter(self.run_dir, first + self.columns, append=self.append)
        self.writer.write_rows(rows)

    def position(self) -> int:
        """Bytes of metrics.csv written so far (a checkpoint remembers where its rows end)."""
        return self.writer.position() if self.writer is not None else 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A rich progress bar on a terminal, advanced by the rows written; a no-op otherwise (rich
    is only imported then)."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import Progress as Bar

            self.bar = Bar(transient=True)
            self.task = self.bar.add_task("training", total=total, completed=start)
            self.bar.start()

    def write(self, rows: List[Row]) -> None:
        if self.bar is not None and rows:
            self.bar.update(self.task, completed=rows[-1][record.BASE_COLUMNS[0]])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
