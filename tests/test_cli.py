"""The command line as a user meets it: outputs, exit codes, bad input, help."""
import json

import pytest
import torch

from runner.recording import record
from tests.conftest import read_summary, run_cli


def only_run_dir(base):
    runs = list((base / "outputs" / "runs").iterdir())
    assert len(runs) == 1
    return runs[0]


def test_default_run_from_another_directory_writes_every_record(tmp_path):
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    assert {"metrics.csv", "summary.json", "params.pt"} <= {p.name for p in run_dir.iterdir()}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps_done"] == 100
    assert summary["choices"] == {"model": "mlp", "data": "default", "loss": "bce",
                                  "backward": "full", "optim": "sgd"}
    for key in ("error", "final_loss", "param_sum", "param_sha256", "peak_saved_bytes", "wall_s",
                "device", "torch_version", "seed", "overrides", "eval_value"):
        assert key in summary
    import pandas as pd

    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics.columns[:5]) == ["step", "loss", "grad_norm", "param_sum", "time_s"]
    assert metrics["step"].tolist() == list(range(1, 101))
    # The loss falls within the default 100 steps and the held-out AP is well above chance.
    assert metrics["loss"].tail(10).mean() < 0.85 * metrics["loss"].head(10).mean()
    assert summary["eval_value"] > 0.75
    assert metrics["param_sum"].iloc[-1] == summary["param_sum"]
    # params.pt loads safely, and param_sha256 hashes exactly its parameters.
    state = torch.load(run_dir / "params.pt", weights_only=True)
    model = torch.nn.Module()
    for name, tensor in state.items():
        *path, leaf = name.split(".")
        node = model
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(tensor))
    assert record.param_sha256(model) == summary["param_sha256"]
    assert "run dir" in result.stdout


def test_focal_with_accumulate(tmp_path):
    result = run_cli("loss=focal", "backward=accumulate", "backward.accumulation=4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = read_summary(only_run_dir(tmp_path))
    assert summary["status"] == "ok" and summary["accumulation"] == 4
    assert summary["config"]["loss"]["gamma"] == 2.0
    assert summary["overrides"] == ["loss=focal", "backward=accumulate", "backward.accumulation=4"]


@pytest.mark.parametrize("args,needle", [
    (["backward=accumulate", "backward.accumulation=0"], "backward.accumulation"),
    (["backward=sum", "backward.accumulation=33"], "backward.accumulation"),
    (["loss=focal", "loss.alpha=1.5"], "loss.alpha"),
    (["loss=focal", "loss.gamma=-1"], "loss.gamma"),
    (["trainer.steps=0"], "trainer.steps"),
    (["data.batch_size=0"], "data.batch_size"),
    (["trainer.dtype=float16"], "trainer.dtype"),
    (["trainer.device=tpu"], "trainer.device"),
    (["model.hidden=abc"], "model.hidden"),
    (["loss=nope"], "loss"),
    (["loss.reduction=none"], "loss.reduction"),
    (["loss=custom"], "loss._target_"),
    (["model=seq", "data=seq", "loss=lm", "loss.normalize=avg"], "loss.normalize"),
    (["data.micro_batch_size=0"], "data.micro_batch_size=0 is not allowed"),
    (["trainer.autocast=fp8"], "trainer.autocast"),
    (["trainer.processes=0"], "trainer.processes=0 is not allowed"),
    (["backward=accumulate", "backward.sync=sometimes"], "backward.sync"),
    (["trainer.processes=2", "backward=accumulate", "backward.accumulation=4", "data.batch_size=6"],
     "trainer.processes=2 is not allowed with data.batch_size=6 and backward.accumulation=4"),
])
def test_bad_input_is_one_clear_message_and_writes_nothing(tmp_path, args, needle):
    """Our range checks and Hydra's own composition errors (unknown option, wrong type) alike."""
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "outputs").exists()


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_cli("trainer.device=cuda", cwd=tmp_path)
    assert result.returncode == 2 and "trainer.device=cuda" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_groups_and_options():
    result = run_cli("--help")
    assert result.returncode == 0
    for text in ("backward-lab", "backward: accumulate, detach, full, gradcache, naive, retain_graph, separate, sum",
                 "loss: bce, ce, custom, focal, infonce, lm, multitask",
                 "model: cnn, custom, dual_encoder, mlp, moe, multitask, seq, two_stage",
                 "optim: adam, adam_gan, adam_l2, adamw, rmsprop, sgd",
                 "data: csv, default, imbalanced, pairs, seq, tensors"):
        assert text in result.stdout, text
    assert "base_config" not in result.stdout
    # the key reference, generated from the schema (tests/test_reference.py checks its content)
    assert "  loss.normalize = tokens    allowed: tokens | micro_batch | sequence | double" in result.stdout
    assert [line for line in result.stdout.splitlines() if len(line) > 100] == []


