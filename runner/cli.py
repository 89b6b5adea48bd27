"""The only Hydra entry point: compose, validate and build once, run, map the outcome to an exit code.

Single run: exit 0 when it finished ok; 1 for a failed or diverged run; 2 for bad input (Hydra's
own composition errors included); 130/143 when interrupted by SIGINT/SIGTERM. A single run is
prepared (validated, built, its loss probed) by the PrepareRun callback before Hydra creates
its folder, so bad input leaves nothing behind; the task function then runs what was prepared.
In a sweep (-m) each job prepares itself and never raises: its outcome, bad input included, is
recorded in its summary.json and the sweep's verdicts decide the exit code; only SIGINT/SIGTERM
stops the whole sweep (130/143) after recording the interrupted job.
`trainer.resume=<run dir>` continues that run in its own folder from its checkpoint.
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from runner.config.location import CONF_DIR
from runner.config.schema import ConfigError
from runner.execution import processes
from runner.fingerprint import job as fingerprint_job
from runner.jobs import (
    Exit,
    Prepared,
    built,
    origin,
    prepare,
    report_bad_input,
    reuse_twin,
    run_prepared,
    track_untrained_job,
)
from runner.recording import record


class Command:
    """The task function `python -m runner` hands Hydra: one run, or one job of a sweep.

    A single run arrives prepared: the PrepareRun callback prepared it before Hydra created its
    folder and hands it over (`take`) as the job starts. A sweep's job prepares itself, and bad
    input is its recorded result. The single run's exit code is kept here for `entry`."""

    def __init__(self):
        self.prepared: Optional[Prepared] = None
        self.exit_code = 0

    def take(self, prepared: Prepared) -> None:
        self.prepared = prepared

    def __call__(self, cfg: DictConfig) -> None:
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        prepared, self.prepared = self.prepared, None
        if fingerprint_job.chosen(cfg):  # loop=NAME: the loop under test trains, the lab observes
            code = fingerprint_job.run(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task), multirun)
            self.exit_code = self.exit_code if multirun else code
            return
        if prepared is None:
            run_dir = Path(hc.runtime.output_dir)
            try:
                prepared = prepare(cfg, hc, build=False)
                # A job equal to one its sweep already trained is not built, let alone trained.
                if multirun and not prepared.config.trainer.rerun and reuse_twin(prepared, hc):
                    return
                prepared = built(prepared)
            except ConfigError as exc:
                report_bad_input(exc)
                refused = replace(origin(cfg, hc), status="error", error=str(exc), run_dir=str(run_dir.resolve()))
                record.write_summary(run_dir, refused)
                if multirun:
                    track_untrained_job(cfg, run_dir, refused)
                self.exit_code = 2 if not multirun else self.exit_code
                return
        code = run_prepared(prepared, hc, multirun)
        if code is not None:
            self.exit_code = code


def entry() -> None:
    """`python -m runner`: Hydra's main, with exit codes as the contract says. Under torchrun, ranks
    other than 0 record into a throwaway folder and print nothing on stdout (rank 0 speaks)."""
    argv, throwaway = processes.other_rank_argv(sys.argv[1:])
    sys.argv = sys.argv[:1] + argv
    if processes.quiet():
        sys.stdout = open(os.devnull, "w")
    command = Command()
    try:
        hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(command)()
    except Exit as exc:  # a sweep's verdict, or a sweep stopped by a signal
        command.exit_code = exc.code
    except SystemExit as exc:
        # Hydra reports an exception it caught (a composition error) with exit 1; ours never use 1.
        sys.exit(2 if exc.code == 1 else exc.code)
    finally:
        processes.remove_folder(throwaway)
        from runner.execution.parallel import leave

        leave()
    sys.exit(command.exit_code)
