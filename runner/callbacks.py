"""Hydra callbacks: input validation before anything is written (and the sweep comparison)."""
from __future__ import annotations

import sys
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
            validate(plain)
            preflight(plain, loss_kwargs)
        except ConfigError as exc:
            report_bad_input(exc)
            sys.exit(2)


def _sweep_dir(output_dir: str):
    from pathlib import Path

    path = Path(output_dir).resolve()
    for parent in path.parents:
        if (parent / "multirun.yaml").exists():
            return parent
    return path.parent


class SweepComparison(Callback):
    """Writes comparison.csv as each job ends (an interrupted sweep keeps what it finished),
    and at the end of the sweep prints the table and the claims' verdicts and draws the loss
    curves. Hydra skips on_multirun_end when a job raised; runner jobs record failures instead
    of raising, so it always runs. Exits 1 when a claim fails or a job failed unexpectedly."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        from runner.compare import summarise_sweep

        try:
            summarise_sweep(_sweep_dir(config.hydra.runtime.output_dir), final=False)
        except Exception as exc:  # a table that cannot be written must not stop the other jobs
            print(f"warning: comparison.csv not updated: {exc}", file=sys.stderr)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from pathlib import Path

        from runner.compare import summarise_sweep

        code = summarise_sweep(Path(config.hydra.sweep.dir), final=True)
        if code:
            sys.exit(code)
