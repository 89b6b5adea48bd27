"""The first-step gradient-flow table: what it shows, and that measuring it leaves no trace."""
import csv

import pytest
import torch

from runner.training.gradflow import COLUMNS, gradient_flow
from tests.conftest import build, run_here, train

MT = dict(model__name="multitask", loss__name="multitask")
CHAIN = dict(model__name="two_stage", model__outputs=2, loss__name="ce", optim__name="adam", optim__lr=0.001,
             optim__betas=[0.5, 0.999])


def table(rows):
    return {(r["module"], r["component"]): r for r in rows}


def test_detach_cuts_the_stage2_loss_off_stage1_and_retain_graph_does_not(tmp_path):
    detach = table(train(tmp_path, **CHAIN, backward__name="detach", trainer__steps=1)[0]["gradient_flow"])
    retain = table(train(tmp_path, **CHAIN, backward__name="retain_graph", trainer__steps=1)[0]["gradient_flow"])
    assert detach[("stage1", "stage2")]["receives_gradient"] is False
    assert detach[("stage1", "stage2")]["grad_norm"] == 0.0
    assert retain[("stage1", "stage2")]["receives_gradient"] is True
    assert retain[("stage1", "stage2")]["grad_norm"] > 0
    for flow in (detach, retain):
        assert flow[("stage1", "stage1")]["grad_norm"] > 0 and flow[("stage2", "stage2")]["grad_norm"] > 0
        assert flow[("stage2", "stage1")]["receives_gradient"] is False  # stage 1's loss is upstream
    # The stage-1 loss reaches stage 1 the same way in both: the cut only concerns stage 2's loss.
    assert detach[("stage1", "stage1")]["grad_norm"] == retain[("stage1", "stage1")]["grad_norm"]


def test_naive_records_the_table_that_explains_its_error(tmp_path):
    """The table comes before training, so the failing run still shows that the stage-2 loss
    reaches stage 1: its backward needs the graph the first backward freed."""
    summary, _, run_dir = train(tmp_path, **CHAIN, backward__name="naive")
    assert summary["status"] == "error"
    assert table(summary["gradient_flow"])[("stage1", "stage2")]["receives_gradient"] is True
    assert (run_dir / "gradient_flow.csv").exists()


def test_multitask_heads_receive_only_their_own_task_and_the_trunk_both(tmp_path):
    flow = table(train(tmp_path, **MT, backward__name="separate", trainer__steps=1)[0]["gradient_flow"])
    assert set(flow) == {(m, c) for m in ("trunk", "cls", "reg") for c in ("cls", "reg")}
    assert flow[("trunk", "cls")]["receives_gradient"] and flow[("trunk", "reg")]["receives_gradient"]
    assert flow[("cls", "cls")]["receives_gradient"] and not flow[("cls", "reg")]["receives_gradient"]
    assert flow[("reg", "reg")]["receives_gradient"] and not flow[("reg", "cls")]["receives_gradient"]


def test_norms_match_an_independent_autograd_computation():
    training = build(**MT)
    inputs, targets = training.dataset.batch(0)
    rows = table(gradient_flow(training.strategy, training.model, training.loss_fn, inputs, targets))
    task_losses = training.loss_fn.parts(training.model(inputs), targets)
    for task in ("cls", "reg"):
        grads = torch.autograd.grad(task_losses[task], list(training.model.trunk.parameters()), retain_graph=True)
        expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
        assert rows[("trunk", task)]["grad_norm"] == pytest.approx(expected, rel=1e-5)


def test_csv_and_summary_hold_the_same_table(tmp_path):
    summary, _, run_dir = train(tmp_path, trainer__steps=1)
    with open(run_dir / "gradient_flow.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    assert [(r["module"], r["component"]) for r in rows] == [("hidden", "loss"), ("out", "loss")]
    for written, recorded in zip(rows, summary["gradient_flow"]):
        assert float(written["grad_norm"]) == recorded["grad_norm"] > 0
        assert written["receives_gradient"] == "True"


def test_learnable_loss_weights_appear_as_the_loss_module(tmp_path):
    flow = table(train(tmp_path, **MT, loss__weighting="uncertainty", trainer__steps=1)[0]["gradient_flow"])
    assert flow[("loss", "cls")]["receives_gradient"] and flow[("loss", "reg")]["receives_gradient"]


def test_measuring_the_flow_leaves_no_trace():
    """Parameters, .grad, BatchNorm statistics and the RNG stream are as they were."""
    training = build(model__batchnorm=True)
    model = training.model
    inputs, targets = training.dataset.batch(0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    rows = gradient_flow(training.strategy, model, training.loss_fn, inputs, targets)
    assert rows and all(r["receives_gradient"] for r in rows)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_a_constant_component_is_a_row_without_gradient():
    class WithConstantPart(torch.nn.Module):
        def parts(self, outputs, targets):
            return {"fit": torch.nn.functional.binary_cross_entropy_with_logits(outputs, targets),
                    "constant": torch.tensor(0.5)}

        def forward(self, outputs, targets):
            return sum(self.parts(outputs, targets).values())

    training = build()
    inputs, targets = training.dataset.batch(0)
    flow = table(gradient_flow(training.strategy, training.model, WithConstantPart(), inputs, targets))
    assert flow[("out", "fit")]["receives_gradient"]
    assert flow[("out", "constant")] == {"module": "out", "component": "constant",
                                         "receives_gradient": False, "grad_norm": 0.0}


def test_the_cli_prints_the_table(tmp_path):
    result = run_here("model=two_stage", "loss=ce", "optim=adam_gan", "backward=detach", "trainer.steps=2",
                      f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "gradient flow, first step" in result.stdout
    cells = {tuple(c.strip() for c in line.strip("│ ").split("│")) for line in result.stdout.splitlines()}
    assert ("stage1", "stage2", "none") in cells  # stage 1 receives nothing from the stage-2 loss
    assert ("stage2", "stage1", "none") in cells  # nor stage 2 from the stage-1 loss, upstream of it
    assert any(c[:2] == ("stage1", "stage1") and c[2] != "none" for c in cells if len(c) == 3)
