"""Multi-task losses: summed vs separate backward, stepping per task, re-forwarding."""
import re

import pytest
import torch
import torch.nn.functional as F

from runner import api
from runner.components.losses import MultiTaskLoss
from tests.conftest import (
    assert_params_close,
    build,
    max_abs_diff,
    refusal,
    run_here,
    train,
)

F32 = dict(rtol=1.3e-6, atol=1e-5)
MT = dict(model__name="multitask", loss__name="multitask")


def test_separate_backward_equals_summed_backward(tmp_path):
    summed, p_sum, _ = train(tmp_path, **MT)
    separate, p_sep, run_dir = train(tmp_path, **MT, backward__name="separate")
    assert summed["status"] == separate["status"] == "ok"
    assert_params_close(p_sep, p_sum, **F32)
    import pandas as pd

    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert {"loss_cls", "loss_reg", "grad_cos_cls_reg"} <= set(metrics.columns)
    torch.testing.assert_close(torch.tensor(metrics["loss"].values),
                               torch.tensor((metrics["loss_cls"] + metrics["loss_reg"]).values))


def test_accumulate_with_multitask_loss_is_also_equivalent(tmp_path):
    p_sum = train(tmp_path, **MT)[1]
    p_acc = train(tmp_path, **MT, backward__name="accumulate", backward__accumulation=4)[1]
    assert_params_close(p_acc, p_sum, **F32)


@pytest.mark.parametrize("memory", ["first", "off"])  # the meter's own check, and autograd's
def test_step_per_task_on_a_deep_trunk_is_the_inplace_error(tmp_path, memory):
    summary, _, run_dir = train(tmp_path, **MT, backward__name="separate", backward__step_per_task=True,
                                trainer__memory=memory)
    assert summary["status"] == "error" and summary["steps_done"] == 0
    assert "modified by an inplace operation" in summary["error"]
    assert "reforward" in summary["hint"]


def test_step_per_task_on_a_one_layer_trunk_runs_and_differs(tmp_path):
    p_sum = train(tmp_path, **MT, model__depth=1)[1]
    summary, p_step, _ = train(tmp_path, **MT, model__depth=1, backward__name="separate",
                               backward__step_per_task=True)
    assert summary["status"] == "ok"
    assert max_abs_diff(p_step, p_sum) > 1e-3


def test_reforward_runs_and_differs_from_summed(tmp_path):
    p_sum = train(tmp_path, **MT)[1]
    summary, p_ref, _ = train(tmp_path, **MT, backward__name="separate", backward__reforward=True)
    assert summary["status"] == "ok"
    assert max_abs_diff(p_ref, p_sum) > 1e-3


def test_runner_matches_the_multitask_answers_loops(tmp_path):
    """The multi-task answer's loops (one weighted sum and one backward; or one backward per task
    with retain_graph and a single step), written by hand on the runner's model and data."""
    steps = 20
    runner_sum = train(tmp_path, **MT, trainer__steps=steps)[1]
    runner_sep = train(tmp_path, **MT, trainer__steps=steps, backward__name="separate")[1]
    for style, expected in (("sum", runner_sum), ("separate", runner_sep)):
        training = build(**MT)
        model, alpha, beta = training.model, 0.5, 0.5
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for step in range(steps):
            inputs, (class_targets, regress_targets) = (lambda b: (b[0], (b[1]["cls"], b[1]["reg"])))(
                training.dataset.batch(step))
            outputs = model(inputs)
            class_outputs, regress_outputs = outputs["cls"], outputs["reg"]
            class_loss = alpha * F.binary_cross_entropy_with_logits(class_outputs, class_targets)
            regress_loss = beta * F.mse_loss(regress_outputs, regress_targets)
            optimizer.zero_grad()
            if style == "sum":
                (class_loss + regress_loss).backward()
            else:
                class_loss.backward(retain_graph=True)
                regress_loss.backward()
            optimizer.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(expected[name], p.detach(), rtol=0, atol=0)


