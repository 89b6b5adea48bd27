"""Shared helpers: build a typed Config from dotted overrides and run it in-process."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch

# One torch thread per test process, and for the runs it starts: two test workers at torch's
# default threads on 2 cores spin-wait on each other (a step runs 3x slower, much worse under load).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

from runner.config.schema import GROUPS, Config, DataConf, LossConf, ModelConf
from runner.recording.record import Summary
from runner.training.build import build_training
from runner.training.train import run

ROOT = Path(__file__).resolve().parent.parent
_counter = itertools.count()


# Seconds the slow tests take with two test processes on 2 cores (measured 2026-12-04 on a quiet machine;
# a name ending in a parameter's "[" or a test's own prefix covers every test it starts). The suite
# runs them longest first and hands them out one at a time (pytest-xdist's --maxschedchunk=1), so that
# the two test processes finish together instead of one waiting on the other's last long sweep. A new
# test that takes more than a few seconds belongs here; the others count as quick and run last.
SLOW_SECONDS = {
    "tests/test_experiments.py::test_claims_hold[fsdp]": 56,
    "tests/test_experiments.py::test_claims_hold[sequence_parallel]": 40,
    "tests/test_post_training.py::test_sequence_parallel_on_four_gloo_ranks": 10,
    "tests/test_post_training.py::test_every_aggregation_on_two_ranks": 7,
    "tests/test_experiments.py::test_claims_hold[packing]": 6,
    "tests/test_experiments.py::test_claims_hold[grpo]": 17,
    "tests/test_experiments.py::test_claims_hold[dpo]": 8,
    "tests/test_experiments.py::test_claims_hold[terms]": 9,
    "tests/test_fingerprint.py::test_the_self_test_names_every_mode_back_and_tells_each_pair_apart": 14,
    "tests/test_fingerprint.py::test_deepspeed_is_fingerprinted_as_measured[": 12,  # skipped without deepspeed
    "tests/test_fingerprint.py::test_the_command_line_writes_the_fingerprint_and_its_picture": 7,
    "tests/test_fingerprint.py::test_each_framework_is_fingerprinted_as_measured[": 5,
    "tests/test_experiments.py::test_claims_hold[precision]": 25,
    "tests/test_experiments.py::test_claims_hold[ranks_tokens]": 23,
    "tests/test_trackers.py::test_a_sweep_is_a_parent_run": 14,
    "tests/test_experiments.py::test_claims_hold[factors]": 13,
    "tests/test_processes.py::test_two_processes_a_lost_rank": 12,
    "tests/test_resilience.py::test_resume_after_sigkill": 12,
    "tests/test_sweeps.py::test_parallel_launchers": 12,  # the first one with the basic launcher's sweep
    "tests/test_experiments.py::test_claims_hold[focal]": 11,
    "tests/test_bench.py::test_quick_bench": 8,
    "tests/test_experiments.py::test_glob_over_experiments": 7,
    "tests/test_experiments.py::test_claims_hold[schedule]": 7,
    "tests/test_processes.py::test_two_processes": 7,  # the others: 5 to 9 s
    "tests/test_install.py::test_a_wheel_install": 7,
    "tests/test_resilience.py::test_a_run_directory_is_never_overwritten": 6,
    "tests/test_replicates.py::test_impact_says": 6,
    "tests/test_trackers.py::test_a_run_in_mlflow_and_tensorboard": 6,
    "tests/test_sweeps.py::test_a_failing_job": 6,
    "tests/test_coupling.py::test_the_audit_runs_on_the_worked_example": 5,
    "tests/test_experiments.py::test_claims_hold[partial_window]": 5,
    "tests/test_experiments.py::test_claims_hold[memory]": 5,
    "tests/test_experiments.py::test_claims_hold[moe]": 5,
    "tests/test_checkpoint.py::test_resume_with_the_runs_own_overrides": 5,
    "tests/test_checkpoint.py::test_resume_refuses_an_override": 5,
    "tests/test_experiments.py::test_claims_hold[tokens]": 4,
    "tests/test_experiments.py::test_claims_hold[": 4,  # the others: 2 to 5 s (in this process)
    "tests/test_sequences.py::test_token_normalisation_is_exact": 4,
    "tests/test_resilience.py::test_interrupt_stops_a_sweep": 4,
    "tests/test_resilience.py::test_divergence_in_a_sweep": 4,
    "tests/test_trackers.py::test_a_failing_run_ends": 4,
    "tests/test_replicates.py::test_a_sweep_over_seeds": 3,
    "tests/test_experiments.py::test_a_false_claim": 3,
    "tests/test_resilience.py::test_interrupt_stops_after_the_step": 3,
    "tests/test_optim.py::test_optim_adamw_trains_from_the_command_line": 3,
    "tests/test_optim.py::test_a_resume_keeps": 3,
    "tests/test_hf_data.py::test_a_bad_cell_warns": 3,
    "tests/test_custom_loss.py::test_soft_f1": 3,
    "tests/test_coupling.py::test_a_single_run_says_so": 3,
    "tests/test_cli.py::test_default_run_from_another_directory": 3,
    "tests/test_cli.py::test_custom_loss_arguments": 3,
    "tests/test_api.py::test_compose_applies_the_groups_yaml": 3,
    "tests/test_multitask.py::test_step_per_task_single_run": 3,
    "tests/test_gradflow.py::test_the_cli_prints": 3,
    "tests/test_cli.py::test_": 3,  # its other command lines: 2 to 3 s
    "tests/test_checkpoint.py::test_": 3,
    "tests/test_resilience.py::test_": 3,
    "tests/test_replicates.py::test_the_picture_of_many_runs": 3,
    "tests/test_hf_data.py::test_a_hugging_face_causal_lm": 3,
    "tests/test_sweeps.py::test_each_distinct_training_runs_once": 2,
    "tests/test_sweeps.py::test_compare_lines_up_two_sweeps": 2,
    "tests/test_sweeps.py::test_a_sweep_across_losses": 3,
    "tests/test_house.py::test_": 2,
    "tests/test_gpu_check.py::test_": 2,
    "tests/test_components.py::test_help_lists": 2,
}


def expected_seconds(nodeid: str) -> float:
    """SLOW_SECONDS' figure for a test: its longest matching name, 0 for a quick test."""
    matches = [name for name in SLOW_SECONDS if nodeid.startswith(name)]
    return SLOW_SECONDS[max(matches, key=len)] if matches else 0


