"""Issue 19 parts 2 and 3: a Hugging Face model as it is (a ModelOutput's logits), your own text as bytes
(data=text), and tables whose left-out columns are named (data.features)."""
from collections import OrderedDict

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from runner.components.data import IGNORE_INDEX
from runner.components.user_data import read_text
from runner.config.schema import ConfigError
from runner.training.checks import output_width
from runner.training.train import run
from tests.conftest import assert_params_close, build, read_summary, refusal, run_cli

GPT2 = "experiments.examples.gpt2_tiny.tiny_gpt2"
TABULAR = "runner.experiments.examples.tabular.TabularNet"
F32 = dict(rtol=1.3e-6, atol=1e-5)  # torch.testing's float32 defaults
# The model: GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=16, n_positions=64)).
GPT2_KWARGS = {"n_embd": 16, "n_positions": 64}


def gpt2_config(**overrides):
    keys = dict(model__name="custom", model___target_=GPT2, model__vocab=16, data__name="seq", loss__name="lm",
                data__train_size=64, data__eval_size=16, data__batch_size=8, data__max_length=12,
                optim__lr=0.1, trainer__steps=3)
    return dict(**{**keys, **overrides})


def reference_gpt2(model_state, dataset, steps: int, lr: float):
    """A hand-written loop: the same GPT-2 from the same weights, the mean over the batch's scored tokens
    of transformers' own token loss, plain SGD."""
    from experiments.examples.gpt2_tiny import tiny_gpt2

    model = tiny_gpt2(vocab=16, **GPT2_KWARGS)
    model.load_state_dict(model_state)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        inputs, labels = dataset.batch(step)
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return dict(model.named_parameters())


def test_a_hugging_face_causal_lm_trains_on_its_logits_like_a_hand_written_loop(tmp_path):
    pytest.importorskip("transformers")
    results = {}
    for strategy, k in (("full", 1), ("accumulate", 4)):
        training = build(gpt2_config(backward__name=strategy, backward__accumulation=k),
                                  model_kwargs=GPT2_KWARGS)
        start = {n: t.clone() for n, t in training.model.state_dict().items()}
        outcome = run(training, tmp_path / strategy)
        assert outcome.status == "ok", outcome.summary.error
        results[strategy] = dict(training.model.named_parameters())
    summary = read_summary(tmp_path / "full")
    assert summary["outputs_from"] == "logits" and summary["features"] is None
    assert summary["eval_metric"] == "token_accuracy" and summary["stochastic"] is False
    reference = reference_gpt2(start, training.dataset, 3, 0.1)
    assert_params_close(results["full"], reference, **F32)
    assert_params_close(results["accumulate"], reference, **F32)  # normalize=tokens: exact under any split


class DictOutputs(torch.nn.Module):
    """A model of the user's that returns a plain dict with its logits and something else."""

    def __init__(self, in_features: int = 7):
        super().__init__()
        self.fc = torch.nn.Linear(in_features, 1)

    def forward(self, x):
        return OrderedDict(logits=self.fc(x), hidden=x)


def test_a_mapping_output_with_logits_works_and_a_tensor_output_says_nothing(tmp_path):
    path = write_table(tmp_path / "t.csv")
    for target, outputs_from in ((f"{__name__}.DictOutputs", "logits"), (TABULAR, None)):
        training = build(csv_config(path, model___target_=target, trainer__steps=2),
                                  model_kwargs={"in_features": 7})
        assert run(training, tmp_path / target).status == "ok"
        assert read_summary(tmp_path / target)["outputs_from"] == outputs_from


# data=text


