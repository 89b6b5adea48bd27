"""Seeded data, the teacher's labels, and the micro-batch split."""
import pytest
import torch

from runner.components.data import TaskSpec, micro_batches, synthetic
from runner.components.models import IMAGE_SHAPE

SPEC = TaskSpec(IMAGE_SHAPE, "multilabel", 5)


def test_uneven_split_sizes_and_weights():
    x, y = torch.randn(30, 3), torch.randn(30, 2)
    mbs = micro_batches(x, y, 4)
    assert [len(mb.inputs) for mb in mbs] == [8, 8, 7, 7]
    assert [mb.weight for mb in mbs] == [8 / 30, 8 / 30, 7 / 30, 7 / 30]
    assert [mb.weight for mb in micro_batches(x, y, 4, "mean")] == [0.25] * 4
    torch.testing.assert_close(torch.cat([mb.targets for mb in mbs]), y, rtol=0, atol=0)


def test_size_weighted_identity_holds_for_mean_losses():
    """f(x,y) = sum_i (n_i/b) f(x_i,y_i), the accumulation answer's identity, on uneven splits."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(30, 5, generator=g, dtype=torch.float64)
    targets = (torch.rand(30, 5, generator=g) < 0.5).double()
    f = torch.nn.BCEWithLogitsLoss()
    for k in (2, 3, 4, 7, 30):
        pieces = micro_batches(logits, targets, k)
        weighted = sum(mb.weight * f(mb.inputs, mb.targets) for mb in pieces)
        assert weighted.item() == pytest.approx(f(logits, targets).item(), rel=1e-14)
    # Dividing by k instead is wrong as soon as the split is uneven.
    mean_scaled = sum(mb.weight * f(mb.inputs, mb.targets) for mb in micro_batches(logits, targets, 4, "mean"))
    assert abs(mean_scaled.item() - f(logits, targets).item()) > 1e-6


def test_split_rejects_more_micro_batches_than_examples():
    with pytest.raises(ValueError, match="cannot split"):
        micro_batches(torch.zeros(3, 1), torch.zeros(3, 1), 4)


def test_dict_targets_split_together():
    x = torch.arange(10.0)[:, None]
    y = {"cls": torch.arange(10.0)[:, None], "reg": -torch.arange(10.0)[:, None]}
    mbs = micro_batches(x, y, 3)
    assert [len(mb.targets["reg"]) for mb in mbs] == [4, 3, 3]
    assert torch.equal(mbs[1].targets["reg"], -mbs[1].inputs)


def test_data_is_a_function_of_the_seed_alone_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = synthetic(SPEC, seed=7, train_size=256, eval_size=64, batch_size=32)
    assert torch.equal(torch.get_rng_state(), before)
    b = synthetic(SPEC, seed=7, train_size=256, eval_size=64, batch_size=32)
    c = synthetic(SPEC, seed=8, train_size=256, eval_size=64, batch_size=32)
    for step in (0, 5, 8, 17):  # steps 8+ come from later epochs
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.batch(0)[0], c.batch(0)[0])
    # A new epoch reshuffles.
    assert not torch.equal(a.batch(0)[0], a.batch(8)[0])


def test_batch_of_a_step_does_not_depend_on_history():
    a = synthetic(SPEC, seed=1, train_size=256, eval_size=0, batch_size=32)
    b = synthetic(SPEC, seed=1, train_size=256, eval_size=0, batch_size=32)
    for step in range(20):
        a.batch(step)
    assert torch.equal(a.batch(19)[0], b.batch(19)[0])  # b jumps straight there (resume)


@pytest.mark.parametrize("rate", [0.5, 0.01])
def test_positive_rate(rate):
    d = synthetic(SPEC, seed=0, train_size=4096, eval_size=1024, batch_size=32, positive_rate=rate)
    share = d.train_targets.mean().item()
    assert share == pytest.approx(rate, rel=0.1, abs=0.002)
    assert set(d.train_targets.unique().tolist()) <= {0.0, 1.0}
    assert d.eval_inputs.shape == (1024, *IMAGE_SHAPE)
