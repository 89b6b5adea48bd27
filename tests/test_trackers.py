"""trainer.loggers=[csv,mlflow,tensorboard]: runs read back with each tool's own reader (MlflowClient,
TensorBoard's EventAccumulator): params, a metric's steps, the verdict tag, the sweep's parent run."""
import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from runner.config.schema import ConfigError, validate
from runner.recording import record
from runner.recording.record import Summary
from tests.conftest import build, make_config, read_summary, refusal, run_cli

# Skipped without the trackers extra; found, not imported, at collection (mlflow alone takes 2 s to import).
pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(name) is None for name in ("mlflow", "tensorboard")),
                                reason="the trackers extra (mlflow, tensorboard) is not installed")

TINY = ["trainer.steps=3", "data.train_size=64", "data.eval_size=16", "model.hidden=8"]
LOGGERS = "trainer.loggers=[csv,mlflow,tensorboard]"


@pytest.fixture(scope="session")
def outputs(tmp_path_factory):
    """One outputs folder for the session: its runs and sweeps share the default store (mlflow.db), created once."""
    return tmp_path_factory.mktemp("outputs")


def client_for(folder: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / record.MLFLOW_STORE}")
    return client, client.get_experiment_by_name("backward-lab").experiment_id


def mlflow_run(folder: Path, run_dir: Path):
    client, experiment = client_for(folder)
    found = client.search_runs([experiment], filter_string=f"tags.`backward_lab.run_dir` = '{Path(run_dir).resolve()}'")
    assert len(found) == 1, found
    return client, found[0]


