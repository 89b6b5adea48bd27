"""full / sum / accumulate: equivalent to float32 rounding, and the known non-equivalences."""
import pytest
import torch

from tests.conftest import assert_params_close, build, max_abs_diff, train

F32 = dict(rtol=1.3e-6, atol=1e-5)  # torch.testing's float32 defaults
F64 = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """backward=full after 100 steps, per (model, dtype), computed once."""
    cache = {}

    def get(model, dtype="float32"):
        if (model, dtype) not in cache:
            cache[(model, dtype)] = train(tmp_path_factory.mktemp("ref"), model__name=model,
                                          trainer__dtype=dtype)[1]
        return cache[(model, dtype)]

    return get


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("strategy", ["sum", "accumulate"])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_equivalent_to_full_in_float32(tmp_path, reference, model, strategy, k):
    summary, params, _ = train(tmp_path, model__name=model, backward__name=strategy,
                               backward__accumulation=k)
    assert summary["status"] == "ok" and summary["accumulation"] == k
    assert_params_close(params, reference(model), **F32)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("strategy", ["sum", "accumulate"])
def test_uneven_split_with_size_scale_is_exact(tmp_path, model, strategy):
    full = train(tmp_path, model__name=model, data__batch_size=30)[1]
    params = train(tmp_path, model__name=model, data__batch_size=30, backward__name=strategy,
                   backward__accumulation=4)[1]
    assert_params_close(params, full, **F32)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_float64_is_far_tighter(tmp_path, reference, model):
    params64 = train(tmp_path, model__name=model, trainer__dtype="float64",
                     backward__name="accumulate", backward__accumulation=8)[1]
    params32 = train(tmp_path, model__name=model, backward__name="accumulate", backward__accumulation=8)[1]
    d64 = max_abs_diff(params64, reference(model, "float64"))
    d32 = max_abs_diff(params32, reference(model))
    assert_params_close(params64, reference(model, "float64"), **F64)
    assert d64 < d32 / 1000 or d32 == 0


def test_scale_mean_on_uneven_split_measurably_differs(tmp_path):
    full = train(tmp_path, data__batch_size=30)[1]
    size = train(tmp_path, data__batch_size=30, backward__name="accumulate", backward__accumulation=4)[1]
    mean = train(tmp_path, data__batch_size=30, backward__name="accumulate", backward__accumulation=4,
                 backward__scale="mean")[1]
    assert max_abs_diff(size, full) < 1e-5
    assert max_abs_diff(mean, full) > 1e-4  # a real, systematic difference, not rounding


def test_full_ignores_accumulation_and_records_one(tmp_path):
    a, pa, _ = train(tmp_path, backward__accumulation=8)
    b, pb, _ = train(tmp_path)
    assert a["accumulation"] == 1 and a["param_sha256"] == b["param_sha256"]


def test_batchnorm_breaks_equivalence(tmp_path):
    full = train(tmp_path, model__batchnorm=True)[1]
    acc = train(tmp_path, model__batchnorm=True, backward__name="accumulate", backward__accumulation=4)[1]
    assert max_abs_diff(acc, full) > 1e-3


def test_sum_reduced_loss_is_added_unweighted(tmp_path):
    full = train(tmp_path, loss__reduction="sum", optim__lr=0.005)[1]
    acc = train(tmp_path, loss__reduction="sum", optim__lr=0.005, backward__name="accumulate",
                backward__accumulation=4)[1]
    assert_params_close(acc, full, **F32)


def test_focal_gamma0_without_alpha_equals_bce(tmp_path):
    bce = train(tmp_path, data__positive_rate=0.01)[1]
    focal = train(tmp_path, data__positive_rate=0.01, loss__name="focal", loss__gamma=0.0, loss__alpha=-1.0)[1]
    assert_params_close(focal, bce, **F32)
    default_focal = train(tmp_path, data__positive_rate=0.01, loss__name="focal")[1]
    assert max_abs_diff(default_focal, bce) > 1e-3


def test_loss_choice_does_not_change_initial_parameters_or_data():
    a = build(loss__name="focal", backward__name="sum", backward__accumulation=4)
    b = build()
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    assert torch.equal(a.dataset.batch(3)[0], b.dataset.batch(3)[0])


