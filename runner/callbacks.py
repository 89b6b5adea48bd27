"""Hydra callbacks: input validation before anything is written (and the sweep comparison)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class ValidateConfig(Callback):
    """Checks a single run's config before Hydra creates its output folder.

    Hydra calls on_run_start before run_job makes the run directory, so bad input exits with one
    line on stderr and leaves no folder behind. Sweep jobs are checked inside each job instead, so
    that a bad combination becomes that job's error row and the other jobs still run.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from runner.cli import config_from_omegaconf, report_bad_input
        from runner.parts import preflight
        from runner.schema import ConfigError, validate

        try:
            plain, loss_kwargs = config_from_omegaconf(config)
            if plain.trainer.resume:
                _resume_in_place(config, plain.trainer.resume)
                return  # the job checks the checkpoint and uses the run's own config
            _refuse_existing_run(Path(str(config.hydra.run.dir)))
            validate(plain)
            preflight(plain, loss_kwargs)
        except ConfigError as exc:
            report_bad_input(exc)
            sys.exit(2)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from runner.cli import report_bad_input
        from runner.schema import ConfigError

        if any(o.lstrip("+~").split("=")[0] == "trainer.resume" for o in config.hydra.overrides.task):
            report_bad_input(ConfigError("trainer.resume continues one run in its own folder: "
                                         "it cannot be part of a sweep (-m); resume each run on its own"))
            sys.exit(2)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.exists() and any(sweep_dir.glob("*/summary.json")):
            report_bad_input(ConfigError(
                f"hydra.sweep.dir={sweep_dir} already holds a sweep: choose another directory "
                "(outputs are never overwritten)"))
            sys.exit(2)


def _refuse_existing_run(run_dir: Path) -> None:
    """Outputs are never overwritten: a run directory that holds a run is refused."""
    from runner.schema import ConfigError

    if (run_dir / "summary.json").exists() or (run_dir / "metrics.csv").exists():
        raise ConfigError(f"hydra.run.dir={run_dir} already holds a run: choose another directory, "
                          f"or continue that run with trainer.resume={run_dir}")


def _resume_in_place(config: DictConfig, resume: str) -> None:
    """A resumed run continues in its own directory: point Hydra there (before it creates any
    folder) and keep the run's original .hydra/ record untouched."""
    from omegaconf import open_dict

    from runner.schema import ConfigError

    run_dir = Path(resume).resolve()
    if not (run_dir / "checkpoint.pt").exists():
        raise ConfigError(f"trainer.resume={resume}: no checkpoint.pt there "
                          "(runs write one with trainer.checkpoint_every=N)")
    with open_dict(config):
        config.hydra.run.dir = str(run_dir)
        config.hydra.output_subdir = None


def _sweep_dir(output_dir: str):
    from pathlib import Path

    path = Path(output_dir).resolve()
    for parent in path.parents:
        if (parent / "multirun.yaml").exists():
            return parent
    return path.parent


class SweepComparison(Callback):
    """Appends each job's row to comparison.csv as it ends (an interrupted sweep keeps what it
    finished); at the end of the sweep rewrites it as the full comparison with verdicts, prints
    the table and the claims' verdicts and draws the loss curves. Hydra skips on_multirun_end when a job raised; runner jobs record failures instead
    of raising, so it always runs. Exits 1 when a claim fails or a job failed unexpectedly."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        from pathlib import Path

        from runner.compare import append_job_row

        run_dir = Path(config.hydra.runtime.output_dir)
        try:
            append_job_row(_sweep_dir(str(run_dir)), run_dir)
        except Exception as exc:  # a table that cannot be written must not stop the other jobs
            print(f"warning: comparison.csv not updated: {exc}", file=sys.stderr)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from pathlib import Path

        from runner.compare import summarise_sweep

        code = summarise_sweep(Path(config.hydra.sweep.dir))
        if code:
            sys.exit(code)
