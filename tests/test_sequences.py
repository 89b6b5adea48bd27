"""Token losses over variable-length sequences: normalize=tokens is exact under any split (the
Hugging Face Trainer's fix, transformers PRs #34191/#34198; torchtune PR #1875), micro_batch is not."""
import copy

import pytest
import torch
import torch.nn.functional as F

from runner.components.data import IGNORE_INDEX, markov_sequences
from runner.components.losses import TokenCrossEntropy
from runner.config.schema import ConfigError
from runner.training.train import run
from tests.conftest import assert_params_close, build, max_abs_diff, train

# A small causal LM on short sequences: 100 steps take about a second.
SEQ = dict(model__name="seq", data__name="seq", loss__name="lm", model__hidden=16, model__depth=1, data__max_length=12,
           data__train_size=512, data__eval_size=64, trainer__steps=100, trainer__memory="off")


def test_sequences_are_padded_with_the_ignore_label():
    inputs, labels = markov_sequences(vocab=8, n=200, seed=0, min_length=2, max_length=12)
    assert inputs.shape == labels.shape == (200, 11)
    scored = (labels != IGNORE_INDEX).sum(1)
    assert scored.min() == 1 and scored.max() == 11 and len(set(scored.tolist())) > 5  # lengths vary
    # Labels are the inputs shifted by one, up to the padding.
    assert torch.equal(labels[:, :-1][labels[:, :-1] != IGNORE_INDEX], inputs[:, 1:][labels[:, :-1] != IGNORE_INDEX])
    again, _ = markov_sequences(vocab=8, n=200, seed=0, min_length=2, max_length=12)
    assert torch.equal(inputs, again)


def test_the_three_normalisations_by_hand():
    logits = torch.randn(3, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, -100], [0, 1, 2, 3], [4, -100, -100, -100]])
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none").view(3, 4)
    tokens = per_token.sum() / 7
    sequence = (per_token[0, :2].mean() + per_token[1].mean() + per_token[2, :1].mean()) / 3
    assert torch.allclose(TokenCrossEntropy("tokens")(logits, labels), tokens)
    assert torch.allclose(TokenCrossEntropy("micro_batch")(logits, labels), tokens)  # one micro-batch: the same
    assert torch.allclose(TokenCrossEntropy("sequence")(logits, labels), sequence)
    # Handed the effective batch's count, a micro-batch's loss is its share of the batch's.
    part = TokenCrossEntropy("tokens")(logits[:1], labels[:1], num_items_in_batch=torch.tensor(7))
    assert torch.allclose(part, per_token[0, :2].sum() / 7)
    assert torch.allclose(TokenCrossEntropy("micro_batch")(logits[:1], labels[:1], num_items_in_batch=torch.tensor(7)),
                          per_token[0, :2].mean())


def test_token_normalisation_is_exact_under_any_split_and_micro_batch_is_not(tmp_path):
    full, ref, run_dir = train(tmp_path, backward__name="full", **SEQ)
    assert full["status"] == "ok" and full["eval_metric"] == "token_accuracy" and full["eval_value"] > 0.4
    for k in (2, 4, 8):
        for strategy in ("sum", "accumulate"):
            summary, params, _ = train(tmp_path, backward__name=strategy, backward__accumulation=k, **SEQ)
            assert_params_close(params, ref)  # torch.testing's float32 tolerance, after 100 steps
    _, old, _ = train(tmp_path, backward__name="accumulate", backward__accumulation=4, loss__normalize="micro_batch",
                      **SEQ)
    assert max_abs_diff(old, ref) > 1e-3
    # normalize=sequence is a mean over examples: exact under a split too, and another objective.
    _, seq_full, _ = train(tmp_path, backward__name="full", loss__normalize="sequence", **SEQ)
    _, seq_acc, _ = train(tmp_path, backward__name="accumulate", backward__accumulation=4, loss__normalize="sequence",
                          **SEQ)
    assert_params_close(seq_acc, seq_full)
    assert max_abs_diff(seq_full, ref) > 1e-3


def test_float64_agrees_far_tighter(tmp_path):
    _, ref, _ = train(tmp_path, backward__name="full", trainer__dtype="float64", **{**SEQ, "trainer__steps": 30})
    _, acc, _ = train(tmp_path, backward__name="accumulate", backward__accumulation=8, trainer__dtype="float64",
                      **{**SEQ, "trainer__steps": 30})
    assert max_abs_diff(acc, ref) < 1e-12


