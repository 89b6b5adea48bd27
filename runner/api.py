"""The notebook API: what `python -m runner OVERRIDES` trains, from Python.

    from runner import api
    training = api.compose(["backward=accumulate", "backward.accumulation=4"])
    outcome = api.run(training, "outputs/notebook")

`compose` applies the config groups' YAML exactly as the command line does (Hydra's compose API on
the same conf/), then validates and builds through the command line's own `runner.cli.prepare`, so
the same overrides build the same model, data and loss, bit for bit. `run` records into a folder as
a command-line run does (summary.json with its choices, overrides and config; metrics.csv;
params.pt), so runner.compare compares notebook runs with command-line runs. Bad input raises
runner.config.schema.ConfigError with one line, Hydra's composition errors included.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from runner.config.schema import ConfigError
from runner.record import Summary
from runner.training.build import Training


@dataclass
class Composed(Training):
    """A Training with how it was asked for: the choices, overrides and composed config that the
    command line records in summary.json (runner.cli.origin)."""

    origin: Summary = field(default_factory=Summary)


@contextmanager
def _hydra(config_dir: Path) -> Iterator[None]:
    """Hydra initialised on config_dir for one composition. A Hydra already initialised in this
    process (a @hydra.main run, the caller's own `hydra.initialize`) is set aside and put back."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    outer = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with hydra.initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
            yield
    finally:
        GlobalHydra.instance().hydra = outer


def _one_line(exc: BaseException) -> str:
    """Hydra's message, first line, with its cause's first line when Hydra's own says little
    ("Error merging override trainer.steps=abc: Value 'abc' ... could not be converted to Integer")."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        text = f"{text}: {str(cause).strip().splitlines()[0]}"
    return text


def compose(overrides: Sequence[str] = (), config_dir: Union[str, Path, None] = None) -> Composed:
    """The training `python -m runner OVERRIDES` would run: composed, validated and built (the
    loss probed), nothing written. Raises ConfigError (one line) for bad input."""
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException

    from runner import cli  # its import registers base_config (runner.config.schema.register)

    overrides = list(overrides)
    folder = Path(config_dir).resolve() if config_dir is not None else cli.CONF_DIR
    try:
        with _hydra(folder):
            # The hydra node is kept: its runtime choices and task overrides are the run's record.
            cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    except HydraException as exc:
        raise ConfigError(_one_line(exc)) from None
    if cfg.trainer.resume:
        raise ConfigError(f"trainer.resume={cfg.trainer.resume}: a resume continues a run in its own folder; "
                          f"run it with python -m runner trainer.resume=DIR")
    prepared = cli.prepare(cfg, cfg.hydra)  # the command line's own: typed config, validate, build
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
                              config=training.config_record())
    return train_run(training, Path(run_dir), replace(summary))
