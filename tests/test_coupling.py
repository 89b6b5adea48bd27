"""Batch coupling and randomness, found before training: BatchNorm mixes the examples of a batch,
dropout draws masks, and micro-batches then cannot equal the batch. Said in advance, recorded,
and given as the reason of every comparison that differs."""

import pytest
import torch
from runner.experiments.examples.tabular import TabularNet
from torch import nn

from runner.analysis.claims import evaluate_claims
from runner.analysis.runs import compare_to, find_runs
from runner.recording import record
from runner.recording.record import Summary
from runner.training.checks import probe_coupling
from tests.conftest import read_summary, run_cli, run_here, train


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


class MixTheTokens(nn.Module):
    """Token inputs whose embeddings are mixed across the batch (the batch mean added)."""

    def __init__(self):
        super().__init__()
        self.embed, self.out = nn.Embedding(5, 4), nn.Linear(4, 5)

    def forward(self, tokens):
        x = self.embed(tokens)
        return self.out(x + x.mean(0, keepdim=True))


class CountTheTokens(nn.Module):
    """Integer inputs and no embedding: nothing to take a gradient of."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 1)

    def forward(self, tokens):
        return self.fc(tokens.float())


def _token_models():
    from runner.components.models import CausalLM, MoELM

    torch.manual_seed(0)
    yield "seq gru", CausalLM(vocab=5), False
    yield "seq transformer", CausalLM(vocab=5, cell="transformer"), False
    yield "moe", MoELM(vocab=5), False
    yield "mixed embeddings", MixTheTokens(), True
    yield "no embedding", CountTheTokens(), None


@pytest.mark.parametrize("case", list(_token_models()), ids=lambda case: case[0])
def test_the_probe_decides_token_models_at_their_embedding_and_leaves_no_trace(case):
    _, model, coupled = case
    tokens = torch.randint(5, (8, 6), generator=torch.Generator().manual_seed(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert probe_coupling(model, tokens).batch_coupled is coupled
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())  # the probe's hooks are gone


@pytest.mark.parametrize("overrides", [["model=seq", "data=seq", "loss=lm"], ["model=moe", "data=seq", "loss=lm"]])
def test_a_token_model_is_probed_before_training(overrides):
    from runner import api

    training = api.compose(overrides + ["trainer.steps=1"])
    assert training.findings.coupling.batch_coupled is False and training.findings.coupling.modules == []


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
    result = run_here("-m", "experiment=audit", "model=custom",
                      "model._target_=runner.experiments.examples.tabular.TabularNet", "+model.in_features=30",
                      "data=csv", f"data.path={tmp_path / 'breast_cancer.csv'}", "data.target=malignant",
                      "trainer.steps=30", f"hydra.sweep.dir={sweep_dir}", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, sweep_dir


def test_the_audit_runs_on_the_worked_example(tmp_path):
    pytest.importorskip("sklearn", reason="the worked example's data set comes from scikit-learn (examples extra)")
    from runner.experiments.examples import breast_cancer

    # `python -m runner.experiments.examples.breast_cancer FILE`, in-process: the module's own main
    assert breast_cancer.main([str(tmp_path / "breast_cancer.csv")]) == 0
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


class TwoHeads(nn.Module):
    """Outputs a multitask loss reads: {"cls": logits, "reg": values} from one tensor."""

    def forward(self, x):
        return {"cls": x[:, :3], "reg": x[:, 3:]}


class Routed(nn.Module):
    """Returns fixed router outputs, rows aligned with the inputs (a stand-in for model=moe)."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, x):
        return self.outputs


class InBatchNegatives(nn.Module):
    """InfoNCE over the rows of (B, 2, D) embeddings: each query's key among the batch's keys."""

    def forward(self, embeddings, targets):
        q, k = nn.functional.normalize(embeddings[:, 0], dim=-1), nn.functional.normalize(embeddings[:, 1], dim=-1)
        return nn.functional.cross_entropy(q @ k.T / 0.1, torch.arange(len(q)))


