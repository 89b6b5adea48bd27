"""Hydra callbacks: a single run prepared before anything is written, and the sweep's comparison."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict


class PrepareRun(Callback):
    """Prepares a single run (runner.jobs.prepare: validate, build, probe the loss) before Hydra
    creates its output folder, and hands it to the task function, so bad input exits with one line
    on stderr, leaves no folder behind, and the run is built once. Sweep jobs prepare themselves
    instead, so that a bad combination becomes that job's error row and the other jobs still run.
    The prepared run reaches the task function (runner.cli.Command) as its job starts.
    """

    def __init__(self):
        self.prepared = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from runner import jobs
        from runner.config.schema import ConfigError

        try:
            from runner.fingerprint import job as fingerprint_job

            if fingerprint_job.chosen(config):  # a loop under test: checked here, run by the task function
                fingerprint_job.check(config)
                return
            resume = config.trainer.resume
            if resume:
                _resume_in_place(config, resume)
            else:
                _refuse_existing_run(Path(str(config.hydra.run.dir)))
            self.prepared = jobs.prepare(config, config.hydra)
        except ConfigError as exc:
            jobs.report_bad_input(exc)
            sys.exit(2)

    def on_job_start(self, config: DictConfig, *, task_function: Any, **kwargs: Any) -> None:
        if self.prepared is not None and hasattr(task_function, "take"):
            task_function.take(self.prepared)
            self.prepared = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from runner.jobs import report_bad_input
        from runner.recording import record

        if any(o.lstrip("+~").split("=")[0] == "trainer.resume" for o in config.hydra.overrides.task):
            report_bad_input("trainer.resume continues one run in its own folder: it cannot be part of a "
                             "sweep (-m); resume each run on its own")
            sys.exit(2)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if record.has_sweep_jobs(sweep_dir):
            report_bad_input(f"hydra.sweep.dir={sweep_dir} already holds a sweep: choose another directory "
                             "(outputs are never overwritten)")
            sys.exit(2)
        _trackers(config, lambda: _tracking().start_sweep(sweep_dir, config))


def _trackers(config: DictConfig, sweep_step: Any) -> None:
    """trainer.loggers' sweep-level records: `sweep_step()`, a function of runner.recording.trackers that
    calls each logger class's sweep hook (the MLflow parent run at the start; each job's verdict and the
    parent's artifacts at the end). Loggers that are not valid are left to the jobs, each of which records
    the one-line error; a tracker that cannot record the sweep only warns."""
    from runner.config.schema import ConfigError, validate_loggers

    loggers = list(config.trainer.get("loggers", ["csv"]))
    try:
        validate_loggers(config)
    except ConfigError:
        return
    if loggers != ["csv"]:
        try:
            sweep_step()
        except Exception as exc:
            print(f"warning: trainer.loggers: the sweep's record failed: {type(exc).__name__}: "
                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}", file=sys.stderr)


def _tracking():
    from runner.recording import trackers

    return trackers


def _refuse_existing_run(run_dir: Path) -> None:
    """Outputs are never overwritten: a run directory that holds a run is refused."""
    from runner.config.schema import ConfigError
    from runner.recording import record

    if record.holds_a_run(run_dir):
        raise ConfigError(f"hydra.run.dir={run_dir} already holds a run: choose another directory, "
                          f"or continue that run with trainer.resume={run_dir}")


def _resume_in_place(config: DictConfig, resume: str) -> None:
    """A resumed run continues in its own directory: point Hydra there (before it creates any
    folder) and keep the run's original .hydra/ record untouched."""
    from runner.config.schema import ConfigError
    from runner.execution import processes
    from runner.recording import record

    run_dir = Path(resume).resolve()
    if not record.checkpoint_path(run_dir).exists():
        raise ConfigError(f"trainer.resume={resume}: no {record.CHECKPOINT} there "
                          "(runs write one with trainer.checkpoint_every=N)")
    if processes.other_rank():  # it resumes a copy in its throwaway folder (runner.jobs.run_prepared)
        return
    with open_dict(config):
        config.hydra.run.dir = str(run_dir)
        config.hydra.output_subdir = None


class SweepComparison(Callback):
    """Adds each job's row to comparison.csv as it ends (an interrupted sweep keeps what it
    finished); at the end of the sweep rewrites it as the full comparison with verdicts, prints
    the table and the claims' verdicts and draws the picture. Hydra skips on_multirun_end when a
    job raised; runner jobs record failures instead of raising, so it always runs. The sweep's
    exit code is 1 when a claim fails or a job failed unexpectedly."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from runner.fingerprint import job as fingerprint_job

        if config.hydra.mode != RunMode.MULTIRUN or fingerprint_job.chosen(config):
            return  # a fingerprint's job has no comparison row: the sweep's end merges its fingerprint.csv
        from runner.compare import append_job_row
        from runner.recording import record

        run_dir = Path(config.hydra.runtime.output_dir)
        try:
            append_job_row(record.sweep_of(run_dir) or run_dir.parent, run_dir)
        except Exception as exc:  # a table that cannot be written must not stop the other jobs
            print(f"warning: {record.COMPARISON} not updated: {exc}", file=sys.stderr)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from runner.compare import summarise_sweep
        from runner.jobs import Exit
        from runner.recording import record

        sweep_dir = Path(config.hydra.sweep.dir)
        code = summarise_sweep(sweep_dir)
        fingerprinted = record.fingerprint_folders(sweep_dir)
        if fingerprinted:
            from runner.analysis.fingerprints import summarise

            code = max(code, summarise(fingerprinted, sweep_dir, f"fingerprints in {sweep_dir} ({len(fingerprinted)} "
                                                                 "jobs)"))
        _trackers(config, lambda: _tracking().finish_sweep(sweep_dir, config, code))
        raise Exit(code)  # the sweep's exit code, to runner.cli.entry
