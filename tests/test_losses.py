"""FocalLoss against the published formula, gradcheck, saturation and the BCE identity."""
import math

import pytest
import torch
import torch.nn.functional as F

from runner.components.data import TaskSpec
from runner.components.losses import FocalLoss, sigmoid_focal_loss
from runner.config.schema import ConfigError
from runner.training.build import build_loss_fn
from tests.conftest import make_config


def published_focal(logits, targets, alpha, gamma):
    """Lin et al. 2017 eq. 5, written as torchvision.ops.sigmoid_focal_loss writes it."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.75, 0.5), (-1, 1.0), (0.25, 0.0), (0.5, 5.0)])
def test_matches_published_formula(alpha, gamma):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 5, generator=g, dtype=torch.float64) * 3
    targets = (torch.rand(64, 5, generator=g) < 0.3).double()
    expected = published_focal(logits, targets, alpha, gamma)
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha, gamma, "none"), expected)
    torch.testing.assert_close(FocalLoss(alpha, gamma)(logits, targets), expected.mean())
    torch.testing.assert_close(FocalLoss(alpha, gamma, "sum")(logits, targets), expected.sum())


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 3, generator=g, dtype=torch.float64, requires_grad=True)
    targets = (torch.rand(8, 3, generator=g) < 0.5).double()
    for gamma in (0.0, 0.5, 2.0):
        assert torch.autograd.gradcheck(lambda x: FocalLoss(0.25, gamma)(x, targets), (logits,))


@pytest.mark.parametrize("gamma", [0.3, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_nan_at_saturated_logits(gamma, dtype):
    logits = torch.tensor([100.0, -100.0, 100.0, -100.0, 1000.0, -1000.0], dtype=dtype, requires_grad=True)
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], dtype=dtype)
    loss = FocalLoss(0.25, gamma, "sum")(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # The confidently wrong logits (±100 on the wrong side) carry a loss of about 100 * alpha_t.
    assert loss.item() > 100 * 0.25
    # Confidently right logits have (numerically) zero gradient.
    assert logits.grad[0].abs() < 1e-30 and logits.grad[1].abs() < 1e-30


def test_gamma0_no_alpha_is_bce():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 5, generator=g)
    targets = (torch.rand(32, 5, generator=g) < 0.5).float()
    bce = torch.nn.BCEWithLogitsLoss()(logits, targets)
    assert FocalLoss(alpha=-1, gamma=0.0)(logits, targets).item() == bce.item()


def test_reduction_is_validated():
    with pytest.raises(ValueError, match="reduction"):
        FocalLoss(reduction="avg")
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-0.5)
    with pytest.raises(ValueError, match="alpha"):
        FocalLoss(alpha=1.5)
    assert FocalLoss(reduction="none")(torch.zeros(4, 2), torch.ones(4, 2)).shape == (4, 2)


def test_focal_down_weights_easy_examples():
    # An easy negative (p = 0.01) loses a factor of about (1 - p_t)^2 = 1e-4 against BCE.
    logits, targets = torch.tensor([math.log(0.01 / 0.99)]), torch.tensor([0.0])
    ratio = FocalLoss(-1, 2.0)(logits, targets) / F.binary_cross_entropy_with_logits(logits, targets)
    assert ratio.item() == pytest.approx(1e-4, rel=1e-3)


def test_build_loss_from_config():
    """A config built in Python with the option's name alone builds the class its YAML names
    (conf/loss/focal.yaml), with the arguments given, each class declaring what it fits."""
    spec = TaskSpec((3, 10, 10), "multilabel", 5)
    loss = build_loss_fn(make_config(loss__name="focal"), {"alpha": 0.5, "gamma": 1.0}, spec)
    assert isinstance(loss, FocalLoss) and (loss.alpha, loss.gamma, loss.reduction) == (0.5, 1.0, "mean")
    with pytest.raises(ConfigError, match="loss=nope is unknown"):
        build_loss_fn(make_config(loss__name="nope"), {}, spec)
    with pytest.raises(ConfigError, match="loss=ce does not fit model=mlp .multilabel targets.: expected "
                                          "loss=bce or loss=focal or loss=custom"):
        build_loss_fn(make_config(loss__name="ce"), {}, spec)
