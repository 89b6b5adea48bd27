"""Post-training objectives under accumulation: data=rollouts and loss=grpo's four aggregations, loss.count_window
(TRL PR #6024), checked against hand-computed values, the full batch and float32 tolerance."""
from __future__ import annotations

import pytest
import torch

from runner import api
from runner.recording import record
from tests.conftest import refusal, run_cli

ROLLOUTS = ["model=seq", "data=rollouts", "loss=grpo", "data.train_size=64", "data.eval_size=16", "data.max_length=8",
            "data.batch_size=16"]
AGGREGATIONS = ("token_mean", "sequence_mean", "sequence_sum", "constant")


def first_gradient(tmp_path, *overrides, base=ROLLOUTS):
    """The first optimizer step's gradient (first_grad.pt) of one step of `base` (ROLLOUTS) with `overrides`."""
    run_dir = tmp_path / "_".join(o.replace("=", "-").replace(".", "-") for o in overrides)
    outcome = api.run(api.compose([*base, "trainer.steps=1", *overrides]), run_dir)
    assert outcome.status == "ok", outcome.summary.error
    return record.load_first_grad(run_dir)


def test_the_surrogate_at_the_initial_policy_is_the_hand_computed_one():
    """At the initial weights every ratio is 1, so each scored token's surrogate is -A: the four aggregations are
    -sum_i A_i T_i / T, -mean_i A_i, -mean_i A_i T_i and -mean_i A_i T_i / L (L the padded length)."""
    training = api.compose([*ROLLOUTS, "trainer.steps=1"])
    inputs, targets = training.dataset.batch(0)
    with torch.no_grad():
        outputs = training.model(inputs)
    advantages = targets["advantages"].double()
    tokens = (targets["labels"] != -100).sum(dim=1).double()
    expected = {"token_mean": -(advantages * tokens).sum() / tokens.sum(), "sequence_mean": -advantages.mean(),
                "sequence_sum": -(advantages * tokens).mean(),
                "constant": -(advantages * tokens / targets["labels"].shape[1]).mean()}
    from runner.components.losses import policy_gradient_loss

    for aggregation in AGGREGATIONS:
        value = policy_gradient_loss(aggregation)(outputs, targets)
        assert float(value) == pytest.approx(float(expected[aggregation]), rel=1e-5, abs=1e-7), aggregation
    # the KL term to the initial policy is 0 there, and the clip does not bind
    assert float(policy_gradient_loss("token_mean", kl_weight=1.0)(outputs, targets)) == \
        pytest.approx(float(expected["token_mean"]), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("k", [2, 4])
def test_each_aggregation_is_the_full_batch_under_accumulation(tmp_path, k):
    """token_mean with the window's count, sequence_mean, sequence_sum and constant: the first gradient of k
    micro-batches is the full batch's within float32 tolerance; token_mean with each micro-batch's count is not."""
    for aggregation in AGGREGATIONS:
        full = first_gradient(tmp_path, f"loss.aggregation={aggregation}", "backward=full")
        split = first_gradient(tmp_path, f"loss.aggregation={aggregation}", "backward=accumulate",
                               f"backward.accumulation={k}")
        for name in full:
            torch.testing.assert_close(split[name], full[name], rtol=1e-5, atol=1e-7)
    full = first_gradient(tmp_path, "backward=full")
    own = first_gradient(tmp_path, "backward=accumulate", f"backward.accumulation={k}", "loss.normalize=micro_batch")
    assert max(float((own[n] - full[n]).abs().max() / full[n].abs().max()) for n in full) > 1e-3


@pytest.mark.parametrize("window", [2, 8])
def test_count_window_scales_the_first_gradient_by_k_over_m(tmp_path, window):
    """loss.count_window=M (TRL PR #6024: num_items_in_batch counted over steps_per_generation micro-batches while
    the optimizer steps every gradient_accumulation_steps = k): the gradient is exactly k/M of the exact one
    (0.5x and 2x at k=4 here, as the PR's 0.5x and 4x examples), the logged loss unchanged."""
    exact = first_gradient(tmp_path, "backward=accumulate", "backward.accumulation=4")
    counted = first_gradient(tmp_path, "backward=accumulate", "backward.accumulation=4", f"loss.count_window={window}")
    for name in exact:
        torch.testing.assert_close(counted[name], exact[name] * 4 / window, rtol=1e-5, atol=1e-8)


def test_bad_post_training_input_is_one_line():
    assert refusal(*ROLLOUTS, "data.group_size=1") == (
        "data.group_size=1 is not allowed: expected an integer >= 2 (group-normalised advantages need two completions)")
    assert refusal(*ROLLOUTS, "loss.clip_ratio=0") == "loss.clip_ratio=0.0 is not allowed: expected > 0"
    assert refusal("model=seq", "data=seq", "loss=grpo").startswith("loss=grpo does not fit model=seq")
    assert refusal(*ROLLOUTS, "loss.count_window=2").startswith(
        "loss.count_window=2 is not allowed with backward=full")
    assert refusal(*ROLLOUTS, "loss.aggregation=sequence_mean", "loss.count_window=2", "backward=accumulate") == (
        "loss.count_window=2 is not allowed with loss.aggregation=sequence_mean: it counts the tokens a token mean "
        "divides by, expected loss.aggregation=token_mean (or 0)")


def test_token_mean_and_a_mean_over_sequences_on_two_ranks_are_the_full_batch(tmp_path):
    """Two gloo ranks, each with half of every batch in 2 micro-batches, end where one process's full batch ends,
    within float32 tolerance: token_mean counts the tokens over both ranks; constant is a mean over sequences, as
    sequence_mean and sequence_sum are (each rank's share of the rows weights it; two of the four keep the
    suite's time)."""
    sweep = tmp_path / "ranks"
    result = run_cli("-m", *ROLLOUTS, "trainer.steps=3", "trainer.processes=2", "backward=accumulate",
                     "backward.accumulation=2", "loss.aggregation=token_mean,constant",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for job in sorted(p for p in sweep.iterdir() if (p / record.SUMMARY).exists()):
        aggregation = job.name.split("loss.aggregation=")[1].split(",")[0]
        reference = tmp_path / f"full_{aggregation}"
        assert api.run(api.compose([*ROLLOUTS, "trainer.steps=3", f"loss.aggregation={aggregation}"]),
                       reference).status == "ok"
        ranks, one = record.load_params(job), record.load_params(reference)
        for name in one:
            torch.testing.assert_close(ranks[name], one[name], rtol=1e-5, atol=1e-6)


PAIRS = ["model=seq", "data=preference_pairs", "loss=dpo", "data.max_length=8"]


def test_dpo_at_the_initial_policy_is_log_2_and_its_gradient_the_hand_computed_one():
    """At the initial weights every margin is 0: the loss is log 2 and its gradient -beta/2 x the mean over pairs of
    the gradient of (logp_chosen - logp_rejected) (the derivative of -log sigmoid at 0 is -1/2)."""
    training = api.compose([*PAIRS, "trainer.steps=1"])
    inputs, targets = training.dataset.batch(0)
    model, loss_fn = training.model, training.loss_fn
    loss = loss_fn(model(inputs), targets)
    assert float(loss.detach()) == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-6)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    labels = targets["labels"]
    logp = torch.log_softmax(model(inputs), dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    sequence = (logp * (labels != -100)).sum(dim=-1)
    by_hand = torch.autograd.grad(-loss_fn.beta / 2 * (sequence[:, 0] - sequence[:, 1]).mean(), list(model.parameters()))
    for g, h in zip(grads, by_hand):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-8)


def test_dpo_weights_each_pair_by_the_windows_pair_count_and_scale_mean_does_not(tmp_path):
    """Four pairs packed 3 + 1 into a window of two micro-batches (data.micro_batch_size=3, ms-swift PR #10144's
    split): the window's pair count (scale=size) is the full batch's gradient; each micro-batch's mean / k
    (scale=mean) weights the pairs 1/6, 1/6, 1/6, 1/2, as a hand-weighted sum of the pairs' own gradients gives."""
    window = [*PAIRS, "data.train_size=4", "data.micro_batch_size=3", "backward=accumulate", "backward.accumulation=2",
              "trainer.steps=1"]
    training = api.compose(window)
    step = training.batches.window(0)
    assert step.sizes == [3, 1]
    model, loss_fn = training.model, training.loss_fn
    per_pair = [torch.autograd.grad(loss_fn(model(step.inputs[i:i + 1]),
                                            {k: v[i:i + 1] for k, v in step.targets.items()}), list(model.parameters()))
                for i in range(4)]
    names = [n for n, _ in model.named_parameters()]
    for scale, weights in (("size", [1 / 4] * 4), ("mean", [1 / 6, 1 / 6, 1 / 6, 1 / 2])):
        run_dir = tmp_path / scale
        assert api.run(api.compose([*window, f"backward.scale={scale}"]), run_dir).status == "ok"
        first = record.load_first_grad(run_dir)
        for j, name in enumerate(names):
            expected = sum(w * g[j] for w, g in zip(weights, per_pair))
            torch.testing.assert_close(first[name], expected, rtol=1e-5, atol=1e-8)


def test_dpo_needs_pairs():
    assert refusal("model=seq", "data=seq", "loss=dpo").startswith("loss=dpo does not fit model=seq")
    assert refusal(*PAIRS, "loss.beta=0") == "loss.beta=0.0 is not allowed: expected > 0"


SMOOTHED = ["model=seq", "data=seq", "loss=lm", "loss.label_smoothing=0.1", "data.min_length=9", "data.max_length=9",
            "data.batch_size=16", "data.train_size=64", "data.eval_size=16"]


def test_label_smoothing_is_torchs_and_each_term_follows_the_windows_count():
    """loss.label_smoothing=eps: the parts `lm` and `smoothing` add up to F.cross_entropy(label_smoothing=eps), summed
    and divided by the window's tokens, with term_normalize=window; with micro_batch the smoothing term divides by
    the micro-batch's own tokens, whatever it is handed."""
    training = api.compose(SMOOTHED)
    inputs, targets = training.dataset.batch(0)
    with torch.no_grad():
        logits = training.model(inputs)
    count = (targets != -100).sum()
    reference = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                                  label_smoothing=0.1, reduction="sum") / (2 * count)
    parts = training.loss_fn.parts(logits, targets, num_items_in_batch=2 * count)
    assert set(parts) == {"lm", "smoothing"}
    assert float(sum(parts.values())) == pytest.approx(float(reference), rel=1e-5)
    from runner.components.losses import language_model_loss

    own = language_model_loss(label_smoothing=0.1, term_normalize="micro_batch").parts(logits, targets, 2 * count)
    assert float(own["lm"]) == pytest.approx(float(parts["lm"]), rel=1e-6)
    assert float(own["smoothing"]) == pytest.approx(2 * float(parts["smoothing"]), rel=1e-5)


def test_a_smoothing_term_per_micro_batch_gets_k_times_its_share_of_the_first_gradient(tmp_path):
    """transformers #46731 (fixed by PR #47261): the main term divided by num_items_in_batch, the smoothing term kept
    as each micro-batch's mean. On micro-batches of equal token counts, the first gradient's smoothing share is
    exactly k times the exact one's, the main term's unchanged: g_bug - g_exact = (k - 1) x g_smoothing."""
    k = 4
    exact = first_gradient(tmp_path, "backward=accumulate", f"backward.accumulation={k}", base=SMOOTHED)
    bug = first_gradient(tmp_path, "backward=accumulate", f"backward.accumulation={k}",
                         "loss.term_normalize=micro_batch", base=SMOOTHED)
    training = api.compose(SMOOTHED)
    inputs, targets = training.dataset.batch(0)
    smoothing = training.loss_fn.parts(training.model(inputs), targets)["smoothing"]
    names = [n for n, _ in training.model.named_parameters()]
    by_hand = dict(zip(names, torch.autograd.grad(smoothing, list(training.model.parameters()))))
    for name in exact:
        torch.testing.assert_close(bug[name] - exact[name], (k - 1) * by_hand[name], rtol=1e-4, atol=1e-7)
