"""Two chained models: naive, retain_graph, detach, the joint optimizer, and gradient flow."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from runner import api
from runner.components.losses import FocalLoss, softmax_focal_loss
from runner.jobs import exit_code
from runner.training.build import build_training
from tests.conftest import make_config, max_abs_diff, refusal, train

CHAIN = dict(model__name="two_stage", model__outputs=2, loss__name="ce", optim__name="adam", optim__lr=0.001,
             optim__betas=[0.5, 0.999])


@pytest.mark.parametrize("joint,memory", [(False, "first"), (False, "off"), (True, "first")])
def test_naive_is_recorded_as_the_second_backward_error(tmp_path, joint, memory):
    summary, _, _ = train(tmp_path, **CHAIN, backward__name="naive", backward__joint=joint, trainer__memory=memory)
    assert summary["status"] == "error" and summary["steps_done"] == 0
    assert "Trying to backward through the graph a second time" in summary["error"]
    assert "retain_graph=True" in summary["hint"] and "detach()" in summary["hint"]


def test_naive_single_run_exits_non_zero(tmp_path):
    """In-process, as the command line runs it: the recorded error it prints in one line, and its exit
    code (1, as for every failed run: test_cli's test_a_loss_without_backward_is_recorded_as_not_differentiable)."""
    outcome = api.run(api.compose(["model=two_stage", "loss=ce", "backward=naive", "trainer.progress=false"]),
                      tmp_path / "run")
    assert outcome.status == "error" and exit_code(outcome.status, outcome.signum) == 1
    assert "Trying to backward through the graph a second time" in outcome.summary.error


def test_retain_graph_and_detach_agree_bit_for_bit_with_separate_optimizers(tmp_path):
    retain = train(tmp_path, **CHAIN, backward__name="retain_graph")[0]
    detach = train(tmp_path, **CHAIN, backward__name="detach")[0]
    assert retain["status"] == detach["status"] == "ok"
    assert retain["param_sha256"] == detach["param_sha256"]


def test_joint_optimizer_makes_them_differ(tmp_path):
    retain, p_retain, _ = train(tmp_path, **CHAIN, backward__name="retain_graph", backward__joint=True)
    detach, p_detach, _ = train(tmp_path, **CHAIN, backward__name="detach", backward__joint=True)
    assert retain["status"] == detach["status"] == "ok"
    assert retain["param_sha256"] != detach["param_sha256"]
    # Only stage 1 differs: detach keeps stage 2's loss from reaching stage 1's parameters.
    assert max_abs_diff({k: v for k, v in p_retain.items() if k.startswith("stage1")},
                        {k: v for k, v in p_detach.items() if k.startswith("stage1")}) > 1e-4


@pytest.mark.parametrize("style", ["retain_graph", "detach", "retain_graph_joint"])
def test_runner_matches_the_chained_answers_loop(tmp_path, style):
    """The chained-models answer's loop, written by hand on the runner's models and data."""
    steps = 20
    joint = style.endswith("joint")
    strategy = style.replace("_joint", "")
    expected = train(tmp_path, **CHAIN, trainer__steps=steps, backward__name=strategy,
                     backward__joint=joint)[1]
    training = build_training(make_config(**CHAIN))
    model1, model2 = training.model.stage1, training.model.stage2
    optimizer1 = torch.optim.Adam(model1.parameters(), lr=0.001, betas=(0.5, 0.999))
    optimizer2 = torch.optim.Adam(itertools.chain(model1.parameters(), model2.parameters()) if joint
                                  else model2.parameters(), lr=0.001, betas=(0.5, 0.999))
    loss = torch.nn.CrossEntropyLoss()
    for i in range(steps):
        data, label = training.dataset.batch(i)
        a = model1(data)
        b = model2(a.detach() if strategy == "detach" else a)
        l1 = loss(a, label)
        l2 = loss(b, label)
        optimizer2.zero_grad()
        l2.backward(retain_graph=strategy == "retain_graph")
        optimizer2.step()
        optimizer1.zero_grad()
        l1.backward()
        optimizer1.step()
    for name, p in training.model.named_parameters():
        torch.testing.assert_close(expected[name], p.detach(), rtol=0, atol=0)


def test_gradient_flow_shows_detach_cuts_stage2_off_stage1(tmp_path):
    def flow(strategy):
        summary, _, run_dir = train(tmp_path, **CHAIN, backward__name=strategy, trainer__steps=1)
        assert (run_dir / "gradient_flow.csv").exists()
        return {(r["module"], r["component"]): r["receives_gradient"] for r in summary["gradient_flow"]}

    detach, retain = flow("detach"), flow("retain_graph")
    assert detach[("stage1", "stage2")] is False and retain[("stage1", "stage2")] is True
    for table in (detach, retain):
        assert table[("stage1", "stage1")] and table[("stage2", "stage2")]
        assert table[("stage2", "stage1")] is False


def test_chained_strategies_refuse_a_single_model():
    """The command line's own line, in-process (printed with exit 2: tests/test_cli.py::test_bad_input_on_the_command_line_is_exit_2_one_line_and_writes_nothing)."""
    line = refusal("backward=detach")
    assert "backward=detach does not fit model=mlp" in line and "model=two_stage" in line


def test_softmax_focal_loss_matches_the_formula_and_reduces_to_ce():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 4, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 4, (32,), generator=g)
    p_t = torch.softmax(logits, 1).gather(1, targets[:, None]).squeeze(1)
    expected = -0.25 * (1 - p_t) ** 2.0 * torch.log(p_t)
    torch.testing.assert_close(FocalLoss(0.25, 2.0)(logits, targets), expected.mean())
    torch.testing.assert_close(FocalLoss(-1, 0.0)(logits, targets), F.cross_entropy(logits, targets))
    saturated = torch.tensor([[100.0, -100.0], [-100.0, 100.0]], requires_grad=True)
    loss = softmax_focal_loss(saturated, torch.tensor([0, 0]), 0.25, 0.5, "sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(saturated.grad).all()


def test_two_stage_with_focal_and_ce_learns(tmp_path):
    for loss in ("ce", "focal"):
        summary = train(tmp_path, model__name="two_stage", model__outputs=2, loss__name=loss, backward__name="detach")[0]
        assert summary["status"] == "ok" and summary["eval_metric"] == "accuracy"
        assert summary["eval_value"] > 0.8


def test_under_joint_detach_is_still_the_separate_optimizers_training(tmp_path):
    """What actually happens with the itertools.chain caveat on current PyTorch: under detach,
    stage 1's .grad is None (zero_grad sets it to None) when optimizer 2 steps, so optimizer 2
    skips stage 1 and detach+joint is bit for bit detach with separate optimizers. retain_graph+joint
    is the run that changes: optimizer 2 also moves stage 1 with the stage-2 loss's gradient, and
    no in-place error follows, because stage 1's Linear saved its input, not its weight."""
    detach = train(tmp_path, **CHAIN, backward__name="detach", trainer__steps=30)[0]
    detach_joint = train(tmp_path, **CHAIN, backward__name="detach", backward__joint=True, trainer__steps=30)[0]
    retain_joint = train(tmp_path, **CHAIN, backward__name="retain_graph", backward__joint=True, trainer__steps=30)[0]
    assert detach_joint["status"] == retain_joint["status"] == "ok"
    assert detach_joint["param_sha256"] == detach["param_sha256"] != retain_joint["param_sha256"]


def test_separate_on_two_stages_equals_the_summed_backward(tmp_path):
    """One optimizer over both stages: one backward per stage loss then one step is the summed step."""
    full = train(tmp_path, **CHAIN, trainer__steps=30)
    separate = train(tmp_path, **CHAIN, trainer__steps=30, backward__name="separate")
    assert full[0]["status"] == separate[0]["status"] == "ok"
    assert max_abs_diff(full[1], separate[1]) < 1e-6
    import pandas as pd

    columns = set(pd.read_csv(separate[2] / "metrics.csv").columns)
    assert {"loss_stage1", "loss_stage2"} <= columns and not any(c.startswith("grad_cos") for c in columns)


def test_joint_retain_graph_would_be_the_inplace_error_if_stage1_saved_its_weight():
    """Why retain_graph + joint runs: stage 1's Linear saves its input, not its weight, because the
    inputs need no gradient. Give the inputs requires_grad and the same loop hits the in-place error."""
    model1, model2 = torch.nn.Linear(10, 2), torch.nn.Linear(2, 2)
    optimizer1 = torch.optim.Adam(model1.parameters(), lr=0.001, betas=(0.5, 0.999))
    optimizer2 = torch.optim.Adam(itertools.chain(model1.parameters(), model2.parameters()), lr=0.001,
                                  betas=(0.5, 0.999))
    loss = torch.nn.CrossEntropyLoss()
    data, label = torch.randn(4, 10, requires_grad=True), torch.tensor([0, 1, 1, 0])
    a = model1(data)
    b = model2(a)
    l1, l2 = loss(a, label), loss(b, label)
    optimizer2.zero_grad()
    l2.backward(retain_graph=True)
    optimizer2.step()
    optimizer1.zero_grad()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        l1.backward()
