"""Nothing lost: SIGKILL + resume, SIGINT/SIGTERM (runs and sweeps), divergence, no overwritten outputs.

Runs go through the real CLI in a subprocess. They are tiny and use one torch thread
(trainer.threads=1): two-thread torch on a busy 2-core machine can be many times slower. A run
is made long enough to be stopped mid-way by its number of steps, never by sleeping.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from runner import api
from runner.jobs import exit_code
from runner.training import train
from tests.conftest import ROOT, build, run_cli

TINY = ["data.train_size=256", "data.eval_size=64", "model.hidden=8", "trainer.threads=1"]
LONG = [*TINY, "trainer.steps=100000"]


def start(run_dir, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    out = [f"hydra.sweep.dir={run_dir}"] if "-m" in args else [f"hydra.run.dir={run_dir}"]
    return subprocess.Popen([sys.executable, "-m", "runner", *args, *out], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(path, rows, process, timeout=90):
    """Until `path` (a metrics.csv) holds more than `rows` data rows."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().count("\n") > rows:
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {rows} rows: {process.communicate()[1][-2000:]}")
        time.sleep(0.01)
    raise TimeoutError(f"{path} never reached {rows} rows")


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_resume_after_sigkill_gives_the_uninterrupted_parameters(tmp_path):
    args = [*TINY, "trainer.steps=4000", "trainer.checkpoint_every=7", "backward=accumulate",
            "backward.accumulation=2"]
    killed_at = random.Random(os.getpid()).randint(20, 1500)  # a different step on every run
    run_dir = tmp_path / "killed"
    process = start(run_dir, *args)
    wait_for_rows(run_dir / "metrics.csv", killed_at, process)
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    # What a SIGKILL leaves: status=running, and a CSV pandas reads up to the last step written.
    assert summary(run_dir)["status"] == "running"
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert killed_at <= len(metrics) < 4000, f"killed at row {len(metrics)}"
    assert metrics["step"].tolist() == list(range(1, len(metrics) + 1))
    assert metrics[["loss", "grad_norm", "param_sum"]].notna().all().all()

    resumed = run_cli(f"trainer.resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    # The uninterrupted run, in-process (the command line's own compose and build: runner.api), and
    # without checkpoints: writing them changes nothing in the training.
    uninterrupted = [arg for arg in args if not arg.startswith("trainer.checkpoint_every=")]
    assert api.run(api.compose([*uninterrupted, "trainer.progress=false"]), tmp_path / "reference").status == "ok"
    final, expected = summary(run_dir), summary(tmp_path / "reference")
    assert final["status"] == "ok" and final["steps_done"] == 4000
    assert final["resumed_from_step"] % 7 == 0 and final["resumed_from_step"] <= len(metrics)
    assert final["param_sha256"] == expected["param_sha256"], f"killed at row {len(metrics)}"
    assert final["config"]["backward"]["name"] == "accumulate"  # the run's own config, not defaults
    # The rows after the checkpoint were cut and written again: one row per step, as uninterrupted.
    metrics, reference_metrics = pd.read_csv(run_dir / "metrics.csv"), pd.read_csv(tmp_path / "reference" / "metrics.csv")
    assert metrics["step"].tolist() == list(range(1, 4001))
    # (peak_saved_bytes is measured on a run's first step, and a resumed run's first step too)
    same = ["step", "loss", "grad_norm", "param_sum"]
    pd.testing.assert_frame_equal(metrics[same], reference_metrics[same])


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_stops_after_the_step_and_records_it(tmp_path, sig, code):
    run_dir = tmp_path / "run"
    process = start(run_dir, *LONG)
    wait_for_rows(run_dir / "metrics.csv", 5, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    final = summary(run_dir)
    assert final["status"] == "interrupted" and signal.Signals(sig).name in final["error"]
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["step"].tolist() == list(range(1, final["steps_done"] + 1))
    assert 5 <= final["steps_done"] < 100000
    assert (run_dir / "params.pt").exists() and final["param_sha256"]


def test_interrupt_stops_a_sweep_and_keeps_its_rows(tmp_path):
    sweep_dir = tmp_path / "sweep"
    process = start(sweep_dir, "-m", "seed=0,1,2", *LONG)
    deadline = time.time() + 90
    while not list(sweep_dir.glob("0_*/metrics.csv")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    first_job = next(sweep_dir.glob("0_*"))
    wait_for_rows(first_job / "metrics.csv", 5, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "sweep stopped" in stderr
    assert [p.name for p in sweep_dir.iterdir() if p.is_dir()] == [first_job.name]  # no job after it
    table = pd.read_csv(sweep_dir / "comparison.csv")
    assert table["status"].tolist() == ["interrupted"]


def test_huge_learning_rate_ends_diverged_at_a_recorded_step(tmp_path):
    """In-process, as the command line trains it (and exits with exit_code's 1 for it)."""
    run_dir = tmp_path / "run"
    outcome = api.run(api.compose([*TINY, "optim.lr=1e6", "trainer.progress=false"]), run_dir)
    assert outcome.status == "diverged" and exit_code(outcome.status, outcome.signum) == 1
    final = summary(run_dir)
    assert final["status"] == "diverged" and 1 <= final["diverged_at_step"] < 100
    assert str(final["diverged_at_step"]) in final["error"]
    metrics = pd.read_csv(run_dir / "metrics.csv")
    bad = metrics[~(metrics["loss"].abs() < float("inf")) | ~(metrics["grad_norm"].abs() < float("inf"))]
    assert bad["step"].iloc[0] == final["diverged_at_step"] == final["steps_done"] == metrics["step"].iloc[-1]


def test_rows_batched_after_the_diverged_step_are_not_written(tmp_path):
    # log_every > 1 (the CUDA default) buffers rows; the CSV still ends at the diverged step.
    outcome = train.run(build(optim__lr=1e6, trainer__log_every=50, data__train_size=256, model__hidden=8), tmp_path)
    assert outcome.status == "diverged" and exit_code(outcome.status, outcome.signum) == 1
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics["step"].iloc[-1] == outcome.summary.diverged_at_step < 50


def test_divergence_in_a_sweep_does_not_stop_the_other_jobs(tmp_path):
    result = run_cli("-m", "optim.lr=1e6,0.5", "trainer.steps=20", *TINY, f"hydra.sweep.dir={tmp_path / 's'}")
    assert result.returncode == 1
    table = pd.read_csv(tmp_path / "s" / "comparison.csv")
    assert table["status"].tolist() == ["diverged", "ok"]


def test_a_run_directory_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"  # a run's records, trained in-process as the command line trains it
    assert api.run(api.compose(["trainer.steps=3", *TINY, "trainer.progress=false"]), run_dir).status == "ok"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    again = run_cli("trainer.steps=5", *TINY, f"hydra.run.dir={run_dir}")
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert "Traceback" not in again.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    sweep = run_cli("-m", "trainer.steps=2", *TINY, f"hydra.sweep.dir={tmp_path / 's'}")
    assert sweep.returncode == 0
    again = run_cli("-m", "trainer.steps=3", *TINY, f"hydra.sweep.dir={tmp_path / 's'}")
    assert again.returncode == 2 and "already holds a sweep" in again.stderr


def test_resume_cannot_be_swept(tmp_path):
    result = run_cli("-m", f"trainer.resume={tmp_path / 'a'},{tmp_path / 'b'}", f"hydra.sweep.dir={tmp_path / 's'}")
    assert result.returncode == 2 and "cannot be part of a sweep" in result.stderr
    assert not (tmp_path / "s").exists()
