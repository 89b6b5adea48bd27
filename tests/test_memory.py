"""The saved-activation meter and what it shows about sum vs accumulate."""
import pytest
import torch

from runner.execution.memory import SavedTensorsMeter
from tests.conftest import train


def test_counts_saved_bytes_and_releases_them_with_the_graph():
    x = torch.randn(100, 10, requires_grad=True)  # 4000 bytes
    with SavedTensorsMeter() as meter:
        y = (x * x).sum()  # mul saves x twice: counted once
    assert meter.peak == 4000 and meter.current == 4000
    y.backward()
    del y
    assert meter.current == 0 and meter.peak == 4000


def test_a_view_counts_its_own_bytes():
    w = torch.randn(10, requires_grad=True)
    x = torch.randn(100, 10)
    with SavedTensorsMeter() as meter:
        # Only w needs a gradient, so autograd saves the 25-row slice (1000 bytes), not x (4000).
        (x[:25] * w).sum()
    assert meter.peak == 25 * 10 * 4


def test_parameters_saved_by_autograd_count():
    layer = torch.nn.Linear(10, 20)
    h = torch.randn(4, 10, requires_grad=True)
    with SavedTensorsMeter() as meter:
        layer(h).sum()  # saves the input (160 B) and the weight (800 B) for the two gradients
    assert meter.peak == 4 * 10 * 4 + 20 * 10 * 4


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_sum_holds_what_full_holds_and_accumulate_falls_as_one_over_k(tmp_path, model):
    def peak(strategy, k):
        return train(tmp_path, model__name=model, backward__name=strategy, backward__accumulation=k,
                     trainer__steps=1)[0]["peak_saved_bytes"]

    full = peak("full", 1)
    for k in (1, 2, 4, 8):
        s, a = peak("sum", k), peak("accumulate", k)
        assert s == pytest.approx(full, rel=0.05)
        assert a == pytest.approx(full / k, rel=0.25)
    assert peak("sum", 8) > 5 * peak("accumulate", 8)


def test_memory_is_measured_on_the_first_step_unless_asked(tmp_path):
    import pandas as pd

    _, _, first = train(tmp_path, trainer__steps=5)
    _, _, every = train(tmp_path, trainer__steps=5, trainer__memory="every")
    _, _, off = train(tmp_path, trainer__steps=5, trainer__memory="off")
    assert pd.read_csv(first / "metrics.csv")["peak_saved_bytes"].notna().tolist() == [True] + [False] * 4
    assert pd.read_csv(every / "metrics.csv")["peak_saved_bytes"].notna().all()
    assert "peak_saved_bytes" not in pd.read_csv(off / "metrics.csv").columns


def test_the_meter_keeps_autograds_inplace_check():
    """Autograd skips its version check for tensors that went through saved-tensor hooks; the
    meter makes it, so a measured step fails exactly where an unmeasured one does."""
    w = torch.randn(3, requires_grad=True)
    for meter in (None, SavedTensorsMeter()):
        h = w * 1.0
        if meter is None:
            y = (h * h).sum()  # saves h
        else:
            with meter:
                y = (h * h).sum()
        with torch.no_grad():
            h.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()
