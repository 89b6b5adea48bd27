"""Processes (each test starts two ranks, so each says so in its name): DDP through torchrun and
trainer.processes, exact weighting of uneven shares, and a lost rank recorded as the run's error.
The sync modes, all-reduce rounds and ranks_agree are the ddp experiment's claims (test_experiments)."""
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from runner.config.schema import ConfigError
from runner.recording import record
from runner.training.build import build_training
from runner.training.train import run
from tests.conftest import ROOT, make_config, read_summary, refusal, run_cli, train


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


def test_parallel_bad_input_from_the_command_line_is_one_line():
    """The command line's own lines, in-process (each printed with exit 2 and no folder:
    tests/test_cli.py::test_bad_input_on_the_command_line_is_exit_2_one_line_and_writes_nothing)."""
    for overrides, needle in ((["trainer.parallel=zero"], "trainer.parallel"),
                              (["trainer.parallel=fsdp", "model=two_stage", "loss=ce", "backward=detach"],
                               "trainer.parallel=fsdp is not allowed with backward=detach"),
                              (["loss=focal", "loss.rank_normalize=no_world"], "loss.rank_normalize=no_world")):
        assert needle in refusal(*overrides)


def test_two_processes_fsdp_records_full_tensors(tmp_path):
    """Sharded parameters and gradients are gathered for the records: params.pt and first_grad.pt
    hold full tensors, the hash is the full model's, and the sums per step are the whole model's."""
    run_dir = tmp_path / "fsdp"
    result = run_cli("trainer.processes=2", "trainer.parallel=fsdp", "backward=accumulate", "backward.accumulation=2",
                     "trainer.steps=3", f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["parallel"] == "fsdp" and summary["ranks_agree"] is True
    assert summary["reduce_scatter_calls_per_step"] == 1.0 and summary["peak_grad_bytes"] > 0
    _, reference, reference_dir = train(tmp_path, trainer__steps=3)
    params, grads = params_of(run_dir), record.load_first_grad(run_dir)
    assert set(grads) == set(reference) and all(grads[n].shape == reference[n].shape for n in reference)
    for name, value in reference.items():
        torch.testing.assert_close(params[name], value)
    assert summary["param_sha256"] == record.param_sha256({n: params[n] for n in reference})
    mine, theirs = pd.read_csv(run_dir / "metrics.csv"), pd.read_csv(reference_dir / "metrics.csv")
    assert abs(mine["param_sum"] - theirs["param_sum"]).max() < 1e-4
    assert abs(mine["grad_norm"] - theirs["grad_norm"]).max() < 1e-5


def test_two_processes_fsdp_bf16_with_a_late_parameter_is_recorded_with_its_reference(tmp_path):
    """A parameter first used on the last micro-batch, sync deferred, bf16 policy: FSDP2 itself
    fails (pytorch #196996); the run is status=error with the reference as its hint."""
    run_dir = tmp_path / "late"
    result = run_cli("model=custom", "model._target_=tests.custom_models.LateParameter", "precision=pure_bf16",
                     "trainer.processes=2", "trainer.parallel=fsdp", "backward=accumulate", "backward.accumulation=4",
                     "trainer.steps=2", f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=180)
    summary = read_summary(run_dir)
    assert result.returncode == 1 and summary["status"] == "error", result.stderr[-2000:]
    assert "#196996" in summary["hint"] and "Traceback" not in result.stderr


def test_processes_need_ranks_outside_the_command_line(tmp_path):
    training = build_training(make_config(trainer__processes=2, trainer__steps=1))
    with pytest.raises(ConfigError, match="trainer.processes=2 needs its ranks started"):
        run(training, tmp_path / "run")


@pytest.mark.parametrize("overrides,needle", [
    (dict(trainer__processes=2, backward__name="separate"),
     "trainer.processes=2 is not allowed with backward=separate"),
    (dict(trainer__processes=2, data__micro_batch_size=4), "data.micro_batch_size"),
    (dict(trainer__parallel="fsdp", backward__name="separate"),
     "trainer.parallel=fsdp is not allowed with backward=separate: expected backward=full or sum or accumulate"),
    (dict(trainer__processes=2, trainer__parallel="fsdp", trainer__autocast="fp16"),
     "trainer.autocast=fp16 is not allowed with trainer.parallel=fsdp"),
])
def test_processes_bad_input(overrides, needle):
    from runner.config.schema import validate

    with pytest.raises(ConfigError, match=needle):
        validate(make_config(**overrides))


def test_a_rank_normalisation_needs_a_token_loss():
    """Checked where the loss is built: what counts is a class that counts tokens (loss=lm, or yours)."""
    assert refusal("loss.rank_normalize=local", "trainer.steps=1") == (
        "loss.rank_normalize=local is not allowed with loss=bce: it divides a token loss by a token count, "
        "expected a token loss (loss=lm)")


def test_sorting_lengths_is_a_key_of_the_sequence_sources():
    """data.sort_lengths is declared by data=seq's and data=text's classes: elsewhere it is ignored with a
    warning, as another source's key is, and the run is the one without it."""
    from runner import api

    training = api.compose(["data.sort_lengths=true", "trainer.steps=1"])
    assert training.warnings() == ["data.sort_lengths=true is ignored by data=default: it applies to data=seq or "
                                   "data=text"]
    assert training.used_config_id() == api.compose(["trainer.steps=1"]).used_config_id()


def test_auto_threads_share_the_cores_between_ranks_and_sweep_workers(monkeypatch):
    from types import SimpleNamespace

    from runner.jobs import parallel_job_threads

    cores = os.cpu_count() or 1
    basic = SimpleNamespace(launcher={"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"})
    assert parallel_job_threads(basic) == 0  # one process: torch's default
    joblib = SimpleNamespace(launcher={"_target_": "hydra_plugins.hydra_joblib_launcher.JoblibLauncher", "n_jobs": 2})
    assert parallel_job_threads(joblib) == max(1, cores // 2)
    for name, value in dict(RANK="0", WORLD_SIZE="4", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    assert parallel_job_threads(basic) == max(1, cores // 2)  # the ranks on this node, not torchrun's 1