def test_text_paragraphs_become_byte_sequences_cut_at_max_length(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("ab\n\n\n  Héllo world  \nline two\n\nx\n\n", encoding="utf-8")
    inputs, labels = read_text(path, max_length=8)
    # "x" (one byte, nothing to predict) is left out; "Héllo world\nline two" is cut at 8 bytes (é is two).
    assert inputs.shape == (2, 7) and labels.shape == (2, 7)
    # As data=seq lays rows out: the last byte is an input too, its label (and the padding's) ignored.
    assert inputs[0].tolist() == [ord("a"), ord("b")] + [0] * 5
    assert labels[0].tolist() == [ord("b")] + [IGNORE_INDEX] * 6
    cut = "Héllo world".encode("utf-8")[:8]
    assert bytes(inputs[1].tolist()) == cut[:7] and bytes(labels[1].tolist()) == cut[1:]


def write_text(path, paragraphs=60):
    """Paragraphs of varied length."""
    words = "the quick brown fox jumps over a lazy dog while seven bright owls watch it".split()
    path.write_text("\n\n".join(" ".join(words[: 2 + (i * 7) % len(words)]) for i in range(paragraphs)),
                    encoding="utf-8")
    return path


def test_data_text_trains_a_token_loss_exactly_under_accumulation(tmp_path):
    path = write_text(tmp_path / "t.txt")
    params = {}
    for strategy, k in (("full", 1), ("accumulate", 4)):
        config = dict(model__name="seq", model__vocab=256, data__name="text", data__path=str(path),
                             data__max_length=40, data__batch_size=8, loss__name="lm", trainer__steps=3,
                             backward__name=strategy, backward__accumulation=k)
        training = build(config)
        assert len(training.dataset.train_inputs) == 48 and len(training.dataset.eval_inputs) == 12
        assert run(training, tmp_path / strategy).status == "ok"
        params[strategy] = {n: p.detach().clone() for n, p in training.model.named_parameters()}
    assert_params_close(params["accumulate"], params["full"], **F32)


def test_data_text_refuses_a_vocabulary_that_is_not_bytes_in_one_line(tmp_path):
    """The command line's own line, in-process (printed after "error: " with exit 2: tests/test_cli.py)."""
    path = write_text(tmp_path / "t.txt")
    assert refusal("model=seq", "data=text", f"data.path={path}", "loss=lm") == (
        "model.vocab=16 is not allowed with data=text: its tokens are bytes, expected model.vocab=256")


def byte_gpt2():
    """A user's factory whose own config scores bytes: GPT2Config(vocab_size=256), no `vocab` argument."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                      use_cache=False, bos_token_id=None, eos_token_id=None))


def test_a_custom_model_on_data_text_is_judged_by_the_width_it_scores_not_by_model_vocab(tmp_path):
    pytest.importorskip("transformers")
    from runner import api
    from tests.conftest import refusal

    path = write_text(tmp_path / "t.txt")
    text = ["model=custom", "data=text", f"data.path={path}", "data.max_length=40", "data.batch_size=8",
            "loss=lm", "trainer.steps=1"]
    training = api.compose([*text, f"model._target_={__name__}.byte_gpt2"])  # model.vocab left at its 16
    assert training.config.model.vocab == 16 and training.spec.outputs == 256
    assert training.findings.coupling.batch_coupled is False  # the probe reaches GPT-2's token embedding
    # The width is asked by a forward that leaves no trace: no RNG draw, the training mode kept.
    model, rng = byte_gpt2().train(), torch.get_rng_state()
    assert output_width(model) == 256 and torch.equal(torch.get_rng_state(), rng) and model.training
    assert refusal(*text, f"model._target_={GPT2}") == (
        f"model._target_={GPT2} scores 16 tokens, and data=text's tokens are bytes: expected a model that "
        "scores 256 (a vocabulary of 256: model.vocab=256 where it takes vocab)")
    assert api.compose([*text, f"model._target_={GPT2}", "model.vocab=256"]).spec.outputs == 256


def test_text_that_is_not_utf8_is_refused_naming_the_key(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"ok\n\n\xff\xfe bad")
    config = dict(model__name="seq", model__vocab=256, data__name="text", data__path=str(tmp_path / "t.txt"),
                         loss__name="lm")
    with pytest.raises(ConfigError, match=r"data.path=.*t.txt: not UTF-8 text \(byte 4 of the file\)"):
        build(config)


# CSV tables


def write_table(path, rows=100, bad_cell=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 6, generator=g)
    table = pd.DataFrame(x.numpy(), columns=[f"f{i}" for i in range(6)])
    table["y"] = (x[:, 0] > 0).double().numpy()
    table["note"] = ["a"] * rows
    table["f6"] = x[:, 1].numpy()
    if bad_cell is not None:
        table["f6"] = table["f6"].astype(object)
        table.loc[bad_cell, "f6"] = "n/a?"
    table.to_csv(path, index=False)
    return path


def csv_config(path, **overrides):
    keys = dict(model__name="custom", model___target_=TABULAR, data__name="csv", data__path=str(path),
                data__target="y", trainer__steps=2)
    return dict(**{**keys, **overrides})


def test_left_out_columns_are_named_with_their_first_bad_cell_and_the_summary_says_what_was_used(tmp_path):
    path = write_table(tmp_path / "t.csv", bad_cell=41)
    training = build(csv_config(path), model_kwargs={"in_features": 6})
    assert run(training, tmp_path / "run").status == "ok"
    summary = read_summary(tmp_path / "run")
    assert summary["features"] == ["f0", "f1", "f2", "f3", "f4", "f5"]
    assert summary["warnings"] == [f"data.path={path}: 2 non-numeric column(s) left out of the features: "
                                   "'note' (row 2: 'a'); 'f6' (row 43: 'n/a?'); pick the columns with "
                                   "data.features=[A,B]"]


def test_data_features_picks_columns_and_a_non_numeric_pick_is_one_line_and_exit_2(tmp_path):
    path = write_table(tmp_path / "t.csv", bad_cell=41)
    training = build(csv_config(path, data__features=["f2", "f0"]), model_kwargs={"in_features": 2})
    table, data = pd.read_csv(path), training.dataset
    rows = torch.cat([data.train_inputs, data.eval_inputs])  # the table's rows in seeded order, f2 then f0
    for i, name in enumerate(["f2", "f0"]):
        assert sorted(rows[:, i].tolist()) == pytest.approx(sorted(table[name].tolist()), rel=1e-6)
    assert run(training, tmp_path / "run").status == "ok"
    summary = read_summary(tmp_path / "run")
    assert summary["features"] == ["f2", "f0"] and summary["warnings"] == []
    # the command line's own line, in-process (printed after "error: " with exit 2, as every refusal)
    assert refusal("model=custom", f"model._target_={TABULAR}", "+model.in_features=2", "data=csv",
                   f"data.path={path}", "data.target=y", "data.features=[f0,f6]") == (
        "data.features=f0,f6: column 'f6' is not numeric (row 43 of the file holds 'n/a?'): fix the cell or "
        "leave the column out")


def test_a_bad_cell_warns_on_the_command_line_before_training(tmp_path):
    path = write_table(tmp_path / "t.csv", bad_cell=3)
    result = run_cli("model=custom", f"model._target_={TABULAR}", "+model.in_features=6", "data=csv",
                     f"data.path={path}", "data.target=y", "trainer.steps=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"warning: data.path={path}: 2 non-numeric column(s) left out of the features: 'note' (row 2: 'a'); " \
           "'f6' (row 5: 'n/a?')" in result.stderr


def test_the_stdlib_corpus_exports_paragraphs_of_varied_length(tmp_path):
    from experiments.examples.stdlib_corpus import export

    assert export(tmp_path / "stdlib.txt") > 1000
    inputs, labels = read_text(tmp_path / "stdlib.txt", max_length=64)
    scored = (labels != IGNORE_INDEX).sum(dim=1)
    assert len(inputs) > 1000 and scored.min() < 20 and scored.max() == 63  # real text: lengths vary