def _token_batch(rows=7, length=6, vocab=5):
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(vocab, (rows, length), generator=generator)
    for row in range(rows):  # lengths 1..6: the halves hold different token counts
        targets[row, 1 + row % length:] = -100
    return torch.randn(rows, length, vocab, generator=generator), targets


def _identity_cases():
    from runner.components.losses import (
        FocalLoss,
        InfoNCE,
        LoadBalancedTokenLoss,
        MultiTaskLoss,
        TokenCrossEntropy,
    )

    g = torch.Generator().manual_seed(1)
    logits, binary = torch.randn(9, 3, generator=g), (torch.rand(9, 3, generator=g) > 0.5).float()
    classes = torch.randint(3, (9,), generator=g)
    tasks = {"cls": binary, "reg": torch.randn(9, 2, generator=g)}
    tokens, labels = _token_batch()
    yield "bce", nn.Identity(), nn.BCEWithLogitsLoss(), logits, binary, []
    yield "bce sum", nn.Identity(), nn.BCEWithLogitsLoss(reduction="sum"), logits, binary, []
    yield "focal", nn.Identity(), FocalLoss(), logits, binary, []
    yield "focal softmax", nn.Identity(), FocalLoss(), logits, classes, []
    yield "ce", nn.Identity(), nn.CrossEntropyLoss(), logits, classes, []
    yield "multitask", TwoHeads(), MultiTaskLoss(), torch.randn(9, 5, generator=g), tasks, []
    yield "multitask uncertainty", TwoHeads(), MultiTaskLoss(weighting="uncertainty"), torch.randn(9, 5), tasks, []
    for normalize in TokenCrossEntropy.NORMALIZE:  # weighted by token shares (or rows, for sequence)
        yield f"lm {normalize}", nn.Identity(), TokenCrossEntropy(normalize), tokens, labels, []
    yield "soft F1", nn.Identity(), __import__("tests.custom_losses").custom_losses.SoftF1(), logits, binary, \
        ["loss: SoftF1"]
    yield "in-batch negatives", nn.Identity(), InBatchNegatives(), torch.randn(9, 2, 4, generator=g), classes, \
        ["loss: InBatchNegatives"]
    yield "infonce", nn.Identity(), InfoNCE(), torch.randn(9, 2, 4, generator=g), classes, ["loss: InfoNCE"]
    # model=moe's output: logits and the router's statistics; the lm part passes, the aux part fails.
    probs = torch.softmax(torch.randn(7, 6, 4, generator=g), dim=-1)
    routed = {"logits": tokens, "router_probs": probs,
              "expert_mask": torch.zeros_like(probs).scatter_(-1, probs.topk(2, dim=-1).indices, 1.0)}
    yield "lm with router aux", Routed(routed), LoadBalancedTokenLoss(aux_weight=0.01), tokens, labels, \
        ["loss: LoadBalancedTokenLoss (aux)"]


@pytest.mark.parametrize("case", list(_identity_cases()), ids=lambda case: case[0])
def test_the_identity_check_passes_mean_losses_and_flags_losses_that_couple_examples(case):
    """The accumulation answer's f(x,y) = (i/b)·f(x[:i],y[:i]) + (1-i/b)·f(x[i:],y[i:]), on the loss alone."""
    from runner.training.checks import probe_loss_identity

    _, model, loss_fn, inputs, targets, expected = case
    assert probe_loss_identity(model, loss_fn, inputs, targets) == expected


def test_a_loss_that_couples_examples_is_recorded_and_gives_the_reason(tmp_path):
    coupled, _, _ = train(tmp_path, loss__name="custom", loss___target_="tests.custom_losses.SoftF1",
                          trainer__steps=2)
    plain, _, _ = train(tmp_path, trainer__steps=2)
    assert coupled["batch_coupled"] is True and coupled["coupling_modules"] == ["loss: SoftF1"]
    assert plain["batch_coupled"] is False and plain["coupling_modules"] == []
    assert record.expected_difference(True, False, coupled["coupling_modules"]) == "batch-coupled: loss SoftF1"
