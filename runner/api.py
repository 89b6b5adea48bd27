"""The notebook API: what `python -m runner OVERRIDES` trains, from Python.

    from runner import api
    training = api.compose(["backward=accumulate", "backward.accumulation=4"])
    outcome = api.run(training, "outputs/notebook")

`compose` applies the config groups' YAML exactly as the command line does (Hydra's compose API on
the same conf/), then validates and builds through the command line's own `runner.jobs.prepare`, so
the same overrides build the same model, data and loss, bit for bit. `run` records into a folder as
a command-line run does (summary.json with its choices, overrides and config; metrics.csv;
params.pt), so runner.compare compares notebook runs with command-line runs. Bad input raises
runner.config.schema.ConfigError with one line, Hydra's composition errors included.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Optional, Sequence, Union

from runner.config.schema import ConfigError
from runner.recording.record import Summary
from runner.training.build import Training


@dataclass
class Composed(Training):
    """A Training with how it was asked for: the choices, overrides and composed config that the
    command line records in summary.json (runner.jobs.origin)."""

    origin: Summary = field(default_factory=Summary)


def compose(overrides: Sequence[str] = (), config_dir: Union[str, Path, None] = None) -> Composed:
    """The training `python -m runner OVERRIDES` would run: composed, validated and built (the
    loss probed), nothing written. Raises ConfigError (one line) for bad input."""
    from runner import jobs
    from runner.config.compose import compose as compose_config

    cfg = compose_config(list(overrides), Path(config_dir).resolve() if config_dir is not None else None)
    if cfg.trainer.resume:
        raise ConfigError(f"trainer.resume={cfg.trainer.resume}: a resume continues a run in its own folder; "
                          f"run it with python -m runner trainer.resume=DIR")
    prepared = jobs.prepare(cfg, cfg.hydra)  # the command line's own: typed config, validate, build
    training = prepared.training
    return Composed(**{f.name: getattr(training, f.name) for f in fields(Training) if f.init},
                    origin=prepared.summary)


def run(training: Training, run_dir: Union[str, Path], summary: Optional[Summary] = None):
    """Train and record into run_dir as the command line does; returns the Outcome (status,
    summary). A composed training's choices, overrides and config are recorded (a `summary`
    given here wins); a Training built by hand records its config and its groups' names."""
    from runner.config.schema import GROUPS
    from runner.training.train import run as train_run

    if summary is None:
        if isinstance(training, Composed):
            summary = training.origin
        else:
            summary = Summary(choices={group: getattr(training.config, group).name for group in GROUPS},
                              config=training.recorded_config())
    return train_run(training, Path(run_dir), replace(summary))