def pytest_configure(config):
    # One test at a time to each test process (where the user did not choose): xdist's default sends
    # runs of consecutive tests, which after the longest-first sort would give one process every long one.
    if getattr(config.option, "maxschedchunk", "absent") is None:
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(config, items):
    """Longest first (SLOW_SECONDS), the rest in their usual order: with two test processes the
    long tests start at once and the quick ones fill the gaps at the end."""
    position = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (-expected_seconds(item.nodeid), position[id(item)]))


def make_config(**overrides) -> Config:
    """Config() with dotted keys given as double underscores: trainer__steps=5. The arguments of the loss
    and model classes (loss__gamma, model__hidden: keys they declare beside themselves) are build()'s."""
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


# The groups' own keys; the others (loss__gamma, model__hidden) are the arguments of the group's class.
OWN_KEYS = {"loss": {f.name for f in fields(LossConf)}, "model": {f.name for f in fields(ModelConf)},
            "data": {f.name for f in fields(DataConf)}}


def split_arguments(overrides: dict):
    """(the Config's overrides, the loss class's arguments, the model class's, the data source's):
    loss__gamma=1 is focal's, model__hidden=16 the model's, data__max_length=12 the source's, not the Config's."""
    config, arguments = {}, {"loss": {}, "model": {}, "data": {}}
    for dotted, value in overrides.items():
        group, _, leaf = dotted.partition("__")
        if group in OWN_KEYS and leaf not in OWN_KEYS[group]:
            arguments[group][leaf] = value
        else:
            config[dotted] = value
    return config, arguments["loss"], arguments["model"], arguments["data"]


def build(overrides=None, *, loss_kwargs=None, model_kwargs=None, **more):
    """build_training from dotted overrides (a dict, or keywords), the classes' arguments among them
    (loss__gamma=1, model__hidden=16, data__path=FILE), and a class of your own's (loss_kwargs, model_kwargs)."""
    config, loss, model, data = split_arguments({**(overrides or {}), **more})
    return build_training(make_config(**config), {**loss, **(loss_kwargs or {})},
                          model_kwargs={**model, **(model_kwargs or {})}, data_kwargs=data)


def train(tmp_path: Path, loss_kwargs=None, **overrides):
    """Run in-process; returns (summary, final parameters by name, run_dir)."""
    run_dir = tmp_path / f"run{next(_counter)}"
    run_dir.mkdir(parents=True)
    training = build(overrides, loss_kwargs=loss_kwargs)
    # The config and choices as the command line records them, so runner.analysis.runs can compare the runs.
    choices = {group: getattr(training.config, group).name for group in GROUPS}
    outcome = run(training, run_dir, Summary(choices=choices, config=training.recorded_config()))
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


def run_here(*args, cwd):
    """`python -m runner ARGS` through the command line's own entry point (runner.cli.entry) in this
    test process: the same Hydra composition, callbacks, sweep, records, printed lines and exit code,
    without a new interpreter (starting one with torch and Hydra costs about 3 s). For tests whose
    subject is what a command computes; signals, launchers, a user's shell and the interpreter's own
    start stay with run_cli."""
    import contextlib
    import io
    import logging

    from hydra.core.global_hydra import GlobalHydra

    from runner import cli

    out, err = io.StringIO(), io.StringIO()
    argv, here, root = sys.argv, os.getcwd(), logging.getLogger()
    handlers, level, threads = list(root.handlers), root.level, torch.get_num_threads()
    GlobalHydra.instance().clear()
    sys.argv = ["runner", *map(str, args)]
    os.chdir(cwd)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.entry()
            except SystemExit as exc:
                code = exc.code
    finally:
        sys.argv = argv
        os.chdir(here)
        GlobalHydra.instance().clear()
        for handler in root.handlers:  # Hydra's job logging: a console handler on the captured stream, a file
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
        torch.set_num_threads(threads)  # trainer.threads sets this process's
    return subprocess.CompletedProcess(["runner", *args], code, out.getvalue(), err.getvalue())


def read_summary(run_dir) -> dict:
    """summary.json as a user reads it."""
    return json.loads((Path(run_dir) / "summary.json").read_text())
