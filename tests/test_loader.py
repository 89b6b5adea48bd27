"""Loader mode: micro-batches through a DataLoader, windows of k, epochs, and the partial last
window (Lightning #19987 divides it by k)."""
import pandas as pd
import pytest
import torch

from runner.components.data import TaskSpec, synthetic
from runner.components.loader import LoaderWindows
from runner.components.models import IMAGE_SHAPE
from runner.config.schema import ConfigError, validate
from runner.training.build import build_training
from tests.conftest import assert_params_close, make_config, max_abs_diff, train

# 40 rows in micro-batches of 4: 10 per epoch, windows of 4, 4 and a partial 2.
LOADER = dict(data__micro_batch_size=4, data__train_size=40, backward__accumulation=4, trainer__steps=30,
              trainer__memory="off")


def windows(k=4, drop=False, rows=42, carry=False):
    dataset = synthetic(TaskSpec(IMAGE_SHAPE, "multilabel", 5), seed=0, train_size=rows, eval_size=0, batch_size=4)
    return dataset, LoaderWindows(dataset, micro_batch_size=4, k=k, drop_partial=drop, carry=carry)


@pytest.mark.parametrize("rows,k", [(42, 4), (12, 4)])  # 11 micro-batches an epoch; and an epoch shorter than k
def test_carried_windows_run_across_epochs_as_deepspeeds_boundary_does(rows, k):
    """partial_window=carry: window s is the stream's micro-batches s*k .. s*k+k-1, epochs one after another
    (DeepSpeed steps when micro_steps % k == 0, with no notion of epochs): every window holds k micro-batches,
    and the one that crosses an epoch's end holds that epoch's last micro-batches, then the next epoch's first."""
    _, exact = windows(k=k, rows=rows)
    _, carried = windows(k=k, rows=rows, carry=True)
    per_epoch = -(-rows // 4)
    stream = [(epoch, x) for epoch in range(3) for x, _ in exact.loader(epoch)]
    for step in range(2 * per_epoch // k):
        window = carried.window(step)
        drawn = stream[step * k:(step + 1) * k]
        assert len(window.sizes) == k and window.epoch == drawn[0][0]
        assert torch.equal(window.inputs, torch.cat([x for _, x in drawn]))
    crossing = carried.window(per_epoch // k)  # holds the first epoch's last micro-batches and the second's first
    assert torch.equal(crossing.inputs, torch.cat([x for _, x in stream[per_epoch // k * k:(per_epoch // k + 1) * k]]))
    assert {e for e, _ in stream[per_epoch // k * k:(per_epoch // k + 1) * k]} == {0, 1}


def test_a_carried_run_steps_on_full_windows_only(tmp_path):
    """40 rows in micro-batches of 4, k=4: exact steps on windows of 16, 16 and 8 each epoch; carry on 16 always,
    so it trains something else than the full-batch reference on the same loader windows."""
    summary, carried, carried_dir = train(tmp_path, backward__name="accumulate", backward__partial_window="carry",
                                          **LOADER)
    _, exact, exact_dir = train(tmp_path, backward__name="accumulate", **LOADER)
    assert summary["status"] == "ok"
    assert set(pd.read_csv(carried_dir / "metrics.csv")["window_size"]) == {16}
    assert set(pd.read_csv(exact_dir / "metrics.csv")["window_size"]) == {16, 8}
    assert max_abs_diff(carried, exact) > 1e-4


def test_an_epoch_draws_every_row_once_in_windows_of_k_and_jumps_land_where_steps_would():
    dataset, loader = windows()  # 42 rows: 10 micro-batches of 4 and one of 2; windows of 16, 16, 10
    row_of = {tuple(x.flatten()[:4].tolist()): i for i, x in enumerate(dataset.train_inputs)}
    epoch = [loader.window(step) for step in range(3)]
    assert [w.sizes for w in epoch] == [[4, 4, 4, 4], [4, 4, 4, 4], [4, 4, 2]]
    assert [w.columns() for w in epoch][-1] == {"epoch": 0, "window_size": 10}
    seen = sorted(row_of[tuple(x.flatten()[:4].tolist())] for w in epoch for x in w.inputs)
    assert seen == list(range(42))
    assert loader.window(3).epoch == 1 and not torch.equal(loader.window(3).inputs, epoch[0].inputs)  # reshuffled
    _, fresh = windows()
    assert torch.equal(fresh.window(4).inputs, loader.window(4).inputs)  # a resume's jump: the same window
    _, dropping = windows(drop=True)
    assert [dropping.window(s).epoch for s in range(4)] == [0, 0, 1, 1]


def test_partial_windows_exact_matches_full_and_k_and_drop_differ(tmp_path):
    _, ref, full_dir = train(tmp_path, backward__name="full", **LOADER)
    metrics = pd.read_csv(full_dir / "metrics.csv")
    assert list(metrics["window_size"][:4]) == [16, 16, 8, 16] and list(metrics["epoch"][:4]) == [0, 0, 0, 1]
    for strategy in ("sum", "accumulate"):
        _, params, _ = train(tmp_path, backward__name=strategy, **LOADER)
        assert_params_close(params, ref)
    _, by_k, _ = train(tmp_path, backward__name="accumulate", backward__partial_window="k", **LOADER)
    _, dropped, drop_dir = train(tmp_path, backward__name="accumulate", backward__partial_window="drop", **LOADER)
    assert max_abs_diff(by_k, ref) > 1e-3 and max_abs_diff(dropped, ref) > 1e-3
    assert set(pd.read_csv(drop_dir / "metrics.csv")["window_size"]) == {16}
    # Without a partial window (k divides the epoch), k is exact too: the bug lives in the last window.
    even = {**LOADER, "data__train_size": 32}
    _, even_ref, _ = train(tmp_path, backward__name="full", **even)
    _, even_k, _ = train(tmp_path, backward__name="accumulate", backward__partial_window="k", **even)
    assert_params_close(even_k, even_ref)


def test_a_partial_window_of_tokens_is_weighted_by_its_tokens(tmp_path):
    seq = dict(model__name="seq", data__name="seq", loss__name="lm", model__hidden=16, model__depth=1,
               data__max_length=12, data__eval_size=16, **{**LOADER, "trainer__steps": 12})
    _, ref, _ = train(tmp_path, backward__name="full", **seq)
    _, exact, run_dir = train(tmp_path, backward__name="accumulate", **seq)
    _, by_k, _ = train(tmp_path, backward__name="accumulate", backward__partial_window="k", **seq)
    assert_params_close(exact, ref)
    assert max_abs_diff(by_k, ref) > 1e-4
    assert "tokens" in pd.read_csv(run_dir / "metrics.csv")


@pytest.mark.parametrize("overrides,needle", [
    (dict(data__micro_batch_size=5000), "data.micro_batch_size=5000 is not allowed: expected at most"),
    (dict(data__micro_batch_size=8, data__train_size=24, backward__name="accumulate", backward__accumulation=4,
          backward__partial_window="drop"), "backward.partial_window=drop leaves no window"),
])
def test_bad_loader_settings_name_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        config = make_config(**overrides)
        validate(config)
        build_training(config)
