"""A component of your own is one class and one YAML: a loss and a model from outside the package
(tests/own_components.py), each named by `_target_` in a config directory of the test's own
(tests/own_conf), appear in --help and the reference, validate, train and are recorded."""
import pytest

from runner import api
from runner.config import reference
from runner.config.location import CONF_DIR
from runner.config.schema import ConfigError
from tests.conftest import ROOT, run_cli

OWN_CONF = ROOT / "tests" / "own_conf"
SEARCH = f"hydra.searchpath=[file://{OWN_CONF}]"
SMALL = ["trainer.steps=3", "data.train_size=64", "data.eval_size=16", "trainer.progress=false"]


def test_your_loss_and_model_train_from_one_class_and_one_yaml_each(tmp_path):
    training = api.compose(["loss=margin", "model=wide", SEARCH, *SMALL])
    assert type(training.loss_fn).__name__ == "MarginLoss" and training.loss_fn.margin == 0.5  # the YAML's
    assert training.model.net[1].out_features == 24
    outcome = api.run(training, tmp_path / "own")
    assert outcome.status == "ok", outcome.summary.error
    assert outcome.summary.choices["loss"] == "margin" and outcome.summary.choices["model"] == "wide"
    record = training.config_record()  # what resume and comparison read
    assert record["loss_kwargs"] == {"margin": 0.5} and record["model_kwargs"] == {"width": 24}


def test_a_declared_key_is_set_like_any_other_and_its_default_is_recorded():
    training = api.compose(["loss=margin", "model=wide", SEARCH, "loss.margin=2", *SMALL])
    assert training.loss_fn.margin == 2.0
    # loss=custom names the same class without its YAML: the declared default is recorded all the same.
    custom = api.compose(["loss=custom", "loss._target_=tests.own_components.MarginLoss", *SMALL])
    assert custom.loss_fn.margin == 1.0 and custom.config_record()["loss_kwargs"] == {"margin": 1.0}


@pytest.mark.parametrize("override, line", [
    ("loss.margin=-1", "loss.margin=-1.0 is not allowed: expected > 0"),
    ("model.width=wide", "model.width='wide' is not allowed: expected an integer"),
    ("model.width=0", "model.width=0 is not allowed: expected an integer >= 1"),
])
def test_a_declared_key_is_checked_before_training_in_one_line(override, line):
    with pytest.raises(ConfigError) as caught:
        api.compose(["loss=margin", "model=wide", SEARCH, override, *SMALL])
    assert str(caught.value) == line


def test_a_key_that_a_built_in_component_does_not_declare_is_refused_not_ignored():
    with pytest.raises(ConfigError, match=r"^loss.gama is not a key of loss=focal: expected one of loss.alpha, "
                                          r"loss.gamma \(python -m runner --help lists every option's keys\)$"):
        api.compose(["loss=focal", "loss.gama=3", *SMALL])
    with pytest.raises(ConfigError, match=r"^model.hiden is not a key of model=mlp"):
        api.compose(["+model.hiden=3", *SMALL])


def test_the_reference_lists_your_options_and_their_declared_keys():
    text = reference.text([CONF_DIR, OWN_CONF])
    assert "  loss.margin = 1.0    allowed: > 0" in text
    assert "Declared by loss=margin (tests.own_components.MarginLoss)" in " ".join(text.split())
    assert "model.width = 16" in text and "set by model=wide: 24" in text
    page = reference.markdown([CONF_DIR, OWN_CONF])
    assert "| `margin` | A hinge loss of a user's own" in page and "| `loss.margin` | `1.0` | > 0 |" in page
    assert "loss.margin" not in reference.text(CONF_DIR)  # conf/ alone: the package's own reference


def test_help_lists_the_options_of_your_config_directory(tmp_path):
    result = run_cli(SEARCH, "--help", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "loss: bce, ce, custom, dpo, focal, grpo, infonce, lm, margin, multitask" in result.stdout
    assert "loss.margin = 1.0" in result.stdout and "model.width = 16" in result.stdout
