"""Activation checkpointing: same parameters, fewer saved bytes, blocks really recomputed."""
import pytest
import torch
from torch import nn

from runner.components.models import MLP, CausalLM
from runner.execution.memory import SavedTensorsMeter
from runner.execution.recompute import recompute_blocks
from tests.conftest import build, train

SEQ = dict(model__name="seq", data__name="seq", loss__name="lm", model__cell="transformer", model__depth=2,
           data__max_length=12, data__train_size=256, data__eval_size=32)


def pair(tmp_path, **overrides):
    """The same run without and with checkpointing: (summary, params, run_dir) each."""
    return [train(tmp_path, backward__activation_checkpointing=on, **overrides) for on in (False, True)]


@pytest.mark.parametrize("strategy", ["full", "accumulate"])
def test_checkpointing_ends_with_the_same_parameters_bit_for_bit_and_holds_less(tmp_path, strategy):
    (plain, plain_params, plain_dir), (ckpt, ckpt_params, ckpt_dir) = pair(
        tmp_path, backward__name=strategy, backward__accumulation=2, trainer__steps=5, **SEQ)
    assert plain["status"] == ckpt["status"] == "ok"
    assert ckpt["param_sha256"] == plain["param_sha256"]
    assert all(torch.equal(plain_params[n], ckpt_params[n]) for n in plain_params)
    # Nothing renamed: the state_dict on disk has the same names.
    assert torch.load(ckpt_dir / "params.pt", weights_only=True).keys() == \
        torch.load(plain_dir / "params.pt", weights_only=True).keys()
    assert ckpt["peak_saved_bytes"] < 0.6 * plain["peak_saved_bytes"]


def forward_calls(strategy: str, checkpointing: bool) -> int:
    """Forward calls of a module inside the first Transformer layer during one training step."""
    training = build(backward__name=strategy, backward__accumulation=2,
                                          backward__activation_checkpointing=checkpointing, **SEQ)
    calls = []
    training.model.body.layers[0].linear1.register_forward_hook(lambda *_: calls.append(1))
    window = training.batches.window(0)
    training.strategy.step(training.model, training.loss_fn, training.optimizers, window.inputs, window.targets)
    return len(calls)


def test_the_blocks_are_really_recomputed_in_backward():
    assert forward_calls("full", False) == 1 and forward_calls("full", True) == 2
    assert forward_calls("accumulate", False) == 2 and forward_calls("accumulate", True) == 4


def test_the_meter_counts_what_checkpoint_holds_by_hand():
    """Three blocks Linear(10,10)+Tanh on a batch of 4 (a 4x10 float32 tensor is 160 B, a
    weight's transpose 400 B; the input needs no gradient, so block 1 saves no weight).
    Plain: x, t1 | t1, W2, t2 | t2, W3, t3 = 160 + 160 + 560 + 560 = 1440 B.
    Checkpointed forward: the blocks' inputs x, t1, t2 = 480 B. Backward recomputes block 3 while
    they are held: 480 + W3 + t3 = 1040 B, the peak (block 2: 320 + 560; block 1: 160 + 160)."""
    x = torch.randn(4, 10)
    peaks = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(10, 10), nn.Tanh()) for _ in range(3)])
        if checkpointing:
            assert recompute_blocks(model) == ["0", "1", "2"]
        with SavedTensorsMeter() as meter:
            loss = model(x).sum()
            forward_peak = meter.peak
            loss.backward()
        del loss
        peaks.append((forward_peak, meter.peak, meter.current))
    assert peaks == [(1440, 1440, 0), (480, 1040, 0)]


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(10, 10)

    def forward(self, x, *, gate):
        return torch.tanh(self.linear(x)) * gate


def test_a_keyword_tensor_is_saved_by_checkpoint_and_counted():
    x, gate = torch.randn(4, 10, requires_grad=True), torch.rand(4, 10)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        block = Gated()
        if checkpointing:
            recompute_blocks(nn.Sequential(block))
        with SavedTensorsMeter() as meter:
            loss = block(x, gate=gate).sum()
        if checkpointing:
            assert meter.peak == 160 + 160  # x and gate, which checkpoint keeps for the recomputation
        grads.append(torch.autograd.grad(loss, [x, *block.parameters()]))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_dropout_draws_the_same_masks_when_recomputed():
    x = torch.randn(8, 10)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(10, 10), nn.Dropout(0.5)) for _ in range(2)])
        if checkpointing:
            recompute_blocks(model)
        model(x).sum().backward()
        results.append(([p.grad for p in model.parameters()], torch.get_rng_state()))
    (plain_grads, plain_rng), (ckpt_grads, ckpt_rng) = results
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, ckpt_grads))
    assert torch.equal(plain_rng, ckpt_rng)  # later draws do not move either


def test_batchnorm_statistics_are_updated_once(tmp_path):
    """A recomputation would update the running statistics again; the whole state_dict,
    buffers included, ends where the plain run's does (and so does the held-out metric)."""
    (plain, _, plain_dir), (ckpt, _, ckpt_dir) = pair(tmp_path, model__batchnorm=True, backward__name="accumulate",
                                                      backward__accumulation=2, trainer__steps=3)
    plain_state = torch.load(plain_dir / "params.pt", weights_only=True)
    ckpt_state = torch.load(ckpt_dir / "params.pt", weights_only=True)
    assert "norm.running_mean" in plain_state
    assert all(torch.equal(plain_state[n], ckpt_state[n]) for n in plain_state)
    assert ckpt["eval_value"] == plain["eval_value"]


def test_which_blocks():
    assert recompute_blocks(MLP()) == ["hidden", "out"]  # the default: children with parameters
    assert recompute_blocks(nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)))) \
        == ["0.0", "0.2"]  # into a lone Sequential
    assert recompute_blocks(CausalLM(cell="transformer", depth=3)) == ["body.layers.0", "body.layers.1",
                                                                       "body.layers.2"]  # declared
    model = CausalLM(cell="gru")
    assert recompute_blocks(model) == ["body"]
    forward = model.body.forward
    recompute_blocks(model)  # twice: not checkpointed within a checkpoint
    assert model.body.forward is forward


def test_the_gru_model_and_a_deliberate_autograd_error_behave_as_without(tmp_path):
    gru = {**SEQ, "model__cell": "gru", "model__depth": 1}
    (plain, _, _), (ckpt, _, _) = pair(tmp_path, trainer__steps=3, **gru)
    assert ckpt["status"] == "ok" and ckpt["param_sha256"] == plain["param_sha256"]
    (plain, _, _), (ckpt, _, _) = pair(tmp_path, model__name="two_stage", loss__name="ce", backward__name="naive",
                                       trainer__steps=2)
    assert ckpt["status"] == plain["status"] == "error"
    assert "backward through the graph a second time" in ckpt["error"]
