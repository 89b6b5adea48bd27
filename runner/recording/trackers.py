"""trainer.loggers: each entry a subscriber of the loop's events (runner.recording.events), built from its class
with the run's folder and config: csv (metrics.csv, runner.recording.sinks), mlflow, tensorboard
(runner.recording.mlflow_tracker, tensorboard_tracker) or a class of your own (package.module.Class). The
names resolve through one registry (runner.config.schema.LOGGERS), which validation read too: each class
declares the package it needs (`requires`), and a tracker's package is imported only when its logger is on.

    loggers(config, run_dir)                   -> [(its name in messages, its subscriber), ...]
    record_untrained(config, run_dir, summary)    a sweep's job that did not train, told to its trackers
    start_sweep(sweep_dir, config), finish_sweep(sweep_dir, config, exit_code)   each class's sweep hooks

A tracker that talks to a store (`batched = True`) gets its rows at most every SEND_EVERY_S seconds (Batched).
Only rank 0 of several processes tracks; every rank keeps its metrics.csv (the others' in a throwaway folder).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, List, Tuple

from runner.config.schema import ConfigError, first_line, logger_class
from runner.execution import processes
from runner.recording.events import Row, RunStart, Subscriber, Subscribers, warn
from runner.recording.record import Summary

RECORD = "csv"  # metrics.csv: the logger that is the run's record, never dropped

# At most one call per tracker every this many seconds while a run trains: on a CPU the loop announces its
# rows every step (metrics.csv is flushed per step so that a killed run reads to its last step), and
# one MLflow log_batch into SQLite per step would cost more than the step (`python -m runner.bench
# --only trackers`). metrics.csv stays the complete record; a tracker lags it by at most this much.
SEND_EVERY_S = 2.0


class Batched(Subscriber):
    """A tracker fed the rows of at most every SEND_EVERY_S seconds at once; the rest goes before it
    closes or ends its run. It delivers by `write` and `finish` (runner.recording.events.Subscriber)."""

    def __init__(self, tracker: Any, every_s: float = SEND_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.tracker, self.every_s, self.clock = tracker, every_s, clock
        self.pending: List[Row] = []
        self.sent_at = clock()

    def run_start(self, run: RunStart) -> None:
        self.tracker.run_start(run)
        self.sent_at = self.clock()

    def rows(self, rows: List[Row]) -> None:
        self.pending.extend(rows)
        if self.clock() - self.sent_at >= self.every_s:
            self.send()

    def send(self) -> None:
        if self.pending:
            rows, self.pending = self.pending, []
            self.tracker.write(rows)
        self.sent_at = self.clock()

    def run_end(self, summary: Summary, failed: bool) -> None:
        self.send()
        self.tracker.finish(summary, failed)

    def close(self) -> None:
        self.send()
        self.tracker.close()


def loggers(config: Any, run_dir: Path, record: bool = True) -> List[Tuple[str, Any]]:
    """trainer.loggers built, in order; `record=False` leaves metrics.csv out (a job that reuses or lacks
    its rows). A class that cannot be built is bad input, one line naming its entry."""
    entries = [e for e in config.trainer.loggers if (record or e != RECORD)
               and (e == RECORD or not processes.other_rank())]
    built = []
    for entry in entries:
        cls = logger_class(entry)
        try:
            subscriber = cls(Path(run_dir), config)
        except Exception as exc:  # a store's client that cannot be made, your class's own error
            raise ConfigError(f"trainer.loggers: {entry} cannot start a run: "
                              f"{type(exc).__name__}: {first_line(exc)}") from None
        built.append((f"trainer.loggers: {entry}", Batched(subscriber) if getattr(cls, "batched", False)
                      else subscriber))
    return built


def record_untrained(config: Any, run_dir: Path, summary: Summary) -> None:
    """A sweep's job recorded without training (refused as bad input, or reusing an equal job's records:
    runner.jobs.reuse_twin) is still one of the sweep's runs: its loggers but csv hear its start, its
    metrics.csv rows, if any, and its summary."""
    from runner.recording import record

    heard = Subscribers(loggers(config, run_dir, record=False))
    heard.run_start(RunStart(Path(run_dir), summary, steps=config.trainer.steps))
    failed = True
    try:
        metrics = record.read_metrics(run_dir)
        if metrics is not None and len(metrics):  # a column only some rows carry reads as NaN elsewhere
            heard.rows([{k: v for k, v in row.items() if v == v} for row in metrics.to_dict("records")])
        failed = False
    finally:
        heard.run_end(summary, failed)
        heard.close()


def start_sweep(sweep_dir: Path, config: Any) -> None:
    """Before the sweep's jobs: each logger's sweep record (the MLflow parent run, which jobs in other
    processes find by the sweep's folder)."""
    _each_class(config, lambda cls: cls.sweep_start(Path(sweep_dir), config), "sweep_start")


def finish_sweep(sweep_dir: Path, config: Any, exit_code: int) -> None:
    """After comparison.csv: each job's verdict to its trackers, the parent run's artifacts and status."""
    _each_class(config, lambda cls: cls.sweep_end(Path(sweep_dir), config, exit_code), "sweep_end")


def _each_class(config: Any, hook: Callable[[type], None], name: str) -> None:
    """The hook of each logger's class that has it; one that fails only warns (the sweep's records are written)."""
    for entry in config.trainer.loggers:
        cls = logger_class(entry)
        if not hasattr(cls, name):
            continue
        try:
            hook(cls)
        except Exception as exc:
            warn(f"trainer.loggers: {entry}: the sweep's record failed: {type(exc).__name__}: {first_line(exc)}")
