"""model=moe and Switch Transformer's load-balancing loss under micro-batches: the window's expert
load counted first (loss.aux_stats=window, torchtitan PR #4772, arXiv 2501.11873) is the full batch's
loss and gradient; each micro-batch's own (aux_stats=micro_batch, refused by torchtitan PR #3000) is not."""
import pandas as pd
import pytest
import torch

from runner import api
from runner.components.data import IGNORE_INDEX
from runner.components.losses import LoadBalancedTokenLoss
from runner.components.models import MoELM
from tests.conftest import (
    assert_params_close,
    build,
    max_abs_diff,
    refusal,
    train,
)

# Short topic-clustered sequences on a small top-2-of-8 model: a step takes milliseconds.
MOE = dict(model__name="moe", data__name="seq", loss__name="lm", loss__aux_weight=0.01, data__topics=4,
           model__hidden=16, model__depth=2, data__max_length=12, data__train_size=512, data__eval_size=64, trainer__memory="off")


def first_step(**overrides):
    """One optimizer step on the first batch: (its StepResult, each parameter's gradient, the training)."""
    training = build(**MOE, **overrides)
    window = training.batches.window(0)
    result = training.strategy.step(training.model, training.loss_fn, training.optimizers, window.inputs,
                                    window.targets)
    return result, {n: p.grad.clone() for n, p in training.model.named_parameters()}, training


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_the_switch_loss_and_its_router_gradient_by_hand():
    """E * sum_i f_i * P_i written out token by token in float64, and its gradient through the
    softmax: d/dz_tj = E/N * p_tj * (f_j - sum_i f_i p_ti), then d/dW = sum_t g_t h_t^T."""
    torch.manual_seed(0)
    experts, top_k = 8, 2
    model = MoELM(vocab=16, hidden=16, experts=experts, top_k=top_k).double()
    tokens = torch.randint(0, 16, (6, 7))
    labels = torch.randint(0, 16, (6, 7))
    labels[0, 3:] = labels[4, 1:] = IGNORE_INDEX
    loss_fn = LoadBalancedTokenLoss(aux_weight=0.5)
    aux = loss_fn.parts(model(tokens), labels)["aux"]
    assert aux.requires_grad

    hidden = model.features(tokens).detach()
    probs = torch.softmax(hidden @ model.moe.router.weight.detach().T, dim=-1)
    scored = [(b, t) for b in range(6) for t in range(7) if labels[b, t] != IGNORE_INDEX]
    counts = [0] * experts
    for b, t in scored:
        for i in sorted(range(experts), key=lambda i: -float(probs[b, t, i]))[:top_k]:
            counts[i] += 1
    n = len(scored)
    f = [c / (n * top_k) for c in counts]
    P = [sum(float(probs[b, t, i]) for b, t in scored) / n for i in range(experts)]
    by_hand = experts * sum(fi * pi for fi, pi in zip(f, P))
    assert abs(aux.item() / 0.5 - by_hand) < 1e-12

    grad = torch.zeros_like(model.moe.router.weight)
    for b, t in scored:
        p = probs[b, t]
        g = experts / n * p * (torch.tensor(f, dtype=torch.float64) - (torch.tensor(f, dtype=torch.float64) * p).sum())
        grad += torch.outer(g, hidden[b, t])
    (autograd,) = torch.autograd.grad(aux / 0.5, model.moe.router.weight)
    torch.testing.assert_close(autograd, grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", ["sum", "accumulate"])
@pytest.mark.parametrize("k", [2, 4])
def test_window_statistics_give_the_full_batch_gradient_and_micro_batch_statistics_do_not(strategy, k):
    full, full_grad, _ = first_step(backward__name="full")
    window, window_grad, _ = first_step(backward__name=strategy, backward__accumulation=k)
    for name in full_grad:
        torch.testing.assert_close(window_grad[name], full_grad[name], msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(window.parts["aux"], full.parts["aux"])
    own, own_grad, _ = first_step(backward__name=strategy, backward__accumulation=k, loss__aux_stats="micro_batch")
    router = "moe.router.weight"
    # Measured on the first batch: the router's gradient is 21% (k = 2) and 26% (k = 4) off.
    assert relative_error(own_grad[router], full_grad[router]) > 0.15
    assert float(own.parts["aux"]) > float(full.parts["aux"])  # each micro-batch's load is less even
    torch.testing.assert_close(own.parts["lm"], full.parts["lm"])  # only the aux term is wrong


def test_training_with_window_statistics_ends_where_full_ends(tmp_path):
    _, ref, _ = train(tmp_path, backward__name="full", trainer__steps=15, **MOE)
    _, window, _ = train(tmp_path, backward__name="accumulate", backward__accumulation=4, trainer__steps=15, **MOE)
    assert_params_close(window, ref)
    _, own, _ = train(tmp_path, backward__name="accumulate", backward__accumulation=4, trainer__steps=15,
                      loss__aux_stats="micro_batch", **MOE)
    assert max_abs_diff(own, ref) > 1e-4  # measured 5.3e-4 after 15 steps; float32 tolerance is ~1e-5


def test_loader_mode_windows_count_their_load_first_too(tmp_path):
    """data.micro_batch_size: the window the loader drew is counted before its micro-batches' forwards."""
    loader = {**MOE, "data__train_size": 100, "data__eval_size": 16, "trainer__steps": 8, "data__micro_batch_size": 8,
              "backward__accumulation": 4}
    _, ref, _ = train(tmp_path, backward__name="full", **loader)
    _, window, _ = train(tmp_path, backward__name="accumulate", **loader)
    _, own, _ = train(tmp_path, backward__name="accumulate", loss__aux_stats="micro_batch", **loader)
    assert_params_close(window, ref)
    assert max_abs_diff(own, ref) > 1e-5  # measured 7.1e-5 after 8 steps


def test_aux_stats_is_one_training_where_nothing_is_split():
    def used(**overrides):
        return build(**{**MOE, **overrides}).used_config_id()

    assert used(backward__name="full") == used(backward__name="full", loss__aux_stats="micro_batch")
    assert used(backward__name="sum", backward__accumulation=2) != \
        used(backward__name="sum", backward__accumulation=2, loss__aux_stats="micro_batch")


class Calls:
    """Counts the forward calls of a module (a forward hook)."""

    def __init__(self, module):
        self.count = 0
        module.register_forward_hook(lambda *args: setattr(self, "count", self.count + 1))


@pytest.mark.parametrize("strategy", ["sum", "accumulate"])
def test_the_window_pass_stops_at_the_router_and_the_experts_run_once_per_micro_batch(strategy):
    for stats, router_calls in (("window", 4 + 1), ("micro_batch", 4)):
        training = build(**MOE, backward__name=strategy, backward__accumulation=4,
                                              loss__aux_stats=stats)
        router = Calls(training.model.moe.router)
        experts = [Calls(expert) for expert in training.model.moe.experts]
        window = training.batches.window(0)
        training.strategy.step(training.model, training.loss_fn, training.optimizers, window.inputs, window.targets)
        assert router.count == router_calls, stats
        assert [e.count for e in experts] == [4] * 8, stats
    full = build(**MOE, backward__name="full")
    router, experts = Calls(full.model.moe.router), [Calls(expert) for expert in full.model.moe.experts]
    window = full.batches.window(0)
    full.strategy.step(full.model, full.loss_fn, full.optimizers, window.inputs, window.targets)
    assert router.count == 1 and [e.count for e in experts] == [1] * 8  # full: the batch's own load


def micro_batch_load_error(**overrides) -> float:
    """The largest gap between a micro-batch's expert shares f_i (k = 4) and the window's, on the first batch."""
    training = build(**{**MOE, **overrides})
    window = training.batches.window(0)
    mask = training.model.route(window.inputs)
    loads = [training.loss_fn.count_load(m, t) for m, t in zip(mask.tensor_split(4), window.targets.tensor_split(4))]
    whole = sum(loads) / sum(loads).sum()
    return float(max((load / load.sum() - whole).abs().max() for load in loads))


def test_topics_group_each_batch_so_that_micro_batch_loads_differ_from_the_window():
    training = build(**MOE)
    window = training.batches.window(0)
    topics = training.dataset.train_topics
    # Each batch's rows are grouped by topic, and a topic favours its quarter of the vocabulary.
    first_tokens = window.inputs[:, 0]
    assert int(topics.max()) == 3 and bool((first_tokens[:8] < 8).float().mean() > 0.7)
    assert bool((first_tokens[-8:] >= 8).float().mean() > 0.7)
    clustered, plain = micro_batch_load_error(), micro_batch_load_error(data__topics=0)
    assert clustered > 2 * plain, (clustered, plain)


def test_metrics_log_the_aux_part_and_the_load_spread(tmp_path):
    summary, _, run_dir = train(tmp_path, backward__name="accumulate", backward__accumulation=2, trainer__steps=5,
                                **MOE)
    assert summary["status"] == "ok" and summary["eval_metric"] == "token_accuracy"
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert {"loss_lm", "loss_aux", "expert_load_cv"} <= set(metrics.columns)
    torch.testing.assert_close(torch.tensor(metrics.loss_lm + metrics.loss_aux), torch.tensor(metrics.loss))
    assert (metrics.loss_aux > 0.01 * 0.99).all() and (metrics.expert_load_cv > 0).all()
    flow = {(row["module"], row["component"]): row["receives_gradient"] for row in summary["gradient_flow"]}
    assert flow[("moe", "aux")] and flow[("moe", "lm")] and not flow[("out", "aux")]
    # Without an aux term the model trains on the lm loss alone, with no extra columns.
    plain, _, plain_dir = train(tmp_path, trainer__steps=2, **{**MOE, "loss__aux_weight": 0.0})
    assert plain["status"] == "ok"
    assert not {"loss_aux", "expert_load_cv"} & set(pd.read_csv(plain_dir / "metrics.csv").columns)


MOE_ARGS = ["model=moe", "data=seq", "loss=lm"]


@pytest.mark.parametrize("overrides, message", [
    ([*MOE_ARGS, "model.top_k=9"], "model.top_k=9 is not allowed: expected an integer in 1..model.experts (8)"),
    (["model=seq", "data=seq", "loss=lm", "loss.aux_weight=0.01"],
     "loss.aux_weight=0.01 is not allowed with model=seq: it balances a mixture-of-experts router, expected "
     "model=moe (or loss.aux_weight=0)"),
    ([*MOE_ARGS, "loss.aux_weight=-1"],
     "loss.aux_weight=-1.0 is not allowed: expected >= 0 (0 = no load-balancing loss)"),
])
def test_bad_input_is_one_line(overrides, message):
    """The command line's own lines, in-process; the command line prints each after "error: ", exits 2
    and writes nothing (tests/test_cli.py::test_bad_input_on_the_command_line_is_exit_2_one_line_and_writes_nothing)."""
    assert message in refusal(*overrides, "trainer.steps=1")


def test_a_key_of_another_loss_is_ignored_with_a_warning():
    """loss.aux_weight is loss=lm's (its class declares it): under loss=bce it is ignored with a warning, as
    a backward.* option of another strategy is, so that one sweep can cross the losses."""
    training = api.compose(["loss=bce", "loss.aux_weight=0.01", "trainer.steps=1"])
    assert training.warnings() == ["loss.aux_weight=0.01 is ignored by loss=bce: it applies to loss=lm"]
    assert training.loss_kwargs == {} and training.used_config_id() == api.compose(["trainer.steps=1"]).used_config_id()
