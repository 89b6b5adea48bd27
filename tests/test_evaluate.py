"""Average precision as sklearn defines it, checked by hand and against a brute-force reference."""
import pytest
import torch

from runner.training.evaluate import average_precision


def test_hand_computed_example():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert average_precision(scores, labels) == pytest.approx((1 / 1 + 2 / 3) / 2)


def test_macro_average_over_columns_with_positives():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.1, 0.9, 0.4]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # third column has no positive
    assert average_precision(scores, labels) == pytest.approx(1.0)


def test_matches_brute_force_definition():
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.rand(200, generator=g), (torch.rand(200, generator=g) < 0.2).float()
    order = sorted(range(200), key=lambda i: -scores[i].item())
    hits, total = 0, 0.0
    for rank, i in enumerate(order, start=1):
        if labels[i] == 1:
            hits += 1
            total += hits / rank
    assert average_precision(scores, labels) == pytest.approx(total / labels.sum().item())
    # Random scores give about the positive rate; perfect scores give 1.
    assert average_precision(labels + 0.0, labels) == pytest.approx(1.0)