def test_gradient_cosine_matches_an_independent_computation(tmp_path):
    import pandas as pd

    _, _, run_dir = train(tmp_path, **MT, backward__name="separate", trainer__steps=1)
    training = build(**MT)
    inputs, targets = training.dataset.batch(0)
    task_losses = training.loss_fn.parts(training.model(inputs), targets)
    trunk = list(training.model.trunk.parameters())
    g_cls = torch.cat([g.flatten() for g in torch.autograd.grad(task_losses["cls"], trunk, retain_graph=True)])
    g_reg = torch.cat([g.flatten() for g in torch.autograd.grad(task_losses["reg"], trunk)])
    expected = F.cosine_similarity(g_cls, g_reg, dim=0).item()
    assert pd.read_csv(run_dir / "metrics.csv")["grad_cos_cls_reg"][0] == pytest.approx(expected, abs=1e-6)


def test_fixed_weights_and_uncertainty_weighting_formulas():
    g = torch.Generator().manual_seed(0)
    outputs = {"cls": torch.randn(16, 1, generator=g), "reg": torch.randn(16, 1, generator=g)}
    targets = {"cls": (torch.rand(16, 1, generator=g) < 0.5).float(), "reg": torch.randn(16, 1, generator=g)}
    l_cls = F.binary_cross_entropy_with_logits(outputs["cls"], targets["cls"])
    l_reg = F.mse_loss(outputs["reg"], targets["reg"])
    fixed = MultiTaskLoss({"cls": 0.2, "reg": 3.0})
    torch.testing.assert_close(fixed(outputs, targets), 0.2 * l_cls + 3.0 * l_reg)
    learned = MultiTaskLoss(weighting="uncertainty")
    with torch.no_grad():
        learned.log_vars.copy_(torch.tensor([0.5, -1.0]))
    # Kendall et al. 2018 with s = log sigma^2: exp(-s) L + s/2 (classification), exp(-s) L / 2 + s/2 (regression)
    expected = torch.exp(torch.tensor(-0.5)) * l_cls + 0.25 + 0.5 * torch.exp(torch.tensor(1.0)) * l_reg - 0.5
    torch.testing.assert_close(learned(outputs, targets), expected)
    with pytest.raises(ValueError, match="loss.weights"):
        MultiTaskLoss({"depth": 1.0})
    with pytest.raises(ValueError, match="loss.weighting"):
        MultiTaskLoss(weighting="magic")


def test_uncertainty_weights_are_trained(tmp_path):
    training = build(**MT, loss__weighting="uncertainty", optim__name="adam",
                                    optim__lr=0.01, trainer__steps=30)
    from runner.training.train import run

    assert run(training, tmp_path).status == "ok"
    assert training.loss_fn.log_vars.detach().abs().min() > 0.05  # moved away from their start at 0


@pytest.mark.parametrize("args,needle", [
    (["backward=separate"], "backward=separate does not fit loss=bce"),
    (["loss=multitask"], "loss=multitask does not fit model=mlp"),
])
def test_misfits_are_one_line_before_training(args, needle):
    """In-process, the command line's own line (which it prints, exiting 2 with no folder: tests/test_cli.py)."""
    assert needle in refusal(*args)


def test_a_switch_for_another_strategy_is_ignored_with_a_warning(tmp_path):
    """In-process: the warnings the command line prints before training as `warning: ...` lines
    (on the command line: tests/test_hf_data.py::test_a_bad_cell_warns_on_the_command_line_before_training)."""
    training = api.compose(["backward.step_per_task=true", "trainer.steps=2", "trainer.progress=false"])
    assert any(w.startswith("backward.step_per_task=true is ignored by backward=full") for w in training.warnings())
    assert api.run(training, tmp_path / "run").status == "ok"


def test_uncertainty_weighting_separate_equals_summed(tmp_path):
    mt = dict(MT, loss__weighting="uncertainty", trainer__steps=30)
    p_sum = train(tmp_path, **mt)[1]
    p_sep = train(tmp_path, **mt, backward__name="separate")[1]
    assert_params_close(p_sep, p_sum, **F32)


