"""The loop's named events, and what hears them: what watches a run subscribes, never is code in the loop
(minGPT's `trigger_callbacks`, typed).

    run_start(run)            before the run's clock starts: run.run_dir, run.summary (the config and choices
                              known before training), run.resumed, run.start_step, run.steps, run.host_columns
    step(step, host)          around each optimizer step, a context: the memory meter measures it into the step's
                              host values; first_grad.pt is written after the first (runner.recording.watchers)
    rows(rows)                each flushed batch of metrics rows, as metrics.csv gets them (runner.recording.steplog:
                              one host transfer per batch, never a sync per step)
    run_end(summary, failed)  once summary.json is complete; `failed`: an exception left the run
    close()                   last
    sweep_start(sweep_dir, config), sweep_end(sweep_dir, config, exit_code)
                              class methods, for a sweep's own records (MLflow's parent run, TensorBoard's verdicts)

Who subscribes: each entry of trainer.loggers (metrics.csv, MLflow, TensorBoard or a class of your own, built
with the run's folder and config: runner.recording.trackers), the progress bar, the checkpoints, first_grad.pt
and the memory meter. A new sink is one class, its events the ones it overrides:

    class LastLoss(Subscriber):
        def __init__(self, run_dir, config): ...
        def rows(self, rows): print(rows[-1]["loss"])

    python -m runner 'trainer.loggers=[csv,mypackage.sinks.LastLoss]'
"""
from __future__ import annotations

import sys
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Dict, List, Optional, Sequence, Tuple

from runner.config.schema import ConfigError, first_line
from runner.recording import record
from runner.recording.record import Summary

Row = Dict[str, Any]

NOTHING = nullcontext()  # a step nobody watches: entered and left for free


@dataclass(frozen=True)
class RunStart:
    """What a run is, as it starts."""

    run_dir: Path
    summary: Summary  # what is known before training: the config, choices and overrides
    resumed: bool = False  # continued from its checkpoint: its rows go on after start_step
    start_step: int = 0  # optimizer steps done before this start (a resumed run's checkpoint step)
    steps: int = 0  # trainer.steps: the step the run ends at
    host_columns: Tuple[str, ...] = ()  # the columns only some runs or rows carry (loader, lr, memory), kept last

    @property
    def config(self) -> Dict[str, Any]:
        return self.summary.config


class Subscriber:
    """What hears the loop's events; each a no-op here, so a subscriber overrides the ones it needs.

    `write` and `finish` are `rows` and `run_end` by a sink's earlier names (write(rows), close(), a tracker's
    finish(summary, failed)): runner.recording.trackers.Batched delivers by them, so it batches either kind."""

    requires: Optional[str] = None  # the package it needs installed (runner.config.schema checks, not importing it)
    batched = False  # a store that costs more per call than a step: its rows come at most every few seconds

    def run_start(self, run: RunStart) -> None:
        pass

    def step(self, step: int, host: Dict[str, Any]) -> ContextManager:
        """Around the step; `host`: the step's values known on the host, which a watcher may add a column to."""
        return NOTHING

    def rows(self, rows: List[Row]) -> None:
        pass

    def run_end(self, summary: Summary, failed: bool) -> None:
        pass

    def close(self) -> None:
        pass

    @classmethod
    def sweep_start(cls, sweep_dir: Path, config: Any) -> None:
        """Before a sweep's jobs start (runner.callbacks), with the sweep's config."""

    @classmethod
    def sweep_end(cls, sweep_dir: Path, config: Any, exit_code: int) -> None:
        """After the sweep's comparison.csv, with its exit code."""

    def write(self, rows: List[Row]) -> None:
        self.rows(rows)

    def finish(self, summary: Summary, failed: bool = False) -> None:
        self.run_end(summary, failed)


def overrides(subscriber: Any, event: str) -> bool:
    """Does it hear `event`: a Subscriber that overrides it, or an object of its own with that method."""
    method = getattr(type(subscriber), event, None)
    return method is not None and method is not getattr(Subscriber, event)


class Subscribers:
    """The loop's announcer: each event to every subscriber, in order (metrics.csv before a checkpoint, which
    remembers where its rows end). `named`: (what a message calls it, the subscriber)."""

    def __init__(self, named: Sequence[Tuple[str, Any]]):
        self.named = list(named)
        self.started: List[Tuple[str, Any]] = []
        # Only those that hear an event are called for it: a step nobody watches costs nothing.
        self._steps = [s for _, s in self.named if overrides(s, "step")]
        self._rows = [s.rows for _, s in self.named if overrides(s, "rows")]

    def run_start(self, run: RunStart) -> None:
        """A subscriber that cannot start (a store that cannot be reached or opened) is bad input, one line;
        those started before it end their runs failed."""
        for name, subscriber in self.named:
            try:
                if overrides(subscriber, "run_start"):
                    subscriber.run_start(run)
            except Exception as exc:
                self.run_end(run.summary, failed=True)
                try:
                    self.close()
                except Exception:  # the line says what failed first
                    pass
                raise ConfigError(f"{name} cannot start a run: {type(exc).__name__}: {first_line(exc)}") from None
            self.started.append((name, subscriber))

    def step(self, step: int, host: Dict[str, Any]) -> ContextManager:
        """The watchers' contexts around one step, the first outermost; NOTHING on most steps."""
        watching = [context for context in (s.step(step, host) for s in self._steps) if context is not NOTHING]
        if len(watching) <= 1:
            return watching[0] if watching else NOTHING
        stack = ExitStack()
        try:
            for context in watching:
                stack.enter_context(context)
        except BaseException:
            stack.close()  # those entered are left again
            raise
        return stack

    def rows(self, rows: List[Row]) -> None:
        if rows:
            for hear in self._rows:
                hear(rows)

    def run_end(self, summary: Summary, failed: bool) -> None:
        """Each started subscriber hears the outcome; the run's own records are written, so one that fails only warns."""
        started, self.started = self.started, []
        for name, subscriber in started:
            if not overrides(subscriber, "run_end"):
                continue
            try:
                subscriber.run_end(summary, failed)
            except Exception as exc:
                warn(f"{name} did not record the run's end: {type(exc).__name__}: {first_line(exc)}")

    def close(self) -> None:
        """Every subscriber closes, even past one that fails; the first failure is raised after."""
        failure = None
        for _, subscriber in self.named:
            try:
                if overrides(subscriber, "close"):
                    subscriber.close()
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure


def warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


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
