"""State that changes once per optimizer step: trainer.ema (a moving average of the weights) and
backward.step_in_backward (the optimizer step inside backward), each per step or per micro-batch."""
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from runner.analysis.claims import evaluate_claim
from runner.analysis.runs import compare_to, load_run
from runner.config.identity import config_record, used_config_id
from runner.recording import record
from runner.training.build import build_training
from tests.conftest import (
    make_config,
    max_abs_diff,
    read_summary,
    refusal,
    train,
)

F32 = dict(rtol=1.3e-6, atol=1e-5)  # torch.testing's float32 defaults
K, DECAY = 4, 0.99


def ema_of(run_dir) -> dict:
    names = read_summary(run_dir)["param_names"]
    state = record.load_ema_weights(run_dir)
    return {n: state[n] for n in names}


@pytest.fixture(scope="session")
def ema_runs(tmp_path_factory):
    """full, and accumulate k=4 with the EMA per step and per micro-batch (decay 0.99, 50 steps)."""
    tmp = tmp_path_factory.mktemp("ema")
    common = dict(trainer__steps=50, trainer__ema=DECAY)
    runs = {"full": train(tmp, **common),
            "step": train(tmp, backward__name="accumulate", backward__accumulation=K, **common),
            "micro_batch": train(tmp, backward__name="accumulate", backward__accumulation=K,
                                 trainer__ema_every="micro_batch", **common)}
    return runs


def test_ema_per_step_is_fulls_ema_and_per_micro_batch_differs(ema_runs):
    full, step, micro = (ema_runs[name] for name in ("full", "step", "micro_batch"))
    for summary, _, run_dir in (full, step, micro):
        assert summary["status"] == "ok" and (run_dir / record.EMA_WEIGHTS).exists()
        assert summary["ema_param_sha256"] and summary["ema_eval_value"] is not None
        assert summary["ema_param_sha256"] != summary["param_sha256"]  # the average is not the weights
    per_step = max_abs_diff(ema_of(step[2]), ema_of(full[2]))
    per_micro_batch = max_abs_diff(ema_of(micro[2]), ema_of(full[2]))
    print(f"EMA vs full's EMA: per step {per_step:.3g}, per micro-batch {per_micro_batch:.3g}")
    for name, value in ema_of(step[2]).items():
        torch.testing.assert_close(value, ema_of(full[2])[name], **F32)
    assert per_micro_batch > 1e-2
    # The average never feeds back: the trained weights are full's either way.
    assert max_abs_diff(micro[1], full[1]) < 1e-5 and max_abs_diff(step[1], full[1]) < 1e-5


def test_comparisons_and_claims_compare_the_averages(ema_runs):
    full, step, micro = (load_run(ema_runs[name][2]) for name in ("full", "step", "micro_batch"))
    cache = {}
    assert compare_to(step, full, cache).ema_max_abs_diff < 1e-5
    assert compare_to(micro, full, cache).ema_max_abs_diff > 1e-2
    assert compare_to(micro, full, cache).verdict == "equivalent"  # the weights themselves
    assert compare_to(micro, full, cache, weights="ema").verdict == "differs"
    runs = [full, step, micro]
    claim = {"kind": "equivalent", "weights": "ema", "runs": {"trainer.ema_every": "step", "backward": "accumulate"},
             "reference": {"backward": "full"}}
    assert evaluate_claim(claim, runs, cache).holds
    assert not evaluate_claim({**claim, "runs": {"trainer.ema_every": "micro_batch"}}, runs, cache).holds
    bad = evaluate_claim({**claim, "weights": "teacher"}, runs, cache)
    assert not bad.holds and "weights 'teacher' is unknown: expected one of ['ema', 'params']" in bad.detail


def hand_loop(steps: int, every: str, dtype=torch.float32):
    """The accumulation answer's loop on the runner's model and data, with torch's EMA beside it:
    once after optimizer.step(), or also in the loop body after each micro-batch (the bug)."""
    training = build_training(make_config(trainer__dtype=str(dtype).split(".")[1]))
    model, objective = training.model, torch.nn.BCEWithLogitsLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)
    trajectory = []  # (the weights each EMA update read)
    for step in range(steps):
        inputs, targets = training.dataset.batch(step)
        optimizer.zero_grad()
        for index, (x, y) in enumerate(zip(inputs.chunk(K), targets.chunk(K))):
            (objective(model(x), y) / K).backward()
            if every == "micro_batch" and index < K - 1:
                ema.update_parameters(model)
                trajectory.append({n: p.detach().clone() for n, p in model.named_parameters()})
        optimizer.step()
        ema.update_parameters(model)
        trajectory.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return dict(ema.module.named_parameters()), trajectory


