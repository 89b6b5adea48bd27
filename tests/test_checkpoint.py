"""Checkpoints: exact resume in-process for stateful optimizers and losses; bad checkpoints."""
import io

import pytest
import torch

from runner import api
from runner.recording import checkpoint
from runner.training.build import build_training
from runner.training.train import run
from tests.conftest import build, make_config, read_summary, resume_refusal, run_cli, run_here


@pytest.mark.parametrize("overrides", [
    dict(optim__name="adam", optim__lr=0.01, backward__name="sum", backward__accumulation=4),
    dict(optim__momentum=0.9, optim__lr=0.1, model__batchnorm=True),
    dict(model__name="multitask", loss__name="multitask", loss__weighting="uncertainty",
         optim__name="adam", optim__lr=0.01, backward__name="separate"),
    dict(model__name="two_stage", model__outputs=2, loss__name="ce", backward__name="detach",
         optim__name="adam"),
    # Loader mode across epochs (the resume jumps into epoch 1), a token loss, clipping.
    dict(model__name="seq", data__name="seq", loss__name="lm", model__hidden=16, model__depth=1, data__max_length=8,
         data__micro_batch_size=4, data__train_size=40, data__eval_size=8, backward__name="accumulate",
         backward__accumulation=4, optim__clip_norm=0.5),
])
def test_resume_is_exact_in_process(tmp_path, overrides):
    config = dict(trainer__steps=12, trainer__checkpoint_every=5, **overrides)
    whole = run(build(**config), tmp_path / "whole")
    assert whole.status == "ok"
    # Stop after 7 steps, leaving the checkpoint of step 5 and two rows after it.
    (tmp_path / "part").mkdir()
    first = run(build(**{**config, "trainer__steps": 7}), tmp_path / "part")
    assert first.status == "ok"
    state = checkpoint.load(tmp_path / "part")
    assert state["step"] == 5
    # A fresh process would seed differently before resuming: disturb the RNG on purpose.
    torch.manual_seed(12345)
    resumed = run(build(**config), tmp_path / "part", resume=state)
    assert resumed.status == "ok" and resumed.summary.resumed_from_step == 5
    assert resumed.summary.param_sha256 == whole.summary.param_sha256
    rows = (tmp_path / "part" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(1, 13)]
    times = [float(r.split(",")[4]) for r in rows[1:]]
    assert times == sorted(times)  # the clock goes on from the checkpoint


def test_a_checkpoint_restores_the_lr_schedule(tmp_path):
    """The schedule's length is trainer.steps, so a shorter first part cannot stand in for an
    interruption here: save after 5 steps, restore into a fresh training, compare the schedulers."""
    config = make_config(trainer__steps=20, optim__scheduler="cosine", optim__warmup_steps=3)
    trained = build_training(config)
    for step in range(5):
        trained.strategy.step(trained.model, trained.loss_fn, trained.optimizers, *trained.dataset.batch(step))
    (tmp_path / "run").mkdir()
    checkpoint.save(tmp_path / "run", trained, 5, 0)
    fresh = build_training(config)
    assert checkpoint.restore(checkpoint.load(tmp_path / "run"), fresh) == 5
    assert fresh.schedulers[0].state_dict() == trained.schedulers[0].state_dict()
    assert fresh.optimizers[0].param_groups[0]["lr"] == trained.optimizers[0].param_groups[0]["lr"] > 0


def test_resuming_a_different_training_is_refused(tmp_path):
    config = dict(trainer__steps=4, trainer__checkpoint_every=2)
    (tmp_path / "a").mkdir()
    run(build(**config), tmp_path / "a")
    state = checkpoint.load(tmp_path / "a")
    other = build(**config, backward__name="accumulate", backward__accumulation=2)
    with pytest.raises(checkpoint.CheckpointError, match="different backward"):
        run(other, tmp_path / "a", resume=state)


def test_resume_refuses_what_would_not_continue_the_run(tmp_path):
    tiny = dict(data__train_size=256, model__hidden=8, trainer__checkpoint_every=2)
    run(build(trainer__steps=5, **tiny), tmp_path / "a")
    state = checkpoint.load(tmp_path / "a")
    assert state["step"] == 4
    with pytest.raises(checkpoint.CheckpointError, match="already finished its 5 steps"):
        run(build(trainer__steps=5, **tiny), tmp_path / "a", resume=state)
    with pytest.raises(checkpoint.CheckpointError, match="trainer.steps=3 is below the checkpoint's step 4"):
        run(build(trainer__steps=3, **tiny), tmp_path / "a", resume=state)
    # A checkpoint copied into another run's folder belongs to another run.
    run(build(trainer__steps=5, seed=1, **tiny), tmp_path / "b")
    with pytest.raises(checkpoint.CheckpointError, match="belongs to another run"):
        run(build(trainer__steps=9, **tiny), tmp_path / "b", resume=state)
    # A metrics.csv cut shorter than at the checkpoint cannot be continued.
    metrics = tmp_path / "a" / "metrics.csv"
    metrics.write_bytes(metrics.read_bytes()[:state["metrics_bytes"] - 10])
    with pytest.raises(checkpoint.CheckpointError, match="metrics.csv is shorter"):
        run(build(trainer__steps=9, **tiny), tmp_path / "a", resume=state)