def test_accumulate_matches_a_hand_written_token_count_loop(tmp_path):
    """Count the batch's tokens, divide each micro-batch's summed loss by it, backward, step."""
    training = build(backward__name="accumulate", backward__accumulation=4, **{**SEQ, "trainer__steps": 40})
    config = training.config
    model = copy.deepcopy(training.model)  # the same initial parameters
    optimizer = torch.optim.SGD(model.parameters(), lr=config.optim.lr)
    for step in range(40):
        inputs, labels = training.dataset.batch(step)
        count = (labels != -100).sum()
        optimizer.zero_grad()
        for x, y in zip(torch.tensor_split(inputs, 4), torch.tensor_split(labels, 4)):
            logits = model(x)
            (F.cross_entropy(logits.reshape(-1, 16), y.reshape(-1), ignore_index=-100, reduction="sum") / count).backward()
        optimizer.step()
    assert run(training, tmp_path / "run").status == "ok"
    assert_params_close(dict(training.model.named_parameters()), dict(model.named_parameters()))


@pytest.mark.parametrize("shared,split", [
    ({}, dict(loss__normalize="micro_batch")),  # micro-batches' token means, weighted by rows
    (dict(data__batch_size=30), dict(backward__scale="mean")),  # 30 in 4: (8, 8, 7, 7) divided by 4
])
def test_the_loss_column_is_the_full_batchs_whatever_the_weighting(tmp_path, shared, split):
    """Lightning #13243 logged the loss divided by k; here `loss` is the full batch's at every split."""
    import pandas as pd

    one_step = {**SEQ, "trainer__steps": 1, **shared}
    _, _, full_dir = train(tmp_path, backward__name="full", **one_step)
    _, _, run_dir = train(tmp_path, backward__name="accumulate", backward__accumulation=4, **one_step, **split)
    full, accumulated = pd.read_csv(full_dir / "metrics.csv"), pd.read_csv(run_dir / "metrics.csv")
    assert accumulated["loss"][0] == pytest.approx(full["loss"][0], rel=1e-6)
    assert accumulated["tokens"][0] == full["tokens"][0] > one_step.get("data__batch_size", 32)  # tokens, not rows


@pytest.mark.parametrize("overrides,needle", [
    (dict(model__name="seq"), "model=seq does not fit data=default"),
    (dict(model__name="seq", data__name="seq"), "loss=bce does not fit model=seq"),
    (dict(loss__name="lm"), "loss=lm does not fit model=mlp"),
    (dict(model__name="seq", data__name="seq", loss__name="lm", model__cell="lstm"), "model.cell=lstm"),
])
def test_what_fits_is_named(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        build(**overrides)


def test_the_token_count_comes_from_the_targets_with_no_extra_forward():
    training = build(backward__name="accumulate", backward__accumulation=4, **SEQ)
    forwards = []
    training.model.register_forward_hook(lambda *args: forwards.append(1))
    inputs, labels = training.dataset.batch(0)
    result = training.strategy.step(training.model, training.loss_fn, training.optimizers, inputs, labels)
    assert len(forwards) == 4  # one per micro-batch
    assert int(result.extras["tokens"]) == int((labels != -100).sum())


@pytest.mark.parametrize("strategy", ["sum", "accumulate"])
def test_normalize_double_divides_the_gradient_by_k_once_more_and_logs_the_batchs_loss(tmp_path, strategy):
    """TRL #2617: a loss already divided by the window's tokens, divided again by k. The first
    gradient is exactly 1/k of normalize=tokens' (a power of two: no rounding); the loss column
    is the batch's either way; on one micro-batch (full) the two are the same training."""
    from runner.recording.record import load_first_grad

    steps = {**SEQ, "trainer__steps": 1}
    exact, _, exact_dir = train(tmp_path, backward__name=strategy, backward__accumulation=4, **steps)
    double, _, double_dir = train(tmp_path, backward__name=strategy, backward__accumulation=4,
                                  loss__normalize="double", **steps)
    first, quartered = load_first_grad(exact_dir), load_first_grad(double_dir)
    assert all(torch.equal(quartered[name], first[name] / 4) for name in first)
    assert double["final_loss"] == exact["final_loss"]
    full, _, _ = train(tmp_path, backward__name="full", loss__normalize="double", **steps)
    full_exact, _, _ = train(tmp_path, backward__name="full", **steps)
    assert full["param_sha256"] == full_exact["param_sha256"]
