"""The worked custom-loss example in experiments/, through the CLI and in-process."""

from tests.conftest import max_abs_diff, read_summary, run_cli, train


def test_soft_f1_runs_from_any_directory_with_its_arguments(tmp_path):
    result = run_cli("loss=custom", "loss._target_=runner.experiments.custom_loss.SoftF1Loss", "+loss.smooth=0.5",
                     "trainer.steps=20", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    summary = read_summary(run_dir)
    assert summary["status"] == "ok" and summary["config"]["loss"]["smooth"] == 0.5


def test_hard_f1_is_refused_before_training(tmp_path):
    """In-process, as the command line runs it (which prints the recorded error and exits 1:
    tests/test_cli.py::test_a_loss_without_backward_is_recorded_as_not_differentiable)."""
    from runner import api
    from runner.jobs import exit_code

    training = api.compose(["loss=custom", "loss._target_=runner.experiments.custom_loss.HardF1Loss",
                            "trainer.progress=false"])
    outcome = api.run(training, tmp_path / "run")
    assert outcome.status == "error" and exit_code(outcome.status, outcome.signum) == 1
    assert outcome.summary.steps_done == 0
    assert "HardF1Loss is not differentiable: its output has no grad_fn" in outcome.summary.error


def test_a_loss_that_is_not_a_per_example_mean_breaks_the_accumulation_identity(tmp_path):
    """Size weighting is exact for losses that average over examples; soft F1 is a ratio of
    batch-wide sums, so accumulating micro-batches changes the result."""
    kwargs = {"smooth": 1.0}
    base = dict(loss__name="custom", loss___target_="runner.experiments.custom_loss.SoftF1Loss", trainer__steps=30)
    full = train(tmp_path, kwargs, **base)[1]
    acc = train(tmp_path, kwargs, **base, backward__name="accumulate", backward__accumulation=4)[1]
    assert max_abs_diff(acc, full) > 1e-3


def test_requires_grad_on_a_rewrapped_value_trains_nothing_and_is_refused(tmp_path):
    """The custom-loss answer's second question: requires_grad=True on the loss does not make it
    trainable. By hand, backward runs without complaint and the model never changes; the runner
    refuses the loss before training."""
    import torch
    from runner.experiments.custom_loss import RewrappedF1Loss

    from runner.training.build import build_training
    from tests.conftest import make_config

    training = build_training(make_config(trainer__steps=3))
    before = {n: p.detach().clone() for n, p in training.model.named_parameters()}
    optimizer = torch.optim.SGD(training.model.parameters(), lr=0.5)
    loss_fn = RewrappedF1Loss()
    for step in range(3):
        inputs, targets = training.dataset.batch(step)
        optimizer.zero_grad()
        loss = loss_fn(training.model(inputs), targets)
        assert loss.requires_grad and loss.grad_fn is None
        loss.backward()
        optimizer.step()
    assert all(p.grad is None for p in training.model.parameters())
    assert max_abs_diff(before, {n: p.detach() for n, p in training.model.named_parameters()}) == 0

    summary = train(tmp_path, loss__name="custom", loss___target_="runner.experiments.custom_loss.RewrappedF1Loss")[0]
    assert summary["status"] == "error" and summary["steps_done"] == 0
    assert "RewrappedF1Loss is not differentiable: its output has no grad_fn" in summary["error"]
