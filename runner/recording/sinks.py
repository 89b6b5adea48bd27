"""Sinks: where a run's per-step rows go, each a subscriber of the loop's events (runner.recording.events):
metrics.csv (trainer.loggers' csv, the record the analysis reads) and the terminal's progress bar. The
trackers are sinks too (runner.recording.mlflow_tracker, tensorboard_tracker), and so is a class of your own.
Rows are plain dicts keyed by the columns record.py declares.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, List, Optional

from runner.recording import record
from runner.recording.events import Row, RunStart, Subscriber


class MetricsFile(Subscriber):
    """metrics.csv: opened at the first rows, when the loss's parts and the strategy's columns are known;
    the host's columns (the memory meter's, the loader's, lr) are kept last. A resumed run appends to the
    rows its checkpoint kept."""

    def __init__(self, run_dir: Path, config: Any = None):
        self.run_dir = Path(run_dir)
        self.append, self.columns = False, []
        self.writer: Optional[record.MetricsWriter] = None

    def run_start(self, run: RunStart) -> None:
        self.append, self.columns = run.resumed, list(run.host_columns)

    def rows(self, rows: List[Row]) -> None:
        if self.writer is None:
            first = [c for c in rows[0] if c not in record.BASE_COLUMNS and c not in self.columns]
            self.writer = record.MetricsWriter(self.run_dir, first + self.columns, append=self.append)
        self.writer.write_rows(rows)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress(Subscriber):
    """A rich progress bar on a terminal (trainer.progress), advanced by the rows written; a no-op otherwise
    (rich is only imported then)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def run_start(self, run: RunStart) -> None:
        if self.enabled and sys.stdout.isatty():
            from rich.progress import Progress as Bar

            self.bar = Bar(transient=True)
            self.task = self.bar.add_task("training", total=run.steps, completed=run.start_step)
            self.bar.start()

    def rows(self, rows: List[Row]) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=rows[-1][record.BASE_COLUMNS[0]])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
