"""The engine owns the update path: an engine of the user's own that owns its optimizer step trains
backward=accumulate (and full) with no strategy edited, and ends where torch's SGD ends."""
import pytest

from runner.training.build import build_training
from runner.training.train import run
from tests.conftest import make_config, max_abs_diff, train

OWN = "tests.custom_engines.OwnsItsStep"
SMALL = dict(trainer__steps=4, data__train_size=64, data__eval_size=16, data__batch_size=30)


@pytest.mark.parametrize("strategy", ["accumulate", "full"])
def test_an_engine_that_owns_its_step_trains_a_strategy_unchanged(tmp_path, strategy):
    overrides = dict(SMALL, backward__name=strategy, backward__accumulation=4)
    training = build_training(make_config(**overrides, trainer__parallel=OWN))
    stepped = []
    training.optimizers[0].register_step_pre_hook(lambda *args: stepped.append(1))
    outcome = run(training, tmp_path / "own")
    assert outcome.status == "ok", outcome.summary.error
    assert outcome.summary.parallel == "owns_its_step" and training.engine.steps == 4
    assert stepped == []  # torch's optimizer never stepped: the engine did, every time
    own = {n: p.detach().clone() for n, p in training.model.named_parameters()}
    summary, plain, _ = train(tmp_path, **overrides)  # torch's SGD, lr 0.1, no momentum: the same update
    assert summary["status"] == "ok" and max_abs_diff(own, plain) == 0.0


def test_an_engine_that_does_not_import_is_one_line(tmp_path):
    from runner.config.schema import ConfigError

    with pytest.raises(ConfigError, match=r"trainer.parallel=tests.nope.Engine cannot be imported"):
        build_training(make_config(**SMALL, trainer__parallel="tests.nope.Engine"))
    with pytest.raises(ConfigError, match=r"trainer.parallel=zero is unknown: expected one of \['ddp', 'fsdp'\]"):
        build_training(make_config(**SMALL, trainer__parallel="zero"))
    with pytest.raises(ConfigError, match=r"trainer.parallel=torch.nn.Linear is not an engine"):
        build_training(make_config(**SMALL, trainer__parallel="torch.nn.Linear"))


def test_the_engine_owns_the_checkpointed_optimizer_state(tmp_path):
    from runner.recording import checkpoint

    training = build_training(make_config(**SMALL, backward__name="accumulate", backward__accumulation=2,
                                          trainer__parallel=OWN, trainer__checkpoint_every=2))
    assert run(training, tmp_path / "own").status == "ok"
    state = checkpoint.load(tmp_path / "own")
    assert state["optimizers"] == [{"own_steps": 2}]
    again = build_training(make_config(**SMALL, backward__name="accumulate", backward__accumulation=2,
                                       trainer__parallel=OWN))
    checkpoint.restore(state, again)
    assert again.engine.steps == 2  # restored into the engine, which owns it
