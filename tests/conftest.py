"""Shared helpers: build a typed Config from dotted overrides and run it in-process."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

# One torch thread per test process, and for the runs it starts: two test workers at torch's
# default threads on 2 cores spin-wait on each other (a step runs 3x slower, much worse under load).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

from runner.config.schema import GROUPS, Config
from runner.recording.record import Summary
from runner.training.build import build_training
from runner.training.train import run

ROOT = Path(__file__).resolve().parent.parent
_counter = itertools.count()


def make_config(**overrides) -> Config:
    """Config() with dotted keys given as double underscores: trainer__steps=5."""
    cfg = Config()
    cfg.trainer.progress = False
    for dotted, value in overrides.items():
        *path, leaf = dotted.split("__")
        node = cfg
        for name in path:
            node = getattr(node, name)
        if not hasattr(node, leaf):
            raise AttributeError(f"no config key {dotted}")
        setattr(node, leaf, value)
    return cfg


def train(tmp_path: Path, loss_kwargs=None, **overrides):
    """Run in-process; returns (summary, final parameters by name, run_dir)."""
    run_dir = tmp_path / f"run{next(_counter)}"
    run_dir.mkdir(parents=True)
    training = build_training(make_config(**overrides), loss_kwargs)
    # The config and choices as the command line records them, so runner.analysis.runs can compare the runs.
    choices = {group: getattr(training.config, group).name for group in GROUPS}
    outcome = run(training, run_dir, Summary(choices=choices, config=training.config_record()))
    params = {n: p.detach().clone() for n, p in training.model.named_parameters()}
    return asdict(outcome.summary), params, run_dir


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def assert_params_close(a: dict, b: dict, **tol) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


def refusal(*overrides) -> str:
    """The one-line ConfigError `python -m runner OVERRIDES` prints after "error: " (and exits 2 for),
    found in-process through runner.api.compose: the command line's own compose, validate and
    build, without a subprocess (test_cli checks that a ConfigError becomes that line and exit 2)."""
    from runner import api
    from runner.config.schema import ConfigError

    with pytest.raises(ConfigError) as caught:
        api.compose(list(overrides))
    message = str(caught.value)
    assert "\n" not in message
    return message


def resume_refusal(*overrides) -> str:
    """The one-line ConfigError `python -m runner OVERRIDES` prints after "error: " (and exits 2 for)
    when OVERRIDES resume a run (trainer.resume=DIR) in a way the run refuses, found in-process
    through the command line's own compose and preparation (runner.jobs.prepare), which reads the
    run's checkpoint and summary and writes nothing."""
    from runner import jobs
    from runner.config.compose import compose
    from runner.config.schema import ConfigError

    composed = compose(list(overrides))
    with pytest.raises(ConfigError) as caught:
        jobs.prepare(composed, composed.hydra, build=False)
    message = str(caught.value)
    assert "\n" not in message
    return message


def run_cli(*args, cwd=None, timeout=120, env_extra=None):
    """`python -m runner ARGS` in a subprocess, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_summary(run_dir) -> dict:
    """summary.json as a user reads it."""
    return json.loads((Path(run_dir) / "summary.json").read_text())