@pytest.mark.parametrize("every", ["step", "micro_batch"])
def test_ema_matches_swa_utils_in_a_hand_written_loop(tmp_path, every):
    summary, _, run_dir = train(tmp_path, trainer__steps=30, trainer__ema=DECAY, trainer__ema_every=every,
                                backward__name="accumulate", backward__accumulation=K)
    expected, _ = hand_loop(30, every)
    for name, value in ema_of(run_dir).items():
        torch.testing.assert_close(value, expected[name].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("every", ["step", "micro_batch"])
def test_ema_is_the_formula_in_float64(tmp_path, every):
    """ema_1 = θ read first; ema_n = d·ema_(n-1) + (1-d)·θ_n over the weights each update read."""
    _, _, run_dir = train(tmp_path, trainer__steps=20, trainer__ema=DECAY, trainer__ema_every=every,
                          trainer__dtype="float64", backward__name="accumulate", backward__accumulation=K)
    _, trajectory = hand_loop(20, every, torch.float64)
    assert len(trajectory) == (20 * K if every == "micro_batch" else 20)
    formula = dict(trajectory[0])
    for weights in trajectory[1:]:
        formula = {n: DECAY * formula[n] + (1 - DECAY) * weights[n] for n in formula}
    for name, value in ema_of(run_dir).items():
        torch.testing.assert_close(value, formula[name], rtol=1e-12, atol=1e-12)


# SGD's k steps on 1/k-weighted gradients nearly add up to one step; Adam's are each full-size.
@pytest.mark.parametrize("optim, apart", [("sgd", 1e-3), ("adam", 1e-2)])
def test_step_in_backward_last_is_accumulate_and_every_differs(tmp_path, optim, apart):
    common = dict(trainer__steps=40, optim__name=optim, optim__lr=0.5 if optim == "sgd" else 1e-3)
    accumulate = dict(backward__name="accumulate", backward__accumulation=K)
    full = train(tmp_path, **common)[1]
    ordinary = train(tmp_path, **common, **accumulate)[1]
    last_summary, last, _ = train(tmp_path, **common, **accumulate, backward__step_in_backward="last")
    every_summary, every, _ = train(tmp_path, **common, **accumulate, backward__step_in_backward="every")
    assert last_summary["status"] == every_summary["status"] == "ok"
    print(f"{optim}: last vs full {max_abs_diff(last, full):.3g}, every vs full {max_abs_diff(every, full):.3g}")
    assert all(torch.equal(last[n], ordinary[n]) for n in last)  # the same arithmetic, bit for bit
    for name in last:
        torch.testing.assert_close(last[name], full[name], **F32)
    assert max_abs_diff(every, full) > apart


def test_step_in_backward_every_is_the_tutorials_hook_under_accumulation(tmp_path):
    """PyTorch's optimizer-in-backward tutorial (one Adam per parameter, stepped and zeroed by the
    parameter's post-accumulate-grad hook), called from the accumulation answer's loop."""
    steps = 20
    _, runner_params, _ = train(tmp_path, trainer__steps=steps, optim__name="adam", optim__lr=1e-3,
                                backward__name="accumulate", backward__accumulation=K,
                                backward__step_in_backward="every")
    training = build_training(make_config())
    model, objective = training.model, torch.nn.BCEWithLogitsLoss()
    optimizer_dict = {p: torch.optim.Adam([p], lr=1e-3) for p in model.parameters()}

    def optimizer_hook(parameter) -> None:
        optimizer_dict[parameter].step()
        optimizer_dict[parameter].zero_grad()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(optimizer_hook)
    for step in range(steps):
        inputs, targets = training.dataset.batch(step)
        for x, y in zip(inputs.chunk(K), targets.chunk(K)):
            (objective(model(x), y) / K).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(runner_params[name], p.detach(), rtol=0, atol=0)


def test_step_in_backward_steps_each_schedule_once_per_step(tmp_path):
    common = dict(trainer__steps=20, optim__scheduler="cosine", optim__warmup_steps=5,
                  backward__name="accumulate", backward__accumulation=K)
    ordinary = train(tmp_path, **common)[1]
    last = train(tmp_path, **common, backward__step_in_backward="last")[1]
    assert all(torch.equal(last[n], ordinary[n]) for n in last)


def test_step_in_backward_with_another_strategy_is_ignored_with_a_warning(tmp_path):
    summary, params, _ = train(tmp_path, trainer__steps=5, backward__step_in_backward="last")
    full = train(tmp_path, trainer__steps=5)[1]
    assert "backward.step_in_backward=last is ignored by backward=full: it applies to backward=accumulate" \
        in summary["warnings"]
    assert all(torch.equal(params[n], full[n]) for n in params)


def test_ema_every_is_set_aside_where_it_changes_nothing():
    def used(**overrides):
        cfg = make_config(**overrides)
        return used_config_id(cfg, config_record(cfg, {}, {}, {}))

    accumulate = dict(backward__name="accumulate", backward__accumulation=K)
    assert used(trainer__ema_every="micro_batch") == used()  # no average
    assert used(trainer__ema=DECAY, trainer__ema_every="micro_batch") == used(trainer__ema=DECAY)  # full
    assert used(trainer__ema=DECAY, trainer__ema_every="micro_batch", **accumulate) != \
        used(trainer__ema=DECAY, **accumulate)
    assert used(trainer__ema=DECAY) != used()


def test_a_resumed_run_continues_its_average(tmp_path):
    common = dict(trainer__steps=10, trainer__ema=DECAY, trainer__ema_every="micro_batch",
                  backward__name="accumulate", backward__accumulation=K)
    straight = train(tmp_path, **common)
    first = train(tmp_path, **{**common, "trainer__steps": 5}, trainer__checkpoint_every=2)
    from runner.recording import checkpoint
    from runner.training.train import run

    resumed = build_training(make_config(**common))
    state = checkpoint.load(first[2])
    outcome = run(resumed, first[2], record.read_summary(first[2]), resume=state)
    assert outcome.status == "ok"
    assert outcome.summary.ema_param_sha256 == straight[0]["ema_param_sha256"]


@pytest.mark.parametrize("args, needle", [
    (["trainer.ema=1.5"], "error: trainer.ema=1.5 is not allowed: expected in [0, 1) (the EMA's decay; 0 = off)"),
    (["backward=accumulate", "backward.step_in_backward=last", "optim.clip_norm=1.0"],
     "error: backward.step_in_backward=last is not allowed with optim.clip_norm=1.0: clipping needs the whole "
     "gradient"),
    (["backward=accumulate", "backward.step_in_backward=every", "trainer.processes=2"],
     "error: backward.step_in_backward=every is not allowed with trainer.processes=2"),
    (["backward=accumulate", "backward.step_in_backward=last", "trainer.autocast=fp16"],
     "error: backward.step_in_backward=last is not allowed with trainer.autocast=fp16"),
    (["trainer.ema=0.9", "trainer.processes=2", "trainer.parallel=fsdp"],
     "error: trainer.ema=0.9 is not allowed with trainer.parallel=fsdp"),
])
def test_bad_input_is_refused_in_one_line(args, needle):
    """The command line's own lines, in-process; the command line prints each after "error: ", exits 2
    and writes nothing (tests/test_cli.py::test_bad_input_on_the_command_line_is_exit_2_one_line_and_writes_nothing)."""
    assert needle.removeprefix("error: ") in refusal(*args)


@pytest.mark.parametrize("strategy", ["full", "sum"])
def test_ema_every_is_once_per_step_for_a_strategy_without_micro_batch_backwards(tmp_path, strategy):
    """full takes one micro-batch a step and sum backwards its micro-batches together: there is no
    'between micro-batches' to average in, so ema_every=micro_batch is the per-step average there."""
    common = dict(trainer__steps=10, trainer__ema=DECAY, backward__name=strategy, backward__accumulation=K)
    per_step = train(tmp_path, **common)[0]
    per_micro_batch = train(tmp_path, **common, trainer__ema_every="micro_batch")[0]
    assert per_micro_batch["ema_param_sha256"] == per_step["ema_param_sha256"]
