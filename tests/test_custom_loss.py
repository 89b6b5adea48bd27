"""The worked custom-loss example in experiments/, through the CLI and in-process."""
from runner import record
from tests.conftest import max_abs_diff, run_cli, train


def test_soft_f1_runs_from_any_directory_with_its_arguments(tmp_path):
    result = run_cli("loss=custom", "loss._target_=experiments.custom_loss.SoftF1Loss", "+loss.smooth=0.5",
                     "trainer.steps=20", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    summary = record.read_summary(run_dir)
    assert summary["status"] == "ok" and summary["config"]["loss"]["smooth"] == 0.5


def test_hard_f1_is_refused_before_training(tmp_path):
    result = run_cli("loss=custom", "loss._target_=experiments.custom_loss.HardF1Loss", cwd=tmp_path)
    assert result.returncode == 1
    assert "HardF1Loss) is not differentiable: its output has no grad_fn" in result.stderr


def test_a_loss_that_is_not_a_per_example_mean_breaks_the_accumulation_identity(tmp_path):
    """Size weighting is exact for losses that average over examples; soft F1 is a ratio of
    batch-wide sums, so accumulating micro-batches changes the result."""
    kwargs = {"smooth": 1.0}
    base = dict(loss__name="custom", loss___target_="experiments.custom_loss.SoftF1Loss", trainer__steps=30)
    full = train(tmp_path, kwargs, **base)[1]
    acc = train(tmp_path, kwargs, **base, backward__name="accumulate", backward__accumulation=4)[1]
    assert max_abs_diff(acc, full) > 1e-3
