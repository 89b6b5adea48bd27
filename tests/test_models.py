"""Models: the answer's conv net, BatchNorm option, RetinaNet's prior bias."""
import math

import torch

from runner.components.models import ConvNet
from runner.training.build import build_model_and_spec
from tests.conftest import make_config, split_arguments


def build_model(**overrides):
    """The model and its TaskSpec, as build_training builds them from these overrides."""
    config, _, model, _ = split_arguments(overrides)
    return build_model_and_spec(make_config(**config), model)


def test_cnn_is_the_accumulation_answers_net():
    model, spec = build_model(model__name="cnn")
    assert isinstance(model, ConvNet) and spec.input_shape == (3, 10, 10)
    conv, fc = model.conv_layer, model.fc_layer
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == \
        (3, 10, (3, 3), (1, 1), (1, 1))
    assert (fc.in_features, fc.out_features) == (250, 5)
    assert model(torch.randn(4, 3, 10, 10)).shape == (4, 5)


def test_mlp_and_cnn_take_the_same_inputs():
    for name in ("mlp", "cnn"):
        model, spec = build_model(model__name=name, model__outputs=3)
        assert spec.input_shape == (3, 10, 10) and model(torch.randn(2, 3, 10, 10)).shape == (2, 3)


def test_batchnorm_option_adds_batchnorm():
    for name in ("mlp", "cnn"):
        model, _ = build_model(model__name=name, model__batchnorm=True)
        assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_prior_bias_starts_every_output_at_the_prior():
    model, _ = build_model(model__prior_bias=True, model__prior=0.01)
    assert torch.allclose(model.out.bias, torch.full((5,), -math.log(99.0)))
    torch.manual_seed(0)
    probabilities = torch.sigmoid(model(torch.zeros(1, 3, 10, 10)))
    assert torch.allclose(probabilities, torch.full((1, 5), 0.01), atol=0.02)
