"""The command line as a user meets it: outputs, exit codes, bad input, help."""
import json

import pytest
import torch

from runner import api
from runner.jobs import exit_code
from runner.recording import record
from tests.conftest import read_summary, refusal, run_cli


def only_run_dir(base):
    runs = list((base / "outputs" / "runs").iterdir())
    assert len(runs) == 1
    return runs[0]


def test_default_run_from_another_directory_writes_every_record(tmp_path):
    # The same process shows that the training path imports neither pandas nor matplotlib.
    result = run_cli(cwd=tmp_path, env_extra={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "torch" in imported and "hydra" in imported
    assert not imported & {"pandas", "matplotlib"}
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


BAD_INPUT = [
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
]


@pytest.mark.parametrize("args,needle", BAD_INPUT)
def test_bad_input_is_one_clear_message(args, needle):
    """Our range checks and Hydra's own composition errors (unknown option, wrong type) alike: one
    line naming the key, from the command line's own compose, validate and build, in-process
    (runner.api.compose writes nothing). The next test shows that the command line turns each kind
    of refusal into that line on stderr, exit 2 and no folder."""
    assert needle in refusal(*args)


@pytest.mark.parametrize("args,needle,ours", [
    (["loss=nope"], "loss", False),  # Hydra's composition: an unknown option
    (["model.hidden=abc"], "model.hidden", False),  # Hydra's composition: a value of the wrong type
    (["backward=accumulate", "backward.accumulation=0"], "backward.accumulation", True),  # a range check
    # a user's own code that raises, found by the build's probe: one line naming its _target_, with a hint
    (["loss=custom", "loss._target_=torch.nn.BCELoss"], "use loss=bce", True),
])
def test_bad_input_on_the_command_line_is_exit_2_one_line_and_writes_nothing(tmp_path, args, needle, ours):
    """Each kind of refusal through the real command line. Every ConfigError the run's preparation
    raises (validate, the build, its probes) is printed by the same callback, so the in-process
    refusals of the other tests reach a user as exactly this: `error: <the line>`, exit 2, no folder."""
    # ours also into a run folder of their own: it is not created either
    result = run_cli(*args, *([f"hydra.run.dir={tmp_path / 'run'}"] if ours else []), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "run").exists()
    if ours:  # exactly the line runner.api.compose raises
        assert result.stderr.strip() == f"error: {refusal(*args)}"


def test_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "trainer.device=cuda" in refusal("trainer.device=cuda")


def test_help_lists_groups_and_options():
    result = run_cli("--help")
    assert result.returncode == 0
    for text in ("backward-lab", "backward: accumulate, detach, full, gradcache, naive, retain_graph, separate, sum",
                 "loss: bce, ce, custom, dpo, focal, grpo, infonce, lm, multitask",
                 "model: cnn, custom, dual_encoder, mlp, moe, multitask, seq, two_stage",
                 "optim: adam, adam_gan, adam_l2, adamw, rmsprop, sgd",
                 "data: csv, default, imbalanced, pairs, preference_pairs, rollouts, seq, tensors, text",
                 "loop: accelerate, custom, deepspeed, hf_trainer, lightning, runner"):
        assert text in result.stdout, text
    assert "base_config" not in result.stdout
    # the key reference, generated from the schema (tests/test_reference.py checks its content)
    assert "  loss.normalize = tokens    allowed: tokens | micro_batch | sequence | double" in result.stdout
    assert [line for line in result.stdout.splitlines() if len(line) > 100] == []


@pytest.mark.parametrize("cls,why", [("ItemLoss", "not a tensor"), ("ArgmaxLoss", "no grad_fn")])
def test_non_differentiable_custom_loss_fails_before_training(tmp_path, cls, why):
    """Recorded as the run's error before its first step, in-process; the command line prints that
    error in one line and exits 1 (test_a_loss_without_backward_is_recorded_as_not_differentiable)."""
    training = api.compose(["loss=custom", f"loss._target_=tests.custom_losses.{cls}", "trainer.progress=false"])
    run_dir = tmp_path / "run"
    outcome = api.run(training, run_dir)
    assert outcome.status == "error" and exit_code(outcome.status, outcome.signum) == 1
    assert "not differentiable" in outcome.summary.error and why in outcome.summary.error
    summary = read_summary(run_dir)
    assert summary["status"] == "error" and summary["steps_done"] == 0
    assert not (run_dir / "metrics.csv").exists() and not (run_dir / "params.pt").exists()


def test_custom_loss_arguments(tmp_path):
    result = run_cli("loss=custom", "loss._target_=tests.custom_losses.ScaledBCE", "+loss.scale=2.0",
                     "trainer.steps=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    scaled = read_summary(only_run_dir(tmp_path))
    assert scaled["config"]["loss"]["scale"] == 2.0
    # The plain run in-process: the command line's own compose and build (runner.api).
    plain = api.run(api.compose(["trainer.steps=5", "trainer.progress=false"]), tmp_path / "plain")
    assert plain.status == "ok"
    # Step 1's loss is the same BCE, doubled.
    import pandas as pd

    a = pd.read_csv(only_run_dir(tmp_path) / "metrics.csv")["loss"][0]
    b = pd.read_csv(tmp_path / "plain" / "metrics.csv")["loss"][0]
    assert a == pytest.approx(2 * b, rel=1e-6)


@pytest.mark.parametrize("target,needle,hint", [
    # a wrong call signature: Identity takes one input, a loss is called with two
    ("torch.nn.Identity", "raised TypeError", None),
    # the accumulation answer's own loss, on the logits our models output
    ("torch.nn.BCELoss", "all elements of input should be between 0 and 1", "use loss=bce"),
])
def test_a_user_loss_that_raises_is_one_line_and_exit_2(target, needle, hint):
    """One line naming its _target_, before anything is written; on the command line that line,
    exit 2 and no folder (test_bad_input_on_the_command_line_is_exit_2_one_line_and_writes_nothing)."""
    line = refusal("loss=custom", f"loss._target_={target}")
    assert line.startswith(f"loss._target_={target}") and needle in line
    assert hint is None or hint in line


def test_a_loss_without_backward_is_recorded_as_not_differentiable(tmp_path):
    """The custom-loss answer's own example: a custom autograd.Function that defines no backward."""
    result = run_cli("loss=custom", "loss._target_=runner.experiments.custom_loss.NoBackwardF1Loss", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not differentiable: _DoubleWithoutBackward has no backward" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    run_dir = only_run_dir(tmp_path)
    summary = read_summary(run_dir)
    assert summary["status"] == "error" and summary["steps_done"] == 0
    assert "_DoubleWithoutBackward has no backward" in summary["error"]
    assert not (run_dir / "metrics.csv").exists() and not (run_dir / "params.pt").exists()


def test_an_unknown_loss_target_names_the_key():
    assert "loss._target_=nowhere.Loss: cannot import it" in refusal("loss=custom", "loss._target_=nowhere.Loss")
    assert "cannot build it with {'nope': 1}" in refusal(
        "loss=custom", "loss._target_=runner.experiments.custom_loss.SoftF1Loss", "+loss.nope=1")
