"""trainer.loggers beyond csv: experiment trackers, each one more sink of the loop's StepLog
(runner.training.sinks) that also hears the run's outcome once its summary is complete.

    with Trackers.open(config, run_dir, summary) as trackers:   # none for loggers=[csv]
        summary, ... = trackers.follow(*prepare(...))           # the summary the run completes
        ... train, with trackers.sinks among StepLog's sinks ...
        ... finish the summary ...
    # each tracker's run ends with the summary's status; FAILED where an exception left the block

A tracker's package is imported only when its logger is on (runner.training.mlflow_tracker,
runner.training.tensorboard_tracker); schema.validate_loggers has refused a missing one with one
line naming the extra. Only rank 0 of several processes tracks: the others record into a throwaway
folder. The sweep's start and end (runner.callbacks) call `start_sweep` and `finish_sweep`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence

from runner.config.schema import ConfigError
from runner.execution import processes
from runner.record import Summary
from runner.training.checks import first_line
from runner.training.sinks import Sink


class Tracker(Sink, Protocol):
    """A sink (runner.training.sinks) that also ends its tracker's run with the run's outcome."""

    def finish(self, summary: Summary, failed: bool = False) -> None: ...


def _build(name: str, run_dir: Path, trainer: Any, summary: Summary, resumed: bool) -> Optional[Tracker]:
    if name == "mlflow":
        from runner.training.mlflow_tracker import MlflowTracker

        return MlflowTracker(run_dir, trainer.mlflow_uri, summary, resumed)
    if name == "tensorboard":
        from runner.training.tensorboard_tracker import TensorBoardTracker

        return TensorBoardTracker(run_dir, summary)
    return None  # csv: metrics.csv, the loop's own sink


# At most one call per tracker every this many seconds while a run trains: on a CPU the loop hands its
# sinks every step (metrics.csv is flushed per step so that a killed run reads to its last step), and
# one MLflow log_batch into SQLite per step would cost more than the step (`python -m runner.bench
# --only trackers`). metrics.csv stays the complete record; a tracker lags it by at most this much.
SEND_EVERY_S = 2.0


class Batched:
    """A tracker fed the rows of at most every SEND_EVERY_S seconds at once; the rest goes before it
    closes or ends its run."""

    def __init__(self, tracker: Tracker, every_s: float = SEND_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.tracker, self.every_s, self.clock = tracker, every_s, clock
        self.rows: List[Dict[str, Any]] = []
        self.sent_at = clock()

    def write(self, rows: List[Dict[str, Any]]) -> None:
        self.rows.extend(rows)
        if self.clock() - self.sent_at >= self.every_s:
            self.send()

    def send(self) -> None:
        if self.rows:
            rows, self.rows = self.rows, []
            self.tracker.write(rows)
        self.sent_at = self.clock()

    def close(self) -> None:
        self.send()
        self.tracker.close()

    def finish(self, summary: Summary, failed: bool = False) -> None:
        self.send()
        self.tracker.finish(summary, failed)


class Trackers:
    def __init__(self, trackers: Sequence[Tracker], summary: Summary):
        self.sinks: List[Tracker] = list(trackers)
        self.summary = summary  # the run's summary object, completed in place by the loop and its finish

    @classmethod
    def open(cls, config: Any, run_dir: Path, summary: Summary, resumed: bool = False) -> "Trackers":
        """`summary`: what is known before the run (config, choices); `resumed`: a resumed run goes on
        in its tracker's run where the tracker can find it (MLflow, by the run's folder)."""
        names = [] if processes.other_rank() else list(config.trainer.loggers)
        built = []
        for name in names:
            try:
                built.append(_build(name, Path(run_dir), config.trainer, summary, resumed))
            except Exception as exc:  # a store that cannot be reached or opened: bad input, one line
                uri = f" (trainer.mlflow_uri={config.trainer.mlflow_uri})" if name == "mlflow" else ""
                raise ConfigError(f"trainer.loggers: {name}{uri} cannot start a run: "
                                  f"{type(exc).__name__}: {first_line(exc)}") from None
        return cls([Batched(tracker) for tracker in built if tracker is not None], summary)

    def follow(self, summary: Summary, *rest: Any):
        """The run's summary from here on (the loop completes it in place); returns its arguments."""
        self.summary = summary
        return (summary, *rest)

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        for tracker in self.sinks:
            try:
                tracker.finish(self.summary, failed=kind is not None)
            except Exception as exc:  # the run's own records are written: a tracker's failure only warns
                print(f"warning: trainer.loggers: {type(tracker).__name__} did not record the run's end: "
                      f"{type(exc).__name__}: {first_line(exc)}", file=sys.stderr)


def record_untrained(config: Any, run_dir: Path, summary: Summary) -> None:
    """A sweep's job recorded without training (refused as bad input, or reusing an equal job's records:
    runner.cli.reuse_twin) is still one of the sweep's runs: its trackers get its metrics.csv rows, if
    any, and its summary."""
    from runner import record

    with Trackers.open(config, run_dir, summary) as trackers:
        metrics = record.read_metrics(run_dir) if trackers.sinks else None
        if metrics is not None and len(metrics):  # a column only some rows carry reads as NaN elsewhere
            rows = [{k: v for k, v in row.items() if v == v} for row in metrics.to_dict("records")]
            for tracker in trackers.sinks:
                tracker.write(rows)


def start_sweep(sweep_dir: Path, loggers: Sequence[str], mlflow_uri: Optional[str]) -> None:
    """The sweep's parent MLflow run, created before its jobs start (they find it by the sweep's folder)."""
    if "mlflow" in loggers:
        from runner.training.mlflow_tracker import start_sweep as start_parent

        start_parent(sweep_dir, mlflow_uri)


def finish_sweep(sweep_dir: Path, loggers: Sequence[str], mlflow_uri: Optional[str], exit_code: int) -> None:
    """After comparison.csv: each job's verdict to its trackers, the parent run's artifacts and status."""
    if "tensorboard" in loggers:
        from runner.training.tensorboard_tracker import finish_sweep as finish_tensorboard

        finish_tensorboard(sweep_dir)
    if "mlflow" in loggers:
        from runner.training.mlflow_tracker import finish_sweep as finish_mlflow

        finish_mlflow(sweep_dir, mlflow_uri, exit_code)
