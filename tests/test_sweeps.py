"""Sweeps through the real CLI: rows for failed jobs, comparisons across sweeps, launchers."""
from pathlib import Path

import pandas as pd
import pytest

from runner import compare
from tests.conftest import run_cli, run_here

TINY = ["trainer.steps=15", "data.train_size=256", "data.eval_size=64", "model.hidden=8"]
LAUNCHED = ["backward=full,sum,accumulate", "backward.accumulation=2", "trainer.threads=1"]


def sweep(tmp_path, name, *args, timeout=180):
    """The basic launcher's sweeps run in this process; another launcher's start their own processes."""
    sweep_dir = tmp_path / name
    command = ["-m", *args, *TINY, f"hydra.sweep.dir={sweep_dir}"]
    launched = any(arg.startswith("hydra/launcher=") for arg in args)
    result = run_cli(*command, cwd=tmp_path, timeout=timeout) if launched else run_here(*command, cwd=tmp_path)
    return result, sweep_dir


@pytest.fixture(scope="session")
def basic_sweep(tmp_path_factory):
    """The basic launcher's sweep of full, sum and accumulate, run once for the tests that read it: the
    other launchers' sweeps are compared with it, and compare lines it up with its float64 twin."""
    return sweep(tmp_path_factory.mktemp("launchers"), "basic", *LAUNCHED)


def test_a_failing_job_keeps_every_row_and_the_comparison(tmp_path):
    result, sweep_dir = sweep(tmp_path, "s", "backward=full,detach,accumulate", "backward.accumulation=4")
    assert result.returncode == 1  # a job failed and no claim expected it
    assert "job failed" in result.stderr and "Traceback" not in result.stderr
    table = pd.read_csv(sweep_dir / "comparison.csv")
    assert table["backward"].tolist() == ["full", "detach", "accumulate"]
    assert table["status"].tolist() == ["ok", "error", "ok"]
    assert "does not fit model=mlp" in table["error"][1]
    assert table["verdict"].tolist() == ["reference", "error", "equivalent"]
    assert (sweep_dir / "loss_curves.png").stat().st_size > 10_000
    assert "equivalent" in result.stdout  # the table printed at the end


def test_compare_lines_up_two_sweeps(tmp_path, basic_sweep):
    r32, s32 = basic_sweep  # full, sum and accumulate in float32, the same in float64:
    r64, s64 = sweep(tmp_path, "f64", *LAUNCHED, "trainer.dtype=float64")
    assert r32.returncode == 0 and r64.returncode == 0, r32.stderr + r64.stderr
    out = tmp_path / "both.csv"
    result = run_cli_compare(s32, s64, "--out", out)
    assert result == 0
    table = pd.read_csv(out)
    assert len(table) == 6
    # Same config, different sweeps: adjacent rows with the same config_key.
    assert table["config_key"].tolist() == sorted(table["config_key"].tolist())
    assert table.groupby("config_key")["trainer.dtype"].apply(sorted).tolist() == [["float32", "float64"]] * 3
    f64 = table[table["trainer.dtype"] == "float64"]
    assert set(f64["verdict"]) <= {"equivalent", "identical", "reference"}
    assert (f64["tolerance"].str.startswith("float64")).all()
    # The float64 runs differ from the float32 reference by float32 rounding, no more.
    assert 0 < table["max_abs_diff"].max() < 1e-4


def run_cli_compare(*args):
    return compare.main([str(a) for a in args])


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_launchers_give_the_basic_launchers_comparison(tmp_path, launcher, basic_sweep):
    basic, basic_dir = basic_sweep
    other, other_dir = sweep(tmp_path, launcher, f"hydra/launcher={launcher}", *LAUNCHED)
    assert basic.returncode == 0 and other.returncode == 0, other.stderr[-2000:]
    a, b = pd.read_csv(basic_dir / "comparison.csv"), pd.read_csv(other_dir / "comparison.csv")
    columns = ["backward", "status", "final_loss", "param_sum", "param_sha256", "verdict", "peak_saved_bytes"]
    pd.testing.assert_frame_equal(a[columns], b[columns])


def test_each_distinct_training_runs_once_unless_rerun(tmp_path):
    """full ignores backward.accumulation: at k = 2 and 4 it is one training, run once; its table
    rows show the accumulation it used (1). trainer.rerun=true trains it again."""
    for rerun in (False, True):
        sweep = tmp_path / f"rerun_{rerun}"
        result = run_here("-m", "backward=full,accumulate", "backward.accumulation=2,4", "trainer.steps=3",
                          "data.train_size=256", "data.eval_size=64", f"trainer.rerun={str(rerun).lower()}",
                          f"hydra.sweep.dir={sweep}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        table = pd.read_csv(sweep / "comparison.csv")
        full = table[table["backward"] == "full"]
        assert list(full["backward.accumulation"]) == [1, 1]
        reused = full["reused_from"].dropna().tolist()
        assert reused == ([] if rerun else [Path(full["run_dir"].iloc[0]).name])
        assert table.loc[table["backward"] == "accumulate", "reused_from"].isna().all()
        assert (sweep / Path(full["run_dir"].iloc[1]).name / "params.pt").exists()


def test_a_sweep_across_losses_trains_each_loss_once_per_value_it_reads(tmp_path):
    """loss.gamma is focal's (its class declares it): bce ignores it, so bce at gamma 0 and 2 is one training,
    trained once and reused; focal at gamma 0 and 2 are two."""
    result, sweep_dir = sweep(tmp_path, "losses", "loss=bce,focal", "loss.gamma=0,2", "trainer.steps=3")
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(sweep_dir / "comparison.csv")
    bce, focal = table[table["loss"] == "bce"], table[table["loss"] == "focal"]
    assert bce["reused_from"].notna().sum() == 1 and focal["reused_from"].isna().all()
    assert "loss.gamma=0 is ignored by loss=bce: it applies to loss=focal" in result.stderr
