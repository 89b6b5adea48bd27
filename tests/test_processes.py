"""Processes (each test starts two ranks, so each says so in its name): DDP through torchrun and
trainer.processes, exact weighting of uneven shares, and a lost rank recorded as the run's error.
The sync modes, all-reduce rounds and ranks_agree are the ddp experiment's claims (test_experiments)."""
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from runner import record
from runner.build import build_training
from runner.schema import ConfigError
from runner.train import run

from tests.conftest import ROOT, make_config, read_summary, run_cli, train


def params_of(run_dir):
    return record.load_params(run_dir)


def test_two_processes_through_torchrun_end_where_one_process_ends(tmp_path):
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                             "-m", "runner", "backward=accumulate", "backward.accumulation=2", "trainer.steps=4",
                             f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "ok" and summary["processes"] == 2 and summary["ranks_agree"] is True
    assert summary["allreduce_calls_per_step"] == 1.0  # sync=last: the last micro-batch only
    assert result.stdout.count("run: ok") == 1  # rank 0 speaks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # the other rank left nothing
    _, reference, _ = train(tmp_path, trainer__steps=4)
    for name, value in params_of(run_dir).items():
        if name in reference:
            torch.testing.assert_close(value, reference[name])


def test_two_processes_weight_uneven_shares_exactly(tmp_path):
    """A batch of 7 over 2 ranks (4 + 3 rows), each split into 2 micro-batches: rank losses are
    weighted by world x share, so the result is the full batch's (an even split would not tell)."""
    run_dir = tmp_path / "uneven"
    result = run_cli("trainer.processes=2", "backward=accumulate", "backward.accumulation=2", "data.batch_size=7",
                     "trainer.steps=4", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run: ok") == 1  # the launching process speaks for its ranks
    summary = read_summary(run_dir)
    assert summary["processes"] == 2 and summary["ranks_agree"] is True
    _, reference, reference_dir = train(tmp_path, trainer__steps=4, data__batch_size=7)
    for name, value in params_of(run_dir).items():
        if name in reference:
            torch.testing.assert_close(value, reference[name])
    mine, theirs = pd.read_csv(run_dir / "metrics.csv"), pd.read_csv(reference_dir / "metrics.csv")
    assert abs(mine["loss"][0] - theirs["loss"][0]) < 1e-6  # the batch's loss, gathered from both ranks


def test_two_processes_a_lost_rank_fails_the_job_with_one_line_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "model=custom", "model._target_=tests.custom_models.DiesOnRankOne", "+model.die=true,false",
                     "trainer.processes=2", "trainer.steps=3", f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=180)
    assert result.returncode == 1  # a job failed
    died, survived = (read_summary(next(sweep.glob(f"*die={flag}*"))) for flag in ("True", "False"))
    assert died["status"] == "error" and "lost a rank: rank 1 exited with code -9 (SIGKILL)" in died["error"]
    assert survived["status"] == "ok" and survived["ranks_agree"] is True
    assert len(pd.read_csv(sweep / "comparison.csv")) == 2


def test_processes_need_ranks_outside_the_command_line(tmp_path):
    training = build_training(make_config(trainer__processes=2, trainer__steps=1))
    with pytest.raises(ConfigError, match="trainer.processes=2 needs its ranks started"):
        run(training, tmp_path / "run")


@pytest.mark.parametrize("overrides,needle", [
    (dict(trainer__processes=2, backward__name="separate"),
     "trainer.processes=2 is not allowed with backward=separate"),
    (dict(trainer__processes=2, data__micro_batch_size=4), "data.micro_batch_size"),
])
def test_processes_bad_input(overrides, needle):
    from runner.schema import validate

    with pytest.raises(ConfigError, match=needle):
        validate(make_config(**overrides))
