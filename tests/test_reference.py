"""The key reference is generated from the keys' declarations, and what it says stays true."""
import shutil
from dataclasses import fields
from enum import Enum
from pathlib import Path

import pytest

from runner.components import losses
from runner.config import backward_options, reference, schema
from runner.config.keys import Choice, Role
from runner.config.location import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent


def test_docs_reference_and_the_readme_groups_table_are_up_to_date():
    assert reference.stale(ROOT, CONF_DIR) == [], "run: make reference"


def test_a_stale_reference_or_readme_table_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    (tmp_path / "docs" / "reference.md").write_text(reference.markdown(CONF_DIR).replace("hidden units", "units"))
    assert reference.stale(tmp_path, CONF_DIR) == ["docs/reference.md"]
    readme = (tmp_path / "README.md").read_text()
    (tmp_path / "README.md").write_text(readme.replace("| `model` |", "| `models` |", 1)
                                        .replace("[`model`]", "[`models`]", 1))
    assert reference.stale(tmp_path, CONF_DIR) == ["docs/reference.md", "README.md"]


def _composed_keys(overrides=()):
    """Every leaf key of the config `python -m runner OVERRIDES` composes (Hydra's own node aside)."""
    from omegaconf import OmegaConf

    from runner.config.compose import compose

    tree = OmegaConf.to_container(compose(list(overrides)), resolve=False)
    tree.pop("hydra")

    def leaves(node, prefix=""):
        for name, value in node.items():
            if isinstance(value, dict) and value:
                yield from leaves(value, f"{prefix}{name}.")
            else:
                yield prefix + name

    return list(leaves(tree))


def test_every_key_of_the_composed_config_is_in_the_reference():
    # Checked against what Hydra composes, not against the schema the page is generated from, so a
    # section the generator skips (trainer.* once was) shows here.
    # Each model, loss and data option adds the keys its class declares (loss=focal: loss.alpha, loss.gamma).
    from runner.config.components import options

    choices = [f"{group}={option}" for group in ("model", "loss", "data") for option in options(group)
               if option != "custom"]
    composed = list(dict.fromkeys(key for choice in choices for key in _composed_keys([choice])))
    assert len(composed) > 85 and any(key.startswith("trainer.") for key in composed)
    for page in ((ROOT / "docs" / "reference.md").read_text(), reference.markdown(CONF_DIR)):
        # A mapping's entries (loss.weights.cls) are documented by the mapping's key (loss.weights).
        assert [key for key in composed if not any(f"| `{key.rsplit('.', n)[0]}` |" in page for n in (0, 1))] == []


def test_every_key_and_every_choice_is_documented():
    docs = reference.keys(CONF_DIR)
    assert len(docs) > 80
    assert [doc.dotted for doc in docs if not doc.help] == []
    assert [f"{doc.dotted}={value}" for doc in docs for value, meaning in doc.values if not meaning] == []
    enums = [value for module in (schema, backward_options, losses) for value in vars(module).values()
             if isinstance(value, type) and issubclass(value, Enum) and value not in (Enum, Choice, Role)]
    assert len(enums) > 10 and [enum for enum in enums if not issubclass(enum, Choice)] == []
    options = [(group.name, option) for group in reference.groups(CONF_DIR) for option in group.options]
    assert [f"{group}={option.name}" for group, option in options if not option.about] == []


def test_a_key_shows_its_default_range_values_and_the_options_that_set_it():
    docs = {doc.dotted: doc for doc in reference.keys(CONF_DIR)}
    accumulation = docs["backward.accumulation"]
    assert (accumulation.default, accumulation.allowed) == ("1", "an integer >= 1")
    assert accumulation.readers == ["sum", "accumulate", "gradcache"]
    assert accumulation.set_by == {"backward=accumulate": "4", "backward=gradcache": "4", "backward=sum": "4"}
    assert [value for value, _ in docs["loss.normalize"].values] == ["tokens", "micro_batch", "sequence", "double"]
    assert docs["optim.lr"].set_by["optim=adamw"] == "0.001"
    assert docs["trainer.dtype"].set_by["precision=pure_bf16"] == "bfloat16"
    assert "A resume may change it" in docs["trainer.steps"].meaning()


@pytest.mark.parametrize("dotted,value", [("model.outputs", 0), ("optim.lr", 0.0), ("data.eval_size", -1),
                                          ("backward.accumulation", 0)])
def test_a_declared_range_is_what_validate_enforces(dotted, value):
    config = schema.Config()
    group, leaf = dotted.split(".")
    setattr(getattr(config, group), leaf, value)
    allowed = next(f.metadata["allowed"] for f in fields(getattr(config, group)) if f.name == leaf)
    with pytest.raises(schema.ConfigError, match=f"{dotted}={value} is not allowed: expected "):
        schema.validate(config)
    assert allowed.text in reference.text(CONF_DIR)
