"""LR schedules and gradient clipping under accumulation: once per optimizer step is the full
batch's; once per micro-batch (Accelerate's adjust_scheduler exists to avoid it) is not."""
import copy
import math

import pandas as pd
import pytest
import torch

from runner.training.build import build_training
from runner.training.train import run
from tests.conftest import assert_params_close, make_config, max_abs_diff, train

SCHEDULED = dict(optim__scheduler="cosine", optim__warmup_steps=5, trainer__steps=30, backward__accumulation=4,
                 trainer__memory="off")
CLIPPED = dict(optim__clip_norm=0.05, trainer__steps=30, backward__accumulation=4, trainer__memory="off")


def test_a_schedule_per_step_matches_full_and_per_micro_batch_runs_k_times_faster(tmp_path):
    _, ref, full_dir = train(tmp_path, backward__name="full", **SCHEDULED)
    lr = pd.read_csv(full_dir / "metrics.csv")["lr"]
    # Linear warmup over 5 steps, then half a cosine to 0 at step 30 (transformers' schedule).
    expected = [0.5 * s / 5 if s < 5 else 0.25 * (1 + math.cos(math.pi * (s - 5) / 25)) for s in range(30)]
    assert lr.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-12)
    _, per_step, _ = train(tmp_path, backward__name="accumulate", **SCHEDULED)
    _, per_micro, micro_dir = train(tmp_path, backward__name="accumulate", optim__scheduler_every="micro_batch",
                                    **SCHEDULED)
    assert_params_close(per_step, ref)
    assert max_abs_diff(per_micro, ref) > 1e-3
    assert pd.read_csv(micro_dir / "metrics.csv")["lr"][1] == pytest.approx(0.5 * 4 / 5)  # 4 micro-batches in


def test_clipping_once_per_step_matches_full_and_per_micro_batch_differs(tmp_path):
    _, ref, full_dir = train(tmp_path, backward__name="full", **CLIPPED)
    assert (pd.read_csv(full_dir / "metrics.csv")["grad_norm"] > 0.05).all()  # clipping is active
    _, per_step, _ = train(tmp_path, backward__name="accumulate", **CLIPPED)
    _, per_micro, _ = train(tmp_path, backward__name="accumulate", optim__clip_every="micro_batch", **CLIPPED)
    assert_params_close(per_step, ref)
    assert max_abs_diff(per_micro, ref) > 1e-3


def test_full_with_schedule_and_clipping_matches_a_hand_written_loop(tmp_path):
    config = make_config(backward__name="full", optim__clip_norm=0.05, optim__scheduler="linear",
                         optim__warmup_steps=3, trainer__steps=12, trainer__memory="off")
    training = build_training(config)
    model = copy.deepcopy(training.model)  # the same initial parameters
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: s / 3 if s < 3 else max(0.0, (12 - s) / 9))
    for step in range(12):
        inputs, targets = training.dataset.batch(step)
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(inputs), targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        optimizer.step()
        scheduler.step()
    assert run(training, tmp_path / "run").status == "ok"
    assert_params_close(dict(training.model.named_parameters()), dict(model.named_parameters()))


@pytest.mark.parametrize("name", ["full", "sum", "separate"])
def test_per_micro_batch_keys_a_strategy_does_not_read_change_nothing(tmp_path, name):
    """runner.config.backward_options.PER_MICRO_BATCH_UPDATES is what a sweep's reuse trusts: a
    strategy not listed for a key trains bit for bit alike at either value of it."""
    from runner.config.backward_options import PER_MICRO_BATCH_UPDATES
    both = {**SCHEDULED, **CLIPPED, "trainer__steps": 8}
    task = dict(model__name="multitask", loss__name="multitask") if name == "separate" else {}
    _, at_step, _ = train(tmp_path, backward__name=name, **task, **both)
    unread = [key for key in ("scheduler_every", "clip_every") if key not in PER_MICRO_BATCH_UPDATES.get(name, ())]
    _, per_micro, _ = train(tmp_path, backward__name=name, **task, **both,
                            **{f"optim__{key}": "micro_batch" for key in unread})
    assert unread and max_abs_diff(per_micro, at_step) == 0.0
