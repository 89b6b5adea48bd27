"""Multi-task losses: summed vs separate backward, stepping per task, re-forwarding."""
import pytest
import torch
import torch.nn.functional as F

from runner.losses import MultiTaskLoss
from runner.parts import build_parts
from tests.conftest import assert_params_close, make_config, max_abs_diff, run_cli, train

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


def test_step_per_task_on_a_deep_trunk_is_the_inplace_error(tmp_path):
    summary, _, run_dir = train(tmp_path, **MT, backward__name="separate", backward__step_per_task=True)
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
        parts = build_parts(make_config(**MT))
        model, alpha, beta = parts.model, 0.5, 0.5
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for step in range(steps):
            inputs, (class_targets, regress_targets) = (lambda b: (b[0], (b[1]["cls"], b[1]["reg"])))(
                parts.dataset.batch(step))
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
    parts = build_parts(make_config(**MT))
    inputs, targets = parts.dataset.batch(0)
    task_losses = parts.loss_fn.parts(parts.model(inputs), targets)
    trunk = list(parts.model.trunk.parameters())
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
    parts = build_parts(make_config(**MT, loss__weighting="uncertainty", optim__name="adam",
                                    optim__lr=0.01, trainer__steps=30))
    from runner.train import run

    assert run(parts, tmp_path).status == "ok"
    assert parts.loss_fn.log_vars.detach().abs().min() > 0.05  # moved away from their start at 0


@pytest.mark.parametrize("args,needle", [
    (["backward=separate"], "backward=separate does not fit loss=bce"),
    (["loss=multitask"], "loss=multitask does not fit model=mlp"),
])
def test_misfits_are_one_line_before_training(tmp_path, args, needle):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2 and needle in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "outputs").exists()


def test_a_switch_for_another_strategy_is_ignored_with_a_warning(tmp_path):
    result = run_cli("backward.step_per_task=true", "trainer.steps=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning: backward.step_per_task=true is ignored by backward=full" in result.stderr
