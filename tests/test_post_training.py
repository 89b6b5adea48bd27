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


def test_every_aggregation_on_two_ranks_is_the_full_batch(tmp_path):
    """Each of two ranks takes half of every batch (runner.training.weighting.rank_shard) and the engine averages their
    gradients: simulated rank by rank, every aggregation's weighted rank gradients average to the full batch's
    (token_mean counts the tokens over both ranks; the other three are means over sequences, weighted by the rank's
    share of the rows). Two real gloo ranks, 2 micro-batches each, end where one process ends on token_mean."""
    from runner.components.losses import policy_gradient_loss
    from runner.training.weighting import rank_shard

    training = api.compose([*ROLLOUTS, "trainer.steps=1"])
    inputs, targets = training.dataset.batch(0)
    model = training.model
    params = list(model.parameters())
    for aggregation in AGGREGATIONS:
        loss_fn = policy_gradient_loss(aggregation)
        full = torch.autograd.grad(loss_fn(model(inputs), targets), params)
        averaged = [torch.zeros_like(p) for p in params]
        for rank in range(2):
            shard = rank_shard(inputs, targets, loss_fn, rank, 2)
            for total, g in zip(averaged, torch.autograd.grad(loss_fn(model(shard.inputs), shard.targets) *
                                                              shard.weight, params)):
                total += g / 2
        for total, g in zip(averaged, full):
            torch.testing.assert_close(total, g, rtol=1e-5, atol=1e-7, msg=aggregation)

    run_dir, reference = tmp_path / "ranks", tmp_path / "full"
    result = run_cli(*ROLLOUTS, "trainer.steps=3", "trainer.processes=2", "backward=accumulate",
                     "backward.accumulation=2", f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert api.run(api.compose([*ROLLOUTS, "trainer.steps=3"]), reference).status == "ok"
    ranks, one = record.load_params(run_dir), record.load_params(reference)
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


PACKED = ["model=seq", "model.cell=transformer", "data=seq", "loss=lm", "data.packing=true", "data.min_length=2",
          "data.max_length=6", "data.pack_length=24", "data.batch_size=4", "data.train_size=32", "data.eval_size=8"]


def test_a_packed_row_gives_each_document_the_logits_it_has_alone():
    """data.packing=true: positions restart at each document and attention stays within it, so each document's logits
    in a packed row are those of the document run alone (float32 rounding apart); no position predicts the next
    document's first token, and a row of T tokens and N documents scores T - N."""
    from runner.components.data import documents_of

    training = api.compose([*PACKED, "trainer.steps=1"])
    inputs, targets = training.dataset.batch(0)
    tokens, positions, documents = documents_of(inputs)
    assert int(targets["documents"].min()) >= 3  # several documents in every row
    scored = (targets["labels"] != -100).sum(dim=1)
    assert scored.tolist() == (24 - targets["documents"]).tolist()
    model = training.model
    assert model.packed  # the source told it (read_packed_rows)
    with torch.no_grad():
        packed = model(inputs)
        model.packed = False  # each document alone, through the unpacked causal forward
        for row in range(len(inputs)):
            for document in documents[row].unique():
                mine = documents[row] == document
                assert positions[row][mine].tolist() == list(range(int(mine.sum())))
                alone = model(tokens[row][mine][None])[0]
                torch.testing.assert_close(packed[row][mine], alone, rtol=1e-5, atol=1e-5)
    labels = targets["labels"]
    starts = torch.cat([inputs[:, 1:] < 0, torch.zeros(len(inputs), 1, dtype=torch.bool)], dim=1)
    assert bool((labels[starts] == -100).all())  # the label before each document's first input is not scored


def test_boundaries_removed_twice_scale_the_loss_and_its_gradient_by_t_minus_n_over_t_minus_2n_plus_1(tmp_path):
    """unsloth-zoo PR #348 (fixed by PR #1066): the boundaries, already masked, subtracted from the count once more. A
    row of T tokens and N documents divides by T - 2N + 1 instead of T - N: its loss and gradient are exactly
    (T - N) / (T - 2N + 1) times the exact ones. Over a batch, the first gradient is the counts' ratio, and the exact
    count accumulates to the full batch's gradient."""
    training = api.compose([*PACKED, "trainer.steps=1"])
    inputs, targets = training.dataset.batch(0)
    from runner.components.losses import language_model_loss

    row = {name: value[:1] for name, value in targets.items()}
    t, n = 24, int(row["documents"])
    params = list(training.model.parameters())
    once = language_model_loss()(training.model(inputs[:1]), row)
    twice = language_model_loss(boundaries="twice")(training.model(inputs[:1]), row)
    factor = (t - n) / (t - 2 * n + 1)
    assert float(twice.detach()) == pytest.approx(float(once.detach()) * factor, rel=1e-6)
    for g_twice, g_once in zip(torch.autograd.grad(twice, params), torch.autograd.grad(once, params)):
        torch.testing.assert_close(g_twice, g_once * factor, rtol=1e-5, atol=1e-8)

    full = first_gradient(tmp_path, "backward=full", base=PACKED)
    exact = first_gradient(tmp_path, "backward=accumulate", "backward.accumulation=2", base=PACKED)
    bug = first_gradient(tmp_path, "backward=accumulate", "backward.accumulation=2", "loss.boundaries=twice",
                         base=PACKED)
    documents = targets["documents"]
    ratio = float((t - documents).sum() / (t - 2 * documents + 1).sum())
    for name in full:
        torch.testing.assert_close(exact[name], full[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(bug[name], full[name] * ratio, rtol=1e-5, atol=1e-7)


def test_bad_packing_input_is_one_line():
    assert refusal(*PACKED, "model.cell=gru") == (
        "data.packing=true is not allowed with model=seq: it cannot restart positions at each document, expected "
        "model.cell=transformer (model=seq or moe), or a model of your own with read_packed_rows() (or "
        "data.packing=false)")
    assert refusal("model=seq", "data=seq", "loss=lm", "loss.boundaries=twice") == (
        "loss.boundaries=twice is not allowed without packed rows: it removes their documents' boundaries from the "
        "count, expected data=seq data.packing=true (or loss.boundaries=once)")
    assert refusal(*PACKED, "data.topics=2") == (
        "data.topics=2 is not allowed with data.packing=true: a packed row holds documents of several topics, "
        "expected data.topics=0 (or data.packing=false)")


SEQUENCES = ["model=seq", "data=seq", "loss=lm", "data.train_size=64", "data.eval_size=16", "data.max_length=12",
             "data.batch_size=8"]


@pytest.mark.parametrize("world,pieces", [(2, 2), (4, 2), (4, 4)])
def test_sequence_parallel_ranks_add_up_to_the_full_batch_and_the_world_count_is_1_over_sp(world, pieces):
    """trainer.sequence_parallel: the ranks of a group share their rows, each scoring a contiguous slice of the
    positions. Simulated here rank by rank (runner.training.weighting.rank_shard, then the engine's mean over ranks):
    with count_group=data the ranks' weighted gradients average to the full batch's; with world, an N-group's rows
    are counted N times and the loss and gradient are exactly 1/N (VeOmni PR #338, prime-rl PR #2562)."""
    from runner.training.weighting import rank_shard

    training = api.compose([*SEQUENCES, "trainer.steps=1"])
    inputs, targets = training.dataset.batch(0)
    model, loss_fn = training.model, training.loss_fn
    params = list(model.parameters())
    full_loss = loss_fn(model(inputs), targets)
    full = torch.autograd.grad(full_loss, params)
    for group, factor in (("data", 1.0), ("world", 1 / pieces)):
        summed, logged = [torch.zeros_like(p) for p in params], 0.0
        for rank in range(world):
            shard = rank_shard(inputs, targets, loss_fn, rank, world, "global", pieces, group)
            loss = loss_fn(model(shard.inputs), shard.targets)
            logged += float(loss.detach()) * shard.share
            for total, g in zip(summed, torch.autograd.grad(loss * shard.weight, params)):
                total += g / world  # the engine's mean over ranks
        assert logged == pytest.approx(float(full_loss.detach()) * factor, rel=1e-5)
        for total, g in zip(summed, full):
            torch.testing.assert_close(total, g * factor, rtol=1e-5, atol=1e-7)


def test_sequence_parallel_on_four_gloo_ranks_is_the_full_batch(tmp_path):
    """Real ranks: four in two sequence-parallel groups of two, count_group=data, end where one process's full batch
    ends within float32 tolerance (experiment=sequence_parallel measures count_group=world's exact 1/2 on two ranks)."""
    reference = tmp_path / "full"
    assert api.run(api.compose([*SEQUENCES, "trainer.steps=2"]), reference).status == "ok"
    run_dir = tmp_path / "ranks"
    result = run_cli(*SEQUENCES, "trainer.steps=2", "trainer.processes=4", "trainer.sequence_parallel=2",
                     "backward=accumulate", "backward.accumulation=2", f"hydra.run.dir={run_dir}", cwd=tmp_path,
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks, one = record.load_params(run_dir), record.load_params(reference)
    for name in one:
        torch.testing.assert_close(ranks[name], one[name], rtol=1e-5, atol=1e-6)


def test_bad_sequence_parallel_input_is_one_line():
    assert refusal(*SEQUENCES, "trainer.processes=4", "trainer.sequence_parallel=3") == (
        "trainer.sequence_parallel=3 is not allowed with trainer.processes=4: expected a divisor of trainer.processes")
    assert refusal(*PAIRS, "trainer.processes=2", "trainer.sequence_parallel=2").startswith(
        "trainer.sequence_parallel=2 is not allowed with loss=dpo: its ranks score parts of each sequence")
