"""Optimizers from `_target_` YAML (optim=adamw, optim._target_=torch.optim.X, +optim.KEY=VALUE),
and the Config built in Python, whose optim.name picks the class."""
from __future__ import annotations

import pytest
import torch

from runner import api
from runner.components.optim import build_optimizers
from runner.config.schema import ConfigError, OptimConf
from runner.training.build import build_training
from tests.conftest import build, read_summary, refusal, resume_refusal, run_cli

SMALL = ["data.train_size=256", "data.eval_size=32", "model.hidden=8"]


def composed(*overrides):
    """The training the command line builds for these overrides (the group's YAML applied)."""
    from hydra import compose, initialize_config_dir

    from runner.config.compose import config_from_omegaconf
    from runner.config.location import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["trainer.progress=false", *SMALL, *overrides])
    config, extras = config_from_omegaconf(cfg)
    return build_training(config, extras["loss"], model_kwargs=extras["model"], optim_kwargs=extras["optim"])


def test_optim_adamw_trains_from_the_command_line(tmp_path):
    result = run_cli("optim=adamw", "trainer.steps=3", *SMALL, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "ok" and summary["choices"]["optim"] == "adamw"
    assert summary["config"]["optim"]["_target_"] == "torch.optim.AdamW"
    [optimizer] = composed("optim=adamw").optimizers
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["lr"] == 0.001 and optimizer.param_groups[0]["weight_decay"] == 0.01


def test_another_target_from_the_command_line_takes_only_the_keys_it_accepts(tmp_path):
    """optim=sgd's momentum and the schema's betas stay behind; +optim.alpha is RMSprop's own. The run
    in-process, through the command line's own compose and build (runner.api; optim=adamw above goes
    through the command line itself)."""
    overrides = ["optim._target_=torch.optim.RMSprop", "optim.lr=0.01", "+optim.alpha=0.9"]
    trained = api.run(api.compose([*overrides, "trainer.steps=3", *SMALL, "trainer.progress=false"]), tmp_path / "run")
    assert trained.status == "ok"
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "ok" and summary["config"]["optim"]["alpha"] == 0.9
    [optimizer] = composed(*overrides).optimizers
    assert type(optimizer) is torch.optim.RMSprop
    group = optimizer.param_groups[0]
    assert (group["lr"], group["alpha"], group["momentum"]) == (0.01, 0.9, 0.0) and "betas" not in group


@pytest.mark.parametrize("override,needle", [
    ("optim._target_=torch.optim.Nope", "optim._target_=torch.optim.Nope: cannot import it"),
    ("+optim.bogus=1", "optim._target_=torch.optim.SGD: cannot build it"),
])
def test_an_optimizer_that_cannot_be_built_is_one_line_naming_its_target(override, needle):
    """One line, before anything is written (the command line prints it, exits 2 and leaves no folder:
    tests/test_cli.py::test_bad_input_on_the_command_line_is_exit_2_one_line_and_writes_nothing)."""
    assert needle in refusal(override, "trainer.steps=3", *SMALL)


def test_a_resume_keeps_the_optimizers_own_arguments(tmp_path):
    """The first run and the refused resume in-process (runner.api; the command line's own
    preparation), the resume itself from the command line."""
    run = ["optim=rmsprop", "+optim.alpha=0.9", "trainer.checkpoint_every=2", *SMALL]
    assert api.run(api.compose([*run, "trainer.steps=4", "trainer.progress=false"]), tmp_path / "run").status == "ok"
    refused = resume_refusal(*[o.replace("0.9", "0.5") for o in run], "trainer.steps=6",
                             f"trainer.resume={tmp_path / 'run'}")
    assert "optim.alpha=0.9, this command optim.alpha=0.5" in refused
    resumed = run_cli(*run, "trainer.steps=6", f"trainer.resume={tmp_path / 'run'}")
    assert resumed.returncode == 0, resumed.stderr
    assert read_summary(tmp_path / "run")["steps_done"] == 6


def test_a_python_config_picks_the_optimizer_by_name():
    """Config() without Hydra has no _target_: optim.name picks the class, betas as a tuple."""
    training = build(optim__name="adam", optim__lr=0.001, optim__betas=[0.5, 0.999],
                                          data__train_size=256, data__eval_size=32, model__hidden=8)
    [optimizer] = training.optimizers
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["betas"] == (0.5, 0.999) and optimizer.param_groups[0]["lr"] == 0.001
    [sgd] = build_optimizers(OptimConf(), [[torch.nn.Parameter(torch.zeros(2))]])
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["lr"] == 0.5


def test_an_optimizer_whose_step_needs_a_closure_is_refused_before_training_in_one_line():
    assert refusal("optim._target_=torch.optim.LBFGS") == (
        "optim._target_=torch.optim.LBFGS is not allowed: its step(closure) evaluates the loss itself, and a "
        "strategy calls step() once after its own backward passes: expected an optimizer whose step takes no "
        "closure (torch.optim.SGD, Adam, AdamW, RMSprop)")
    params = [[torch.nn.Parameter(torch.zeros(2))]]
    for target in ("torch.optim.SGD", "torch.optim.Adam", "torch.optim.RMSprop"):  # step(closure=None) trains
        build_optimizers(OptimConf(_target_=target), params)


def test_a_target_wins_over_the_name_and_an_unknown_name_is_refused():
    params = [[torch.nn.Parameter(torch.zeros(2))]]
    [adam] = build_optimizers(OptimConf(name="sgd", _target_="torch.optim.Adam", momentum=0.9), params)
    assert type(adam) is torch.optim.Adam
    with pytest.raises(ConfigError, match=r"optim=nope is unknown: expected one of \['adam', 'adamw'"):
        build_optimizers(OptimConf(name="nope"), params)
    with pytest.raises(ConfigError, match=r"optim._target_=torch.nn.Linear built|optim._target_=torch.nn.Linear: "):
        build_optimizers(OptimConf(_target_="torch.nn.Linear"), params)
