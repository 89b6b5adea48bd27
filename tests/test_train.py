"""The loop: pre-training checks that leave no trace, buffered rows, recorded failures."""
import pandas as pd
import torch

from runner.jobs import exit_code
from runner.training.build import probe
from runner.training.train import run
from tests.conftest import build, train


def reprobe(training):
    """The checks before training again, on a model changed after it was built."""
    return probe(training.config, training.strategy, training.model, training.loss_fn, training.batches,
                 training.spec)


def test_probe_reports_parameters_without_gradient_and_leaves_no_trace():
    training = build(model__batchnorm=True)
    training.model.register_parameter("unused", torch.nn.Parameter(torch.zeros(3)))
    stats = training.model.norm.running_mean.clone()
    rng = torch.get_rng_state()
    findings = reprobe(training)
    assert findings.params_without_grad == ["unused"]
    assert torch.equal(training.model.norm.running_mean, stats)
    assert training.model.norm.num_batches_tracked.item() == 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in training.model.parameters())


def test_unused_parameter_is_named_in_the_summary(tmp_path):
    training = build(trainer__steps=2)
    training.model.register_parameter("unused", torch.nn.Parameter(torch.zeros(3)))
    training.findings = reprobe(training)
    outcome = run(training, tmp_path)
    assert outcome.status == "ok" and outcome.summary.params_without_grad == ["unused"]


def test_buffered_logging_writes_every_step(tmp_path):
    a, _, dir_a = train(tmp_path, trainer__steps=20, trainer__log_every=7)
    b, _, dir_b = train(tmp_path, trainer__steps=20)
    rows_a, rows_b = pd.read_csv(dir_a / "metrics.csv"), pd.read_csv(dir_b / "metrics.csv")
    assert rows_a["step"].tolist() == list(range(1, 21))
    pd.testing.assert_frame_equal(rows_a.drop(columns="time_s"), rows_b.drop(columns="time_s"))
    assert a["param_sha256"] == b["param_sha256"]


def test_a_failing_step_is_recorded_not_raised(tmp_path):
    training = build(trainer__steps=10)
    original = training.strategy.step
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom\nsecond line")
        return original(*args)

    training.strategy.step = flaky
    outcome = run(training, tmp_path)
    assert outcome.status == "error" and exit_code(outcome.status, outcome.signum) == 1
    assert outcome.summary.error == "RuntimeError: boom" and outcome.summary.steps_done == 3
    assert len(pd.read_csv(tmp_path / "metrics.csv")) == 3
    assert not (tmp_path / "params.pt").exists()


def test_seed_changes_the_run(tmp_path):
    a = train(tmp_path, trainer__steps=3)[0]
    b = train(tmp_path, trainer__steps=3, seed=1)[0]
    assert a["param_sha256"] != b["param_sha256"]
