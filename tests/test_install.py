"""`pip install .` (not editable) gives a package that finds its configs and experiments anywhere."""
import os
import shutil
import subprocess
import sys
import zipfile

import pandas as pd

from tests.conftest import ROOT


def test_a_wheel_install_answers_an_experiment_from_an_empty_folder(tmp_path):
    source = tmp_path / "source"  # a clean copy: the build leaves nothing in the checkout
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "outputs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "runner/conf/config.yaml" in names and "runner/conf/experiment/uneven.yaml" in names
    assert "runner/experiments/custom_loss.py" in names
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]

    empty = tmp_path / "empty"
    empty.mkdir()
    # The installed copy comes first on the path: the checkout is neither the working directory
    # nor on PYTHONPATH, so only what the wheel holds can answer.
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("HYDRA_FULL_ERROR", None)
    where = subprocess.run([sys.executable, "-c", "import runner.cli; print(runner.cli.CONF_DIR)"], cwd=empty,
                           env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(site / "runner" / "conf"), where.stderr
    result = subprocess.run([sys.executable, "-m", "runner", "-m", "experiment=uneven", "trainer.steps=5",
                             "hydra.sweep.dir=sweep"], cwd=empty, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert sum(line.startswith("holds") for line in result.stdout.splitlines()) == 2
    table = pd.read_csv(empty / "sweep" / "comparison.csv")
    assert len(table) == 6 and set(table["status"]) == {"ok"}
