"""Nothing lost: SIGKILL + resume, SIGINT/SIGTERM, divergence, no overwritten outputs."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.conftest import ROOT, run_cli

LONG = ["model=cnn", "backward=accumulate", "backward.accumulation=4", "trainer.steps=3000",
        "data.train_size=512", "data.eval_size=64"]


def start(run_dir, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "runner", *args, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(run_dir, rows, timeout=60):
    path = run_dir / "metrics.csv"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().count("\n") > rows:
            return
        time.sleep(0.02)
    raise TimeoutError(f"{path} never reached {rows} rows")


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_resume_after_sigkill_gives_the_uninterrupted_parameters(tmp_path):
    args = ["trainer.steps=300", "trainer.checkpoint_every=10", *LONG[:3], *LONG[4:]]
    reference = run_cli(*args, f"hydra.run.dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr
    killed_at = random.Random(os.getpid()).randint(15, 200)
    run_dir = tmp_path / "killed"
    process = start(run_dir, *args)
    wait_for_rows(run_dir, killed_at)
    process.kill()
    process.wait()
    # What a SIGKILL leaves: status=running, and a CSV pandas reads up to the last step written.
    assert summary(run_dir)["status"] == "running"
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["step"].tolist() == list(range(1, len(metrics) + 1)) and len(metrics) < 300
    assert metrics["loss"].notna().all()
    resumed = run_cli(f"trainer.resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    final = summary(run_dir)
    assert final["status"] == "ok" and final["resumed_from_step"] % 10 == 0
    assert final["param_sha256"] == summary(tmp_path / "reference")["param_sha256"]
    assert final["config"]["backward"]["name"] == "accumulate"  # the run's own config, not defaults
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["step"].tolist() == list(range(1, 301))
    expected = pd.read_csv(tmp_path / "reference" / "metrics.csv")
    pd.testing.assert_series_equal(metrics["loss"], expected["loss"])


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_stops_after_the_step_and_records_it(tmp_path, sig, code):
    run_dir = tmp_path / "run"
    process = start(run_dir, *LONG)
    wait_for_rows(run_dir, 5)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    final = summary(run_dir)
    assert final["status"] == "interrupted" and signal.Signals(sig).name in final["error"]
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert len(metrics) == final["steps_done"] and 5 <= final["steps_done"] < 3000
    assert (run_dir / "params.pt").exists()


def test_huge_learning_rate_ends_diverged_at_a_recorded_step(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("optim.lr=1e6", f"hydra.run.dir={run_dir}")
    assert result.returncode == 1
    final = summary(run_dir)
    assert final["status"] == "diverged" and 1 <= final["diverged_at_step"] < 100
    metrics = pd.read_csv(run_dir / "metrics.csv")
    bad = metrics[~(metrics["loss"].abs() < float("inf")) | ~(metrics["grad_norm"].abs() < float("inf"))]
    assert bad["step"].iloc[0] == final["diverged_at_step"] == metrics["step"].iloc[-1]


def test_divergence_in_a_sweep_does_not_stop_the_other_jobs(tmp_path):
    result = run_cli("-m", "optim.lr=1e6,0.5", "trainer.steps=20", f"hydra.sweep.dir={tmp_path / 's'}")
    assert result.returncode == 1
    table = pd.read_csv(tmp_path / "s" / "comparison.csv")
    assert table["status"].tolist() == ["diverged", "ok"]


def test_a_run_directory_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli("trainer.steps=3", f"hydra.run.dir={run_dir}").returncode == 0
    before = (run_dir / "summary.json").read_text()
    again = run_cli("trainer.steps=5", f"hydra.run.dir={run_dir}")
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert (run_dir / "summary.json").read_text() == before
    sweep = run_cli("-m", "trainer.steps=2", f"hydra.sweep.dir={tmp_path / 's'}")
    assert sweep.returncode == 0
    again = run_cli("-m", "trainer.steps=3", f"hydra.sweep.dir={tmp_path / 's'}")
    assert again.returncode == 2 and "already holds a sweep" in again.stderr