def test_a_finished_run_can_be_extended_exactly(tmp_path):
    tiny = dict(data__train_size=256, model__hidden=8, trainer__checkpoint_every=3)
    run(build(trainer__steps=7, **tiny), tmp_path / "short")
    longer = run(build(trainer__steps=11, **tiny), tmp_path / "short",
                 resume=checkpoint.load(tmp_path / "short"))
    whole = run(build(trainer__steps=11, **tiny), tmp_path / "whole")
    assert longer.summary.resumed_from_step == 6
    assert longer.summary.param_sha256 == whole.summary.param_sha256


def test_truncated_checkpoint_is_one_clear_error(tmp_path):
    run_dir = tmp_path / "run"  # a checkpointed run, trained in-process as the command line trains it
    assert api.run(api.compose(["trainer.steps=6", "trainer.checkpoint_every=2", "trainer.progress=false"]),
                   run_dir).status == "ok"
    path = run_dir / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = run_cli(f"trainer.resume={run_dir}")
    assert result.returncode == 2
    assert "checkpoint.pt is corrupt or unreadable" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    buffer = io.BytesIO()
    torch.save({"format": 1, "payload": _Evil()}, buffer)
    (tmp_path / "checkpoint.pt").write_bytes(buffer.getvalue())
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or unreadable"):
        checkpoint.load(tmp_path)
    assert not _Evil.unpickled


def test_a_checkpoint_of_the_earlier_format_is_refused_in_one_line(tmp_path):
    """Format 1 held every model, loss and data key in one node; its config does not fit today's groups."""
    torch.save({"format": 1, "config_json": "{}", "step": 2}, tmp_path / "checkpoint.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint.pt was written by an earlier backward-lab "
                                                         r"\(checkpoint format 1, .*train the run again$"):
        checkpoint.load(tmp_path)


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    result = run_cli(f"trainer.resume={tmp_path}")
    assert result.returncode == 2 and "no checkpoint.pt" in result.stderr
    assert not (tmp_path / "outputs").exists()


class _Evil:
    unpickled = False

    def __reduce__(self):
        return (_mark_unpickled, ())


def _mark_unpickled():
    _Evil.unpickled = True
    return None


RESUMED = ["model=cnn", "backward=accumulate", "backward.accumulation=2", "data.train_size=256",
           "data.eval_size=32", "trainer.checkpoint_every=4", "seed=3"]


def test_resume_with_the_runs_own_overrides_repeated_is_exact(tmp_path):
    """A user repeats the command and appends the resume (raising trainer.steps, which a resume
    may change): the run continues bit for bit as if it had never stopped."""
    first = run_here(*RESUMED, "trainer.steps=6", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    resumed = run_cli(*RESUMED, "trainer.steps=10", f"trainer.resume={tmp_path / 'run'}")
    assert resumed.returncode == 0, resumed.stderr
    # The uninterrupted run, in-process: the command line's own compose and build (runner.api).
    assert api.run(api.compose([*RESUMED, "trainer.steps=10", "trainer.progress=false"]),
                   tmp_path / "whole").status == "ok"
    a, b = read_summary(tmp_path / "run"), read_summary(tmp_path / "whole")
    assert a["resumed_from_step"] == 4 and a["steps_done"] == 10
    assert a["param_sha256"] == b["param_sha256"]
    assert a["overrides"] == [*RESUMED, "trainer.steps=6"]  # the run's own record stays


def test_resume_refuses_an_override_that_differs_naming_both_values(tmp_path):
    """Each refusal's line found in-process by the command line's own preparation, then one through the
    command line itself: that line on stderr, exit 2, and the run left as it was."""
    run_dir = tmp_path / "run"
    first = run_here(*RESUMED, "trainer.steps=6", f"hydra.run.dir={run_dir}", cwd=tmp_path)  # checkpointed at step 4
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    for override, needle in (
            ("backward.accumulation=4", "backward.accumulation=2, this command backward.accumulation=4"),
            ("model=mlp", "model=cnn, this command model=mlp"),
            ("seed=4", "seed=3, this command seed=4")):
        assert needle in resume_refusal(*RESUMED, override, "trainer.steps=10", f"trainer.resume={run_dir}")
    overrides = [*RESUMED, "seed=4", "trainer.steps=10", f"trainer.resume={run_dir}"]
    result = run_cli(*overrides)
    assert result.returncode == 2
    assert "seed=3, this command seed=4" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {resume_refusal(*overrides)}"  # one line, the same
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
