"""The loop's events (runner.recording.events): a sink of a user's own, named in trainer.loggers by its import
path, hears the run's start, every step's rows as metrics.csv has them, and its end; bad entries are one line."""
import json

import pandas as pd
import pytest

from runner.config.schema import ConfigError, validate
from runner.recording import checkpoint, record
from runner.recording.events import Subscriber, Subscribers
from runner.recording.record import Summary
from runner.training.train import run
from tests.conftest import build, make_config, refusal, train
from tests.own_components import RowCollector

TINY = dict(data__train_size=64, data__eval_size=16, model__hidden=8)
COLLECTOR = "tests.own_components.RowCollector"


def heard(run_dir):
    return json.loads((run_dir / RowCollector.FILE).read_text())


def test_your_sink_hears_the_run_start_every_row_as_metrics_csv_has_it_and_the_end(tmp_path):
    summary, _, run_dir = train(tmp_path, trainer__steps=4, trainer__memory="every", trainer__loggers=["csv", COLLECTOR],
                                optim__scheduler="linear", **TINY)
    assert summary["status"] == "ok"
    got = heard(run_dir)
    assert got["steps"] == 4  # built with the run's config
    assert got["events"] == ["run_start", "rows", "rows", "rows", "rows", "run_end"]  # a flush per step on a CPU
    assert got["start"] == {"resumed": False, "start_step": 0}
    assert got["end"] == {"status": "ok", "failed": False, "steps_done": 4}
    metrics = pd.read_csv(run_dir / record.METRICS)
    rows = pd.DataFrame(got["rows"])
    assert set(rows.columns) == set(metrics.columns)  # lr and the memory meter's column included
    assert record.MEMORY_COLUMN in rows.columns and record.LR_COLUMN in rows.columns
    pd.testing.assert_frame_equal(rows[metrics.columns], metrics, check_exact=True)  # bit for bit, float for float


def test_a_failing_run_ends_your_sink_with_its_status(tmp_path, monkeypatch):
    training = build(trainer__steps=4, trainer__loggers=["csv", COLLECTOR], **TINY)
    real_step, calls = training.strategy.step, []

    def breaks_at_the_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the strategy broke")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training.strategy, "step", breaks_at_the_third_step)
    outcome = run(training, tmp_path / "error", Summary(config=training.config_record()))
    assert outcome.status == "error"
    got = heard(tmp_path / "error")
    assert got["end"] == {"status": "error", "failed": False, "steps_done": 2}  # a recorded failure: a result
    assert [row["step"] for row in got["rows"]] == [1, 2]

    from runner.training import train as loop

    def broken_finish(*args):
        raise OSError("disk full")

    training = build(trainer__steps=2, trainer__loggers=["csv", COLLECTOR], **TINY)
    monkeypatch.setattr(loop, "_finish", broken_finish)
    with pytest.raises(OSError, match="disk full"):
        run(training, tmp_path / "raised", Summary(config=training.config_record()))
    assert heard(tmp_path / "raised")["end"]["failed"] is True  # an exception past the loop still ends it


def test_a_resumed_run_is_heard_from_its_checkpoint_step_on(tmp_path):
    config = dict(trainer__checkpoint_every=3, trainer__loggers=["csv", COLLECTOR], **TINY)
    first = run(build(trainer__steps=4, **config), tmp_path / "run")
    assert first.status == "ok" and [row["step"] for row in heard(tmp_path / "run")["rows"]] == [1, 2, 3, 4]
    resumed = run(build(trainer__steps=6, **config), tmp_path / "run",
                  resume=checkpoint.load(tmp_path / "run"))
    assert resumed.status == "ok"
    got = heard(tmp_path / "run")
    assert got["start"] == {"resumed": True, "start_step": 3}
    assert [row["step"] for row in got["rows"]] == [4, 5, 6]  # rows go on after the checkpoint's step
    metrics = pd.read_csv(tmp_path / "run" / record.METRICS)
    assert metrics["step"].tolist() == [1, 2, 3, 4, 5, 6]  # metrics.csv cut back to step 3, then appended
    assert metrics["loss"].tolist()[3:] == [row["loss"] for row in got["rows"]]


class NeedsAPackage(Subscriber):
    requires = "no_such_package_for_backward_lab"


def test_bad_loggers_are_one_line_naming_trainer_loggers():
    assert refusal("trainer.loggers=[csv,nowhere.Sink]") == (
        "trainer.loggers=[csv,nowhere.Sink] is not allowed: nowhere.Sink cannot be imported (ModuleNotFoundError: "
        "No module named 'nowhere'), expected csv, tensorboard, mlflow or a sink class of your own as "
        "package.module.Class")
    assert refusal("trainer.loggers=[csv,tests.own_components.Nothing]").startswith(
        "trainer.loggers=[csv,tests.own_components.Nothing] is not allowed: tests.own_components.Nothing cannot be "
        "imported (AttributeError: ")
    assert refusal("trainer.loggers=[csv,tests.own_components.MarginLoss]") == (
        "trainer.loggers=[csv,tests.own_components.MarginLoss] is not allowed: tests.own_components.MarginLoss is "
        "not a sink class: expected a class with run_start, rows, run_end, close (a "
        "runner.recording.events.Subscriber has them all)")
    with pytest.raises(ConfigError, match=r"^trainer.loggers=\[tests.own_components.RowCollector\] is not allowed: "
                                          r"csv writes the record"):
        validate(make_config(trainer__loggers=[COLLECTOR]))
    with pytest.raises(ConfigError) as raised:
        validate(make_config(trainer__loggers=["csv", "tests.test_events.NeedsAPackage"]))
    assert str(raised.value) == ("trainer.loggers=[csv,tests.test_events.NeedsAPackage] needs the "
                                 "no_such_package_for_backward_lab package, which is not installed: "
                                 "pip install no_such_package_for_backward_lab")
    validate(make_config(trainer__loggers=["csv", COLLECTOR]))


def test_a_sink_that_cannot_start_is_bad_input_and_those_started_end_failed(tmp_path):
    class Store(Subscriber):
        def __init__(self):
            self.ended = None

        def run_end(self, summary, failed):
            self.ended = failed

    class Unreachable(Subscriber):
        def run_start(self, run):
            raise ConnectionError("no server at http://host:5000")

    started = Store()
    announcer = Subscribers([("trainer.loggers: store", started), ("trainer.loggers: remote", Unreachable())])
    from runner.recording.events import RunStart

    with pytest.raises(ConfigError, match=r"^trainer.loggers: remote cannot start a run: ConnectionError: no server"):
        announcer.run_start(RunStart(tmp_path, Summary()))
    assert started.ended is True