def answer_batches(training, steps):
    for step in range(steps):
        inputs, targets = training.dataset.batch(step)
        yield inputs, targets["cls"], targets["reg"]


def answer_step_per_task(model, optimizer, inputs, class_targets, regress_targets):
    """The multi-task answer's second snippet: a backward and a step per task on one forward."""
    outputs = model(inputs)
    class_loss = F.binary_cross_entropy_with_logits(outputs["cls"], class_targets)
    regress_loss = F.mse_loss(outputs["reg"], regress_targets)
    optimizer.zero_grad()
    class_loss.backward(retain_graph=True)
    optimizer.step()
    optimizer.zero_grad()
    regress_loss.backward()  # on a deep trunk: the in-place error, the step changed saved weights
    optimizer.step()


def test_the_answers_step_per_task_snippet_matches_the_runner_on_a_one_layer_trunk(tmp_path):
    """The multi-task answer's second snippet (unweighted task losses: weights 1/1 here), by hand."""
    # lr 0.1: unweighted, the sum of the two task losses diverges at the default lr of 0.5.
    steps, mt = 20, dict(MT, model__depth=1, loss__weights={"cls": 1.0, "reg": 1.0}, optim__lr=0.1)
    summary, expected, _ = train(tmp_path, **mt, trainer__steps=steps, backward__name="separate",
                                 backward__step_per_task=True)
    assert summary["status"] == "ok"
    training = build(**mt)
    model = training.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for inputs, class_targets, regress_targets in answer_batches(training, steps):
        answer_step_per_task(model, optimizer, inputs, class_targets, regress_targets)
    for name, p in model.named_parameters():
        torch.testing.assert_close(expected[name], p.detach(), rtol=0, atol=0)


def test_the_answers_step_per_task_snippet_fails_by_hand_on_a_deep_trunk():
    """The runner's recorded error is PyTorch's own: the same snippet fails outside the runner."""
    training = build(**MT)
    model = training.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    inputs, class_targets, regress_targets = next(answer_batches(training, 1))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        answer_step_per_task(model, optimizer, inputs, class_targets, regress_targets)


def test_reforward_matches_a_dcgan_style_loop(tmp_path):
    """Step per task with a fresh forward each time, as PyTorch's DCGAN example updates D then G."""
    steps = 20
    expected = train(tmp_path, **MT, trainer__steps=steps, backward__name="separate", backward__reforward=True)[1]
    training = build(**MT)
    model = training.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for inputs, class_targets, regress_targets in answer_batches(training, steps):
        optimizer.zero_grad()
        class_loss = 0.5 * F.binary_cross_entropy_with_logits(model(inputs)["cls"], class_targets)
        class_loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        regress_loss = 0.5 * F.mse_loss(model(inputs)["reg"], regress_targets)
        regress_loss.backward()
        optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(expected[name], p.detach(), rtol=0, atol=0)


def test_step_per_task_single_run_exits_non_zero_with_the_hint(tmp_path):
    result = run_here("model=multitask", "loss=multitask", "backward=separate", "backward.step_per_task=true",
                      f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 1
    assert "modified by an inplace operation" in result.stderr and "Traceback" not in result.stderr
    assert "reforward" in result.stdout  # the hint, in the printed summary


@pytest.mark.parametrize("overrides,needle", [
    (dict(loss__name="bce"), "loss=bce does not fit model=multitask (multitask targets): expected loss=multitask"),
    (dict(backward__name="naive"), "backward=naive does not fit model=multitask"),
    (dict(model__depth=0), "model.depth=0 is not allowed"),
    (dict(loss__weights={"depth": 1.0}), "loss.weights has unknown task"),
    (dict(loss__weighting="learned"), "loss.weighting=learned is not allowed"),
])
def test_more_misfits_are_refused_before_training(overrides, needle):
    from runner.config.schema import ConfigError
    with pytest.raises(ConfigError, match=re.escape(needle)):
        build(**{**MT, **overrides})