def scalars(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / record.TENSORBOARD_DIR))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def session_hparams(run_dir: Path):
    """The hparams TensorBoard's HParams plugin reads from the run's events (its session start)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run_dir / record.TENSORBOARD_DIR))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
            for key, value in start.hparams.items()}


def test_a_run_in_mlflow_and_tensorboard(outputs):
    run_dir = outputs / "run"
    result = run_cli(*TINY, "optim.lr=0.25", LOGGERS, f"hydra.run.dir={run_dir}", cwd=outputs)
    assert result.returncode == 0, result.stderr
    summary, metrics = read_summary(run_dir), pd.read_csv(run_dir / record.METRICS)
    assert (outputs / record.MLFLOW_STORE).exists()  # the default store: above the run's folder

    client, run = mlflow_run(outputs, run_dir)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["optim.lr"] == "0.25" and run.data.params["backward.name"] == "full"
    assert run.data.params["trainer.steps"] == "3"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(metrics["loss"].tolist(), rel=1e-6)
    assert run.data.tags["status"] == "ok" and run.data.tags["param_sha256"] == summary["param_sha256"]
    assert run.data.metrics["final_loss"] == pytest.approx(summary["final_loss"], rel=1e-12)
    assert run.data.metrics["eval_value"] == pytest.approx(summary["eval_value"], rel=1e-12)
    assert "mlflow.parentRunId" not in run.data.tags  # a single run has no sweep

    board = scalars(run_dir)
    assert [step for step, _ in board["loss"]] == [1, 2, 3]
    assert [value for _, value in board["loss"]] == pytest.approx(metrics["loss"].tolist(), rel=1e-6)
    assert board["final/final_loss"][-1][1] == pytest.approx(summary["final_loss"], rel=1e-6)
    hparams = session_hparams(run_dir)  # what TensorBoard's HParams table shows for the run
    assert hparams["optim.lr"] == 0.25 and hparams["backward.name"] == "full" and hparams["status"] == "ok"


def test_a_sweep_is_a_parent_run_with_its_jobs_nested(outputs):
    sweep_dir = outputs / "sweep"
    # backward=detach does not fit model=mlp: that job fails (bad input, recorded) and its run says so;
    # log_every=2 changes no result: those jobs reuse their twins' records, and are runs of the sweep too
    result = run_cli("-m", "backward=full,sum,detach", "trainer.log_every=1,2", "backward.accumulation=2", *TINY,
                     LOGGERS, f"hydra.sweep.dir={sweep_dir}", cwd=outputs)
    assert result.returncode == 1 and "job failed" in result.stderr and "Traceback" not in result.stderr
    table = pd.read_csv(sweep_dir / record.COMPARISON)
    assert table["verdict"].tolist() == ["reference", "identical", "equivalent", "equivalent", "error", "error"]
    assert table["reused_from"].notna().tolist() == [False, True, False, True, False, False]

    client, experiment = client_for(outputs)
    parents = client.search_runs([experiment], filter_string=f"tags.`backward_lab.sweep_dir` = '{sweep_dir.resolve()}'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FAILED" and parent.data.tags["exit_code"] == "1"  # the sweep's exit code
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {record.COMPARISON, record.LOSS_CURVES} <= artifacts
    for row in table.itertuples():
        _, job = mlflow_run(outputs, Path(row.run_dir))
        assert job.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert job.data.tags["verdict"] == row.verdict
        assert job.data.params["backward.name"] == row.backward
        assert job.info.status == ("FINISHED" if row.status == "ok" else "FAILED")
        if row.status == "ok":
            assert [m.step for m in client.get_metric_history(job.info.run_id, "loss")] == [1, 2, 3]
            assert job.data.metrics["max_abs_diff"] == pytest.approx(row.max_abs_diff, abs=1e-12)
            assert scalars(Path(row.run_dir))["verdict/verdict_matches"] == [(0, 1.0)]
        else:
            assert "does not fit model=mlp" in job.data.tags["error"]


def test_a_failing_run_ends_its_mlflow_run_failed(outputs, monkeypatch):
    from runner.training import train

    def run_with(patch, name):
        training = build(trainer__steps=3, data__train_size=64, data__eval_size=16, model__hidden=8,
                         trainer__loggers=["csv", "mlflow"],
                         trainer__mlflow_uri=f"sqlite:///{outputs / record.MLFLOW_STORE}")
        patch(training)
        run_dir = outputs / "in_process" / name
        return training, run_dir, lambda: train.run(training, run_dir, Summary(config=training.config_record()))

    def broken_step(*args, **kwargs):
        raise RuntimeError("the strategy broke")

    training, run_dir, go = run_with(lambda t: monkeypatch.setattr(t.strategy, "step", broken_step), "error")
    assert go().status == "error"  # the run's failure is a result: its MLflow run says so
    _, run = mlflow_run(outputs, run_dir)
    assert run.info.status == "FAILED" and run.data.tags["status"] == "error"
    assert "the strategy broke" in run.data.tags["error"]

    def broken_finish(*args):
        raise OSError("disk full")

    _, run_dir, go = run_with(lambda t: monkeypatch.setattr(train, "_finish", broken_finish), "raised")
    with pytest.raises(OSError, match="disk full"):
        go()
    client, run = mlflow_run(outputs, run_dir)
    assert run.info.status == "FAILED"  # an exception past the loop still ends the MLflow run
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]


def test_a_logger_without_its_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError) as raised:
        validate(make_config(trainer__loggers=["csv", "tensorboard", "mlflow"]))
    assert str(raised.value) == ("trainer.loggers=[csv,tensorboard,mlflow] needs the mlflow package, which is not "
                                 "installed: pip install 'backward-lab[trackers]'")
    validate(make_config(trainer__loggers=["csv", "tensorboard"]))  # tensorboard is installed


def test_an_unknown_logger_is_one_line_exit_2():
    """The command line's own line, in-process (printed after "error: " with exit 2 and no folder:
    tests/test_cli.py::test_bad_input_on_the_command_line_is_exit_2_one_line_and_writes_nothing)."""
    assert refusal(*TINY, "trainer.loggers=[csv,wandb]") == (
        "trainer.loggers=[csv,wandb] is not allowed: wandb is unknown, expected a list of csv, tensorboard, mlflow "
        "(csv always: e.g. trainer.loggers=[csv,mlflow])")


def test_dropping_csv_is_refused():
    """metrics.csv is the record comparisons, claims and resumes read: a tracker comes beside it."""
    with pytest.raises(ConfigError, match=r"^trainer.loggers=\[mlflow\] is not allowed: csv writes the record "
                                          r"comparisons and resumes read, expected csv among them "
                                          r"\(e.g. trainer.loggers=\[csv,mlflow\]\)$"):
        validate(make_config(trainer__loggers=["mlflow"]))


def test_a_tracker_gets_rows_at_most_every_few_seconds_and_the_rest_before_the_run_ends():
    """On a CPU the loop hands its sinks every step; a tracker store (MLflow's SQLite) gets them in batches."""
    from runner.recording.trackers import Batched

    class Recorder:
        def __init__(self):
            self.calls, self.ended = [], None

        def write(self, rows):
            self.calls.append([row["step"] for row in rows])

        def close(self):
            pass

        def finish(self, summary, failed=False):
            self.ended = (summary, failed)

    now = [0.0]
    tracker = Recorder()
    batched = Batched(tracker, every_s=2.0, clock=lambda: now[0])
    for step in range(1, 8):
        now[0] = 0.5 * step
        batched.write([{"step": step}])
    assert tracker.calls == [[1, 2, 3, 4]]  # sent once 2 s had passed; 5..7 wait
    batched.finish("summary", failed=True)
    assert tracker.calls == [[1, 2, 3, 4], [5, 6, 7]] and tracker.ended == ("summary", True)