@pytest.mark.parametrize("cls,why", [("ItemLoss", "not a tensor"), ("ArgmaxLoss", "no grad_fn")])
def test_non_differentiable_custom_loss_fails_before_training(tmp_path, cls, why):
    result = run_cli("loss=custom", f"loss._target_=tests.custom_losses.{cls}", cwd=tmp_path)
    assert result.returncode == 1
    assert "not differentiable" in result.stderr and why in result.stderr
    assert "Traceback" not in result.stderr
    run_dir = only_run_dir(tmp_path)
    summary = read_summary(run_dir)
    assert summary["status"] == "error" and summary["steps_done"] == 0
    assert not (run_dir / "metrics.csv").exists() and not (run_dir / "params.pt").exists()


def test_custom_loss_arguments(tmp_path):
    result = run_cli("loss=custom", "loss._target_=tests.custom_losses.ScaledBCE", "+loss.scale=2.0",
                     "trainer.steps=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    scaled = read_summary(only_run_dir(tmp_path))
    assert scaled["config"]["loss"]["scale"] == 2.0
    (tmp_path / "plain").mkdir()
    plain = run_cli("trainer.steps=5", cwd=tmp_path / "plain")
    assert plain.returncode == 0
    first_loss = read_summary(only_run_dir(tmp_path / "plain"))
    # Step 1's loss is the same BCE, doubled.
    import pandas as pd

    a = pd.read_csv(only_run_dir(tmp_path) / "metrics.csv")["loss"][0]
    b = pd.read_csv(only_run_dir(tmp_path / "plain") / "metrics.csv")["loss"][0]
    assert a == pytest.approx(2 * b, rel=1e-6) and first_loss["status"] == "ok"


def test_training_path_does_not_import_pandas_or_matplotlib(tmp_path):
    result = run_cli("trainer.steps=2", cwd=tmp_path, env_extra={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "torch" in imported and "hydra" in imported
    assert not imported & {"pandas", "matplotlib"}


@pytest.mark.parametrize("target,needle,hint", [
    # a wrong call signature: Identity takes one input, a loss is called with two
    ("torch.nn.Identity", "raised TypeError", None),
    # the accumulation answer's own loss, on the logits our models output
    ("torch.nn.BCELoss", "all elements of input should be between 0 and 1", "use loss=bce"),
])
def test_a_user_loss_that_raises_is_one_line_and_exit_2(tmp_path, target, needle, hint):
    result = run_cli("loss=custom", f"loss._target_={target}", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: loss._target_={target}") and needle in lines[0]
    assert hint is None or hint in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "outputs").exists()  # nothing presented as a result


def test_a_loss_without_backward_is_recorded_as_not_differentiable(tmp_path):
    """The custom-loss answer's own example: a custom autograd.Function that defines no backward."""
    result = run_cli("loss=custom", "loss._target_=runner.experiments.custom_loss.NoBackwardF1Loss", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not differentiable: _DoubleWithoutBackward has no backward" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    summary = read_summary(only_run_dir(tmp_path))
    assert summary["status"] == "error" and summary["steps_done"] == 0
    assert "_DoubleWithoutBackward has no backward" in summary["error"]


def test_an_unknown_loss_target_names_the_key(tmp_path):
    result = run_cli("loss=custom", "loss._target_=nowhere.Loss", cwd=tmp_path)
    assert result.returncode == 2 and "loss._target_=nowhere.Loss: cannot import it" in result.stderr
    result = run_cli("loss=custom", "loss._target_=runner.experiments.custom_loss.SoftF1Loss", "+loss.nope=1",
                     cwd=tmp_path)
    assert result.returncode == 2 and "cannot build it with {'nope': 1}" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "outputs").exists()


def test_make_run_prints_the_default_comparisons_verdicts(tmp_path):
    import subprocess

    from tests.conftest import ROOT

    sweep_dir = tmp_path / "default"
    result = subprocess.run(["make", "-s", "run", f"ARGS=hydra.sweep.dir={sweep_dir}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert sum(line.startswith("holds") for line in result.stdout.splitlines()) == 3
    assert "FAILS" not in result.stdout
    for strategy in ("full", "sum", "accumulate"):
        assert strategy in result.stdout
    assert "equivalent" in result.stdout and (sweep_dir / "loss_curves.png").exists()
