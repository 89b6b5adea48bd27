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
