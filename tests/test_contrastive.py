"""Contrastive learning with in-batch negatives (model=dual_encoder, data=pairs, loss=infonce) and
backward=gradcache, against hand-written PyTorch loops and the full-batch gradient in float64."""
import math
from contextlib import nullcontext

import pytest
import torch

from runner.config.schema import ConfigError, validate
from runner.recording import record
from runner.training import strategies
from runner.training.build import build_training
from tests.conftest import (
    assert_params_close,
    build,
    make_config,
    max_abs_diff,
    refusal,
    split_arguments,
    train,
)

# A small contrastive setup: 32 pairs a batch, a 16-dimensional embedding, Adam (SGD learns slowly here).
CONTRASTIVE = dict(model__name="dual_encoder", model__outputs=16, data__name="pairs", loss__name="infonce",
                   data__train_size=512, data__eval_size=256, optim__name="adam", optim__lr=1e-3)
FLOAT32 = dict(rtol=1.3e-6, atol=1e-5)  # torch.testing's float32 tolerance (DESIGN, Numerics)


def hand_infonce(embeddings: torch.Tensor, temperature: float = 0.05, symmetric: bool = False) -> torch.Tensor:
    """InfoNCE written out from its formula: -mean_i log softmax_j(cos(q_i, k_j) / T)[i]."""
    q, k = embeddings[:, 0], embeddings[:, 1]
    cos = (q @ k.T) / (q.norm(dim=1, keepdim=True) * k.norm(dim=1)[None, :])
    logits = cos / temperature
    forward = -(logits.diagonal() - logits.logsumexp(dim=1)).mean()
    if not symmetric:
        return forward
    return (forward - (logits.diagonal() - logits.logsumexp(dim=0)).mean()) / 2


def relative_error(grads: dict, reference: dict) -> float:
    diff = math.sqrt(sum(float(((grads[n].double() - reference[n].double()) ** 2).sum()) for n in reference))
    return diff / math.sqrt(sum(float((reference[n].double() ** 2).sum()) for n in reference))


def test_infonce_is_its_formula_and_its_micro_batches_are_another_objective():
    torch.manual_seed(0)
    embeddings = torch.randn(12, 2, 5, dtype=torch.float64)
    training = build(**CONTRASTIVE, loss__symmetric=True)
    for symmetric in (False, True):
        training.loss_fn.symmetric = symmetric
        torch.testing.assert_close(training.loss_fn(embeddings, None), hand_infonce(embeddings, 0.05, symmetric))
    # The accumulation answer's identity fails: the size-weighted micro-batch losses are not the batch's.
    halves = sum(0.5 * training.loss_fn(half, None) for half in torch.tensor_split(embeddings, 2))
    assert abs(float(halves - training.loss_fn(embeddings, None))) > 0.1


@pytest.mark.parametrize("k", [2, 4, 8])
def test_first_gradient_is_the_full_batch_gradient_in_float64(tmp_path, k):
    """The first step's gradient against a hand-written full-batch gradient in float64: gradcache's
    matches to float64 rounding (float64 run) and float32 rounding (float32 run); accumulate's is off."""
    cfg = make_config(**CONTRASTIVE, trainer__dtype="float64")
    training = build_training(cfg)
    inputs, _ = training.dataset.batch(0)
    named = dict(training.model.named_parameters())
    loss = hand_infonce(training.model(inputs))
    reference = dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
    errors = {}
    for name, dtype in (("gradcache", "float64"), ("gradcache", "float32"), ("accumulate", "float32")):
        _, _, run_dir = train(tmp_path, **CONTRASTIVE, backward__name=name, backward__accumulation=k,
                              trainer__dtype=dtype, trainer__steps=1, trainer__eval=False)
        errors[name, dtype] = relative_error(record.load_first_grad(run_dir), reference)
    print(f"k={k} relative gradient error vs float64 full batch: {errors}")
    assert errors["gradcache", "float64"] < 1e-13
    assert errors["gradcache", "float32"] < 1e-6
    assert errors["accumulate", "float32"] > 0.05  # 1/k of the negatives per query


def test_gradcache_ends_where_full_ends_and_accumulate_does_not(tmp_path):
    run = dict(CONTRASTIVE, trainer__steps=40)
    full, full_params, _ = train(tmp_path, **run)
    assert full["eval_metric"] == "retrieval_accuracy"
    assert full["eval_value"] > 20 / 256  # 20x chance among the 256 held-out keys
    for k in (2, 4, 8):
        cached, params, _ = train(tmp_path, **run, backward__name="gradcache", backward__accumulation=k)
        assert cached["status"] == "ok" and cached["accumulation"] == k
        assert_params_close(params, full_params, **FLOAT32)
        assert cached["final_loss"] == pytest.approx(full["final_loss"], rel=1e-5)  # the batch's loss, logged
        _, accumulated, _ = train(tmp_path, **run, backward__name="accumulate", backward__accumulation=k)
        assert max_abs_diff(accumulated, full_params) > 1e-3
        print(f"k={k}: gradcache max |dtheta| {max_abs_diff(params, full_params):.3g}, "
              f"accumulate {max_abs_diff(accumulated, full_params):.3g}")


@pytest.mark.parametrize("options", [dict(model__shared=True), dict(loss__symmetric=True),
                                     dict(data__micro_batch_size=8, backward__accumulation=4)])
