"""runner.api: compose what the command line would train, run it, record it as the command line does."""
from __future__ import annotations

import pytest
from hydra.core.global_hydra import GlobalHydra

from runner import api
from runner.components.models import CausalLM
from runner.config.schema import ConfigError
from tests.conftest import read_summary, run_here

SEQ = ["model=seq", "data=seq", "loss=lm", "trainer.steps=3"]


def test_compose_applies_the_groups_yaml_and_runs_like_the_command_line(tmp_path):
    training = api.compose([*SEQ, "trainer.progress=false"])
    assert isinstance(training.model, CausalLM)  # model=seq's YAML: hidden 32, depth 1
    assert (training.model_kwargs["hidden"], training.model_kwargs["depth"]) == (32, 1)
    outcome = api.run(training, tmp_path / "api")
    assert outcome.status == "ok", outcome.summary.error

    result = run_here(*SEQ, f"hydra.run.dir={tmp_path / 'cli'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    mine, theirs = read_summary(tmp_path / "api"), read_summary(tmp_path / "cli")
    assert mine["param_sha256"] == theirs["param_sha256"]
    assert mine["choices"] == theirs["choices"]
    assert mine["overrides"] == [*SEQ, "trainer.progress=false"]
    assert mine["config"] == {**theirs["config"], "trainer": {**theirs["config"]["trainer"], "progress": False}}


def test_compose_twice_in_a_row_and_inside_an_initialised_hydra(tmp_path):
    first = api.compose(["trainer.steps=2", "backward=accumulate", "backward.accumulation=2"])
    second = api.compose(["trainer.steps=2"])
    assert (first.strategy.name, second.strategy.name) == ("accumulate", "full")
    assert second.origin.choices["backward"] == "full" and second.origin.overrides == ["trainer.steps=2"]
    assert not GlobalHydra.instance().is_initialized()  # left as it was found
    import hydra

    with hydra.initialize_config_dir(version_base="1.3", config_dir=str(tmp_path)):  # a caller's own Hydra
        outer = GlobalHydra.instance().hydra
        assert api.compose(["trainer.steps=2"]).config.trainer.steps == 2
        assert GlobalHydra.instance().hydra is outer


def test_an_unknown_option_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as caught:
        api.compose(["model=nope"])
    message = str(caught.value)
    assert "\n" not in message and "model/nope" in message


def test_a_value_out_of_range_names_its_key():
    with pytest.raises(ConfigError, match="trainer.steps") as caught:
        api.compose(["trainer.steps=0"])
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="could not be converted to Integer"):
        api.compose(["trainer.steps=abc"])


def test_a_config_built_in_python_names_where_a_class_argument_goes():
    """The model's, loss's and data source's own arguments are not keys of the Config's nodes: setting one there
    is an error that says where it goes, not a silent no-op."""
    from runner.config.schema import Config

    config = Config()
    for group, key in (("model", "hidden"), ("loss", "gamma"), ("data", "max_length")):
        with pytest.raises(AttributeError, match=rf"{group}\.{key} is not one of the {group} group's own keys: a "
                                                 rf"class's argument goes to build_training\({group}_kwargs="):
            setattr(getattr(config, group), key, 3)
