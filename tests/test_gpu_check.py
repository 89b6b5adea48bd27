"""`make gpu-check` (runner.gpu_check): one line and exit 0 without CUDA; the report, from fake results."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from runner import gpu_check
from runner.gpu_check import Step
from runner.recording import record

ROOT = Path(__file__).resolve().parent.parent


def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    # No device visible, even on a GPU machine: there this test runs inside the check itself.
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-m", "runner.gpu_check", "--out", str(tmp_path / "out")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA device here (torch "), result.stdout
    assert "nothing to check" in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "outputs").exists()


FACTS = {"date": "2026-11-30 17:00 UTC", "device": "NVIDIA H200", "torch": "2.13.0+cu128", "cuda": "12.8"}
TESTS_OK = Step("pytest", 0, 81.4, line="25 passed, 3 skipped in 80.11s")


def fake_experiments():
    precision = Step("precision", 0, 97.2, rows=[
        {"backward": "full", "status": "ok", "final_loss": 0.4607, "max_abs_diff": 0.0, "verdict": "reference",
         "peak_saved_bytes": 49152.0, "cuda_max_memory_allocated": 1234567.0},
        {"backward": "accumulate", "status": "ok", "final_loss": 0.46071, "max_abs_diff": 1.19e-7,
         "verdict": "equivalent", "peak_saved_bytes": 13248.0, "cuda_max_memory_allocated": None}],
        claims=["holds  accumulate ends where full ends  max |Δθ| 1.19e-07"])
    ddp = Step("ddp", None, 150.0, note="timed out after 150 s", rows=[
        {"job": "0_trainer.processes=1", "status": "ok", "allreduce_calls_per_step": 1.0}])
    fsdp = Step("fsdp", note="no experiments/fsdp.yaml here: skipped", required=False)
    memory = Step("memory", note="skipped: 12 s left of the 420 s budget")
    return [precision, ddp, fsdp, memory]


def test_the_report_names_the_device_the_tests_and_each_experiment():
    text = gpu_check.report(FACTS, TESTS_OK, fake_experiments())
    assert text.startswith("# GPU check, 2026-11-30 17:00 UTC")
    assert "NVIDIA H200 (torch 2.13.0+cu128, CUDA 12.8)" in text
    assert "25 passed, 3 skipped in 80.11s (exit 0, 81 s)" in text
    assert "| precision | 0 | 97 | 2 |  |" in text
    assert "| ddp |  | 150 | 1 | timed out after 150 s |" in text
    assert "| fsdp |  | 0 | 0 | no experiments/fsdp.yaml here: skipped |" in text
    assert "| memory |  | 0 | 0 | skipped: 12 s left of the 420 s budget |" in text
    # Each experiment with figures gets its table: byte counts as integers, the rest to 4 digits.
    assert "| backward | status | final_loss | max_abs_diff | verdict | peak_saved_bytes | cuda_max_memory_allocated |" in text
    assert "| accumulate | ok | 0.4607 | 1.19e-07 | equivalent | 13248 |  |" in text
    assert "| full | ok | 0.4607 | 0 | reference | 49152 | 1234567 |" in text
    assert "- holds  accumulate ends where full ends  max |Δθ| 1.19e-07" in text
    assert "| 0_trainer.processes=1 | ok | 1 |" in text
    assert "## fsdp" not in text and "## memory" not in text
    assert "NOT everything ran and passed" in text


def test_a_missing_experiment_is_noted_but_a_timeout_a_skip_or_a_failed_test_is_not_a_pass():
    precision, ddp, fsdp, memory = fake_experiments()
    assert gpu_check.passed(TESTS_OK, [precision, fsdp])
    assert "- result: everything ran and passed" in gpu_check.report(FACTS, TESTS_OK, [precision, fsdp])
    assert not gpu_check.passed(TESTS_OK, [precision, ddp])
    assert not gpu_check.passed(TESTS_OK, [precision, memory])
    assert not gpu_check.passed(Step("pytest", 1, 60.0, line="1 failed, 24 passed in 59s"), [precision])
    assert not gpu_check.passed(Step("pytest", None, 150.0, note="timed out after 150 s"), [precision])


def test_figures_come_from_comparison_csv_finished_or_cut_short(tmp_path):
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "comparison.csv").write_text(
        "backward,status,final_loss,param_sum,max_abs_diff,verdict,peak_saved_bytes,time_per_step_s,error,run_dir\n"
        f"full,ok,0.46,5.9,0.0,reference,49152,0.001,,{tmp_path / 'no_run'}\n"
        f"accumulate,error,,,,error,,,boom,{tmp_path / 'no_run'}\n")
    rows = gpu_check.read_rows(finished)
    assert list(rows[0]) == ["backward", "status", "final_loss", "max_abs_diff", "verdict", "peak_saved_bytes",
                             "time_per_step_s"]  # no summary figures: the runs' folders hold none
    assert rows[1]["status"] == "error" and rows[1]["final_loss"] is None
    run = tmp_path / "run"  # on CUDA the memory allocated and the all-reduce rounds come from the summary
    run.mkdir()
    record.write_summary(run, record.Summary(status="ok", cuda_max_memory_allocated=123456, allreduce_calls_per_step=4.0))
    (finished / "comparison.csv").write_text(f"backward,status,run_dir\nfull,ok,{run}\n")
    assert gpu_check.read_rows(finished) == [{"backward": "full", "status": "ok", "cuda_max_memory_allocated": 123456,
                                              "allreduce_calls_per_step": 4.0}]
    cut_short = tmp_path / "cut_short"
    cut_short.mkdir()
    (cut_short / "comparison.csv").write_text("job,overrides,status,final_loss,run_dir\n0_backward=full,backward=full,ok,0.5,x\n")
    assert gpu_check.read_rows(cut_short) == [{"job": "0_backward=full", "status": "ok", "final_loss": 0.5}]
    assert gpu_check.read_rows(tmp_path / "nothing") == []


def test_a_step_that_runs_over_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    grandchild = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    rc, wall, _ = gpu_check.run_logged([sys.executable, "-c", child], tmp_path / "log", timeout=3)
    assert rc is None and wall < 30
    pid = int(pid_file.read_text())  # xdist workers and torchrun ranks are such grandchildren
    for _ in range(50):
        status = Path(f"/proc/{pid}/status")
        if not status.exists() or "State:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the grandchild {pid} outlived the timeout")


def test_two_rank_experiments_run_on_the_cpu_with_one_gpu():
    from runner.gpu_check import device_for

    assert device_for("fsdp", gpus=1) == "cpu" and device_for("fsdp", gpus=2) == "cuda"
    assert device_for("precision", gpus=1) == "cuda"