def test_gradcache_equals_full_with_a_shared_tower_a_symmetric_loss_and_loader_windows(tmp_path, options):
    overrides = {**CONTRASTIVE, "trainer__steps": 10, **options}
    _, full, _ = train(tmp_path, **overrides)
    _, cached, _ = train(tmp_path, **{"backward__name": "gradcache", "backward__accumulation": 4, **overrides})
    assert_params_close(cached, full, **FLOAT32)
    if "model__shared" in options:
        assert all(name.startswith("query_tower.") for name in cached)


def hand_written_gradcache_reference(overrides, k: int, steps: int) -> dict:
    """The full-batch loss with a graph over every micro-batch, forwarded one after another from
    the same random state: the masks gradcache's first pass draws, the full batch's gradient."""
    training = build(**overrides)
    model, optimizer = training.model, training.optimizers[0]
    for step in range(steps):
        inputs, _ = training.dataset.batch(step)
        optimizer.zero_grad()
        embeddings = torch.cat([model(x) for x in torch.tensor_split(inputs, k)])
        hand_infonce(embeddings).backward()
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_with_dropout_gradcache_is_the_full_batch_gradient_only_when_the_random_state_is_replayed(
        tmp_path, monkeypatch):
    overrides = dict(CONTRASTIVE, model__dropout=0.2, trainer__steps=8, backward__name="gradcache",
                     backward__accumulation=4)
    reference = hand_written_gradcache_reference(overrides, 4, 8)
    summary, replayed, _ = train(tmp_path, **overrides)
    assert summary["stochastic"] is True  # the coupling probe saw dropout
    assert_params_close(replayed, reference, **FLOAT32)
    # Without the replay the second forward draws new masks: the cached gradient belongs to other
    # masks than the graph it is backwarded through.
    monkeypatch.setattr(strategies.RandomState, "replayed", lambda self: nullcontext())
    _, drawn_anew, _ = train(tmp_path, **overrides)
    assert max_abs_diff(drawn_anew, reference) > 1e-3


def test_gradcache_holds_less_than_full_at_8(tmp_path):
    sizes = dict(CONTRASTIVE, data__batch_size=128, trainer__steps=1, trainer__eval=False)
    full = train(tmp_path, **sizes)[0]["peak_saved_bytes"]
    cached = {k: train(tmp_path, **sizes, backward__name="gradcache", backward__accumulation=k)[0]["peak_saved_bytes"]
              for k in (2, 8)}
    accumulated = train(tmp_path, **sizes, backward__name="accumulate", backward__accumulation=8)[0]["peak_saved_bytes"]
    print(f"peak_saved_bytes full {full}, gradcache {cached}, accumulate at 8 {accumulated}")
    assert cached[8] < 0.5 * full and cached[8] <= cached[2]


@pytest.mark.parametrize("args, message", [
    (["model=dual_encoder", "data=pairs", "loss=infonce", "loss.temperature=0"],
     "loss.temperature=0.0 is not allowed: expected > 0"),
    (["backward=gradcache"], "backward=gradcache does not fit model=mlp: it needs a model offering embed(inputs)"),
    (["model=dual_encoder", "data=pairs", "loss=infonce", "backward=gradcache", "trainer.processes=2"],
     "trainer.processes=2 is not allowed with backward=gradcache"),
])
def test_bad_input_is_one_line(args, message):
    """The command line's own lines, in-process; the command line prints each after "error: ", exits 2
    and writes nothing (tests/test_cli.py::test_bad_input_on_the_command_line_is_exit_2_one_line_and_writes_nothing)."""
    assert message in refusal(*args, "trainer.steps=1")


@pytest.mark.parametrize("overrides, message", [
    (dict(model__name="dual_encoder", loss__name="infonce"),
     "model=dual_encoder does not fit data=default: paired views need model=dual_encoder with data=pairs"),
    (dict(model__name="dual_encoder", data__name="pairs"), "loss=bce does not fit model=dual_encoder"),
    (dict(CONTRASTIVE, loss__name="custom", loss___target_="torch.nn.MSELoss", backward__name="gradcache"),
     "backward=gradcache does not fit loss=custom on model=dual_encoder: it needs a loss over the batch's "
     "embeddings offering similarity(queries, keys)"),
    (dict(CONTRASTIVE, model__dropout=1.0), "model.dropout=1.0 is not allowed: expected in [0, 1)"),
])
def test_misfits_are_refused_naming_what_is_missing(overrides, message):
    config, _, _, _ = split_arguments(overrides)
    with pytest.raises(ConfigError) as refused:
        validate(make_config(**config))
        build(**overrides)
    assert message in str(refused.value)


def test_the_bench_compares_gradcache_with_accumulate(tmp_path, monkeypatch):
    from runner import bench

    monkeypatch.chdir(tmp_path)
    assert bench.main(["--quick", "--only", "contrastive", "--out", str(tmp_path / "b.csv")]) == 0
    text = (tmp_path / "b.csv").read_text()
    assert text.count("contrastive step") == 2 and "gradcache vs accumulate" in text and "ratio <= 1.5" in text


def test_gradcache_reads_accumulation_only():
    """No micro-batch loss is weighted (the loss is the batch's), so backward.scale does not apply."""
    from runner.config.schema import BackwardConf

    gradcache = strategies.STRATEGIES["gradcache"](strategies.STRATEGIES["gradcache"].Options(accumulation=4))
    assert gradcache.accumulation == 4
    assert gradcache.ignored_switches(BackwardConf(name="gradcache", scale="mean", accumulation=4)) == [
        "backward.scale=mean is ignored by backward=gradcache: it applies to backward=sum or accumulate"]
