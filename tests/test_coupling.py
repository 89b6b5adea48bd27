"""Batch coupling and randomness, found before training: BatchNorm mixes the examples of a batch,
dropout draws masks, and micro-batches then cannot equal the batch. Said in advance, recorded,
and given as the reason of every comparison that differs."""
import subprocess
import sys

import pytest
import torch
from torch import nn

from runner import record
from runner.analysis.claims import evaluate_claims
from runner.analysis.runs import compare_to, find_runs
from runner.experiments.examples.tabular import TabularNet
from runner.record import Summary
from runner.training.checks import probe_coupling
from tests.conftest import ROOT, read_summary, run_cli, train


class CentreTheBatch(nn.Module):
    """Mixes examples with no registered module type: subtracts the batch mean."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        return self.fc(x - x.mean(0, keepdim=True))


@pytest.mark.parametrize("model,coupled,stochastic,modules", [
    (TabularNet(4), False, False, []),
    (TabularNet(4, batchnorm=True), True, False, ["bn1: BatchNorm1d"]),
    (TabularNet(4, dropout=0.5), False, True, ["drop: Dropout"]),
    (TabularNet(4, batchnorm=True, dropout=0.5), True, True, ["bn1: BatchNorm1d", "drop: Dropout"]),
    (CentreTheBatch(), True, False, []),
])
def test_the_probe_finds_coupling_and_randomness_and_names_the_modules(model, coupled, stochastic, modules):
    inputs = torch.randn(8, 4)
    found = probe_coupling(model, inputs)
    assert (found.batch_coupled, found.stochastic, found.modules) == (coupled, stochastic, modules)
    reason = record.expected_difference(found.batch_coupled, found.stochastic, found.modules)
    assert (reason is None) == (not coupled and not stochastic)
    if isinstance(model, CentreTheBatch):
        assert reason == "batch-coupled: unnamed modules"


def test_the_probe_leaves_no_trace():
    model = TabularNet(4, batchnorm=True, dropout=0.5)
    model.eval()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = torch.randn(8, 4)
    rng = torch.get_rng_state()
    probe_coupling(model, inputs)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    assert model.bn1.num_batches_tracked.item() == 0 and not model.training
    assert all(p.grad is None for p in model.parameters())


def test_a_coupled_runs_comparison_says_why_and_an_equivalent_claim_fails_with_it(tmp_path):
    base = dict(model__batchnorm=True, trainer__steps=20)
    for name, overrides in {"full": {}, "accumulate": dict(backward__name="accumulate", backward__accumulation=4)}.items():
        summary, _, run_dir = train(tmp_path / name, **base, **overrides)
        assert summary["batch_coupled"] is True and summary["coupling_modules"] == ["norm: BatchNorm1d"]
        summary["choices"] = {"backward": overrides.get("backward__name", "full")}
        record.write_summary(run_dir, Summary(**summary))
    runs = find_runs([tmp_path])
    full, accumulate = sorted(runs, key=lambda r: r.keys["backward"] != "full")
    verdict = compare_to(accumulate, full, {})
    assert verdict.verdict == "differs (expected: batch-coupled: norm)" and verdict.max_abs_diff > 1e-3
    (claim,) = evaluate_claims([{"kind": "equivalent", "runs": {"backward": "accumulate"},
                                 "reference": {"backward": "full"}}], runs)
    assert not claim.holds and "expected: batch-coupled: norm" in claim.detail
    (claim,) = evaluate_claims([{"kind": "differs", "runs": {"backward": "accumulate"},
                                 "reference": {"backward": "full"}}], runs)
    assert claim.holds


def test_a_single_run_says_so_before_training(tmp_path):
    result = run_cli("model.batchnorm=true", "backward=accumulate", "trainer.steps=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "note: micro-batches cannot give the full batch's gradient with this model (batch-coupled: norm)" \
        in result.stderr


def audit(tmp_path, name, *args):
    sweep_dir = tmp_path / name
    result = run_cli("-m", "experiment=audit", "model=custom",
                     "model._target_=runner.experiments.examples.tabular.TabularNet", "+model.in_features=30",
                     "data=csv", f"data.path={tmp_path / 'breast_cancer.csv'}", "data.target=malignant",
                     "trainer.steps=30", f"hydra.sweep.dir={sweep_dir}", *args, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, sweep_dir


def test_the_audit_runs_on_the_worked_example(tmp_path):
    pytest.importorskip("sklearn", reason="the worked example's data set comes from scikit-learn (examples extra)")
    export = subprocess.run([sys.executable, "-m", "runner.experiments.examples.breast_cancer",
                             str(tmp_path / "breast_cancer.csv")], capture_output=True, text=True, cwd=ROOT)
    assert export.returncode == 0, export.stderr
    result, sweep_dir = audit(tmp_path, "plain", "backward.accumulation=2,8")
    lines = [line.strip() for line in result.stdout.splitlines() if line.startswith("  backward=")]
    assert len(lines) == 5  # every run but the reference
    assert all(": equivalent" in line or ": identical" in line for line in lines), lines
    assert any("backward=accumulate, backward.accumulation=8: equivalent" in line and "0.1" in line for line in lines)

    result, sweep_dir = audit(tmp_path, "bn", "model.batchnorm=true", "backward.accumulation=8")  # 3 jobs suffice
    lines = [line.strip() for line in result.stdout.splitlines() if line.startswith("  backward=")]
    micro = [line for line in lines if not line.startswith("backward=full")]
    assert len(micro) == 2 and all("differs (expected: batch-coupled: bn1)" in line for line in micro), micro
    (job,) = [p for p in sweep_dir.iterdir() if p.name.startswith("0_")]
    summary = read_summary(job)
    assert summary["batch_coupled"] is True and summary["coupling_modules"] == ["bn1: BatchNorm1d"]