@pytest.mark.parametrize("k", [1, 4])
def test_runner_matches_the_accumulation_answers_loop(tmp_path, k):
    """The loop of the gradient-accumulation answer, written out by hand, on the runner's
    model, data and seed: the runner adds no hidden behaviour."""
    steps = 30
    summary, runner_params, _ = train(tmp_path, model__name="cnn", trainer__steps=steps,
                                      backward__name="accumulate", backward__accumulation=k)
    training = build(model__name="cnn")  # same seed -> same initial model and data
    model, objective = training.model, torch.nn.BCEWithLogitsLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batch_size = 32
    sub_batch_size = batch_size // k
    num_sub_batches = batch_size // sub_batch_size
    for step in range(steps):
        input_data, targets = training.dataset.batch(step)
        optimizer.zero_grad()
        loss_value = 0.0
        for sub_batch_idx in range(num_sub_batches):
            start_idx = sub_batch_size * sub_batch_idx
            end_idx = start_idx + sub_batch_size
            sub_output = model(input_data[start_idx:end_idx])
            sub_loss = objective(sub_output, targets[start_idx:end_idx]) / num_sub_batches
            sub_loss.backward()
            loss_value += sub_loss.item()
        optimizer.step()
    checksum = sum([p.sum().item() for p in model.parameters()])
    assert checksum == pytest.approx(summary["param_sum"], abs=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(runner_params[name], p.detach(), rtol=0, atol=0)
    assert loss_value == pytest.approx(summary["final_loss"], rel=1e-6)


ONE_STEP = dict(trainer__steps=1, data__train_size=64, data__eval_size=16, optim__lr=0.1)


def sgd_update(tmp_path, **overrides):
    """(the first SGD update of every parameter, the summary): one step from the seed's initial parameters."""
    start = {n: p.detach().clone() for n, p in build(**ONE_STEP, **overrides).model.named_parameters()}
    summary, params, _ = train(tmp_path, **ONE_STEP, **overrides)
    return {n: params[n] - start[n] for n in start}, summary


def test_scale_none_leaves_each_micro_batch_undivided_k_times_the_gradient(tmp_path):
    """backward.scale=none is the transformers Trainer's compute_loss_func path (never divided by
    gradient_accumulation_steps, PR #34511): on an even split (32 rows in 4) each micro-batch's mean loss is
    backwarded as it is, so plain SGD's first update is exactly 4x the full batch's; the logged loss is the batch's."""
    full, full_summary = sgd_update(tmp_path, backward__name="full")
    undivided, summary = sgd_update(tmp_path, backward__name="accumulate", backward__accumulation=4,
                                    backward__scale="none")
    assert_params_close(undivided, {n: 4 * u for n, u in full.items()}, rtol=1e-5, atol=1e-7)
    assert summary["final_loss"] == pytest.approx(full_summary["final_loss"], rel=1e-6)


@pytest.mark.parametrize("keep, index", [("last", -1), ("first", 0)])
def test_keep_one_steps_on_that_micro_batch_alone(tmp_path, keep, index):
    """backward.keep=last (DeepSpeed ZeRO-2 resetting its accumulator at every backward, open-instruct PR #1498)
    and keep=first (DeepSpeed ZeRO-1/2 CPU offload copying micro-step 0 only, PR #7967): every micro-batch is
    forwarded and backwarded and the logged loss is the batch's, but the update is one micro-batch's alone,
    weighted by its share of the batch, as a hand-written step on it gives."""
    last, summary = sgd_update(tmp_path, backward__name="accumulate", backward__accumulation=4, backward__keep=keep)
    reference = build(**ONE_STEP)
    model, loss_fn = reference.model, reference.loss_fn
    inputs, targets = reference.dataset.batch(0)
    x, y = torch.tensor_split(inputs, 4)[index], torch.tensor_split(targets, 4)[index]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    (len(x) / len(inputs) * loss_fn(model(x), y)).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    assert_params_close(last, {n: p.detach() - start[n] for n, p in model.named_parameters()}, rtol=1e-5, atol=1e-7)
    _, full_summary = sgd_update(tmp_path, backward__name="full")
    assert summary["final_loss"] == pytest.approx(full_summary["final_loss"], rel=1e-6)


def test_keep_last_is_refused_where_the_gradient_is_held_elsewhere():
    from tests.conftest import refusal

    assert refusal("backward=accumulate", "backward.keep=last", "backward.step_in_backward=last") == (
        "backward.keep=last is not allowed with backward.step_in_backward=last: the hooks step on .grad, expected "
        "backward.step_in_backward=off (or backward.keep=all)")
