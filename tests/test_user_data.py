"""Your model and your data: a custom nn.Module by `_target_`, CSV and tensor files, and every
bad input as one line naming the key."""
import pandas as pd
import pytest
import torch

from runner.config.schema import ConfigError
from tests.conftest import assert_params_close, build, read_summary, refusal

TABULAR = "runner.experiments.examples.tabular.TabularNet"
F32 = dict(rtol=1.3e-6, atol=1e-5)  # torch.testing's float32 defaults


def write_table(path, rows=200, features=6, seed=0):
    """A small table with a learnable binary target, two targets for multi-label, and a text column."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g)
    table = pd.DataFrame(x.numpy(), columns=[f"f{i}" for i in range(features)])
    table["y"] = (x[:, 0] + 0.5 * x[:, 1] > 0).double().numpy()
    table["z"] = (x[:, 2] > 0).double().numpy()
    table["note"] = ["a"] * rows  # not numeric: not a feature
    table.to_csv(path, index=False)
    return path


def csv_config(path, **overrides):
    keys = dict(model__name="custom", model___target_=TABULAR, data__name="csv", data__path=str(path),
                data__target="y", trainer__steps=30)
    return dict(**{**keys, **overrides})


def run_custom(tmp_path, path, model_kwargs, **overrides):
    from runner.training.train import run

    training = build(csv_config(path, **overrides), model_kwargs=model_kwargs)
    outcome = run(training, tmp_path / f"run{len(list(tmp_path.iterdir()))}")
    return outcome, {n: p.detach().clone() for n, p in training.model.named_parameters()}


def test_a_custom_module_on_a_csv_gives_sum_and_accumulate_within_float32_tolerance(tmp_path):
    path = write_table(tmp_path / "t.csv")
    kwargs = {"in_features": 7}
    full, p_full = run_custom(tmp_path, path, kwargs)
    assert full.status == "ok" and full.summary.batch_coupled is False and full.summary.stochastic is False
    for strategy, k in (("sum", 4), ("accumulate", 4), ("accumulate", 3)):
        outcome, params = run_custom(tmp_path, path, kwargs, backward__name=strategy, backward__accumulation=k)
        assert outcome.status == "ok"
        assert_params_close(params, p_full, **F32)
    # The held-out part is scored, and the loss fell on this learnable target.
    assert full.summary.eval_value > 0.8


def test_the_split_and_the_order_depend_on_the_seed_alone(tmp_path):
    path = write_table(tmp_path / "t.csv")
    a = build(csv_config(path), model_kwargs={"in_features": 7}).dataset
    b = build(csv_config(path, backward__name="accumulate"), model_kwargs={"in_features": 7}).dataset
    c = build(csv_config(path, seed=1), model_kwargs={"in_features": 7}).dataset
    assert len(a.train_inputs) == 160 and len(a.eval_inputs) == 40
    assert torch.equal(a.batch(3)[0], b.batch(3)[0]) and not torch.equal(a.batch(0)[0], c.batch(0)[0])
    assert a.train_inputs.shape[1] == 7  # six features and z: the text column is not a feature, nor y


def test_several_target_columns_make_a_multi_label_target(tmp_path):
    path = write_table(tmp_path / "t.csv")
    training = build(csv_config(path, data__target="y,z"), model_kwargs={"in_features": 6, "out_features": 2})
    assert training.dataset.train_targets.shape[1] == 2 and training.spec.kind == "multilabel"
    assert training.dataset.train_inputs.shape[1] == 6


def test_tensor_files_work_like_tables(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 4, generator=g)
    torch.save({"inputs": x, "targets": (x[:, :1] > 0).float()}, tmp_path / "d.pt")
    config = dict(model__name="custom", model___target_=TABULAR, data__name="tensors",
                         data__path=str(tmp_path / "d.pt"), trainer__steps=20)
    from runner.training.train import run

    training = build(config, model_kwargs={"in_features": 4})
    assert run(training, tmp_path / "run").status == "ok"
    assert read_summary(tmp_path / "run")["steps_done"] == 20


@pytest.mark.parametrize("overrides,needle", [
    (dict(data__path="nowhere.csv"), "data.path=nowhere.csv: no such file"),
    (dict(data__target="nope"), "data.target=nope: no column 'nope'"),
    (dict(data__target="note"), "data.target=note: the column is not numeric (found 'a')"),
    (dict(data__batch_size=500), "data.batch_size=500 is not allowed"),
])
def test_bad_table_inputs_are_refused_naming_the_key(tmp_path, overrides, needle):
    path = write_table(tmp_path / "t.csv")
    with pytest.raises(ConfigError) as error:
        build(csv_config(path, **overrides), model_kwargs={"in_features": 7})
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_nan_in_a_table_names_the_column_and_row(tmp_path):
    path = write_table(tmp_path / "t.csv")
    table = pd.read_csv(path)
    table.loc[7, "f3"] = float("nan")
    table.to_csv(path, index=False)
    with pytest.raises(ConfigError, match=r"NaN or an empty value in column 'f3' \(row 9 of the file"):
        build(csv_config(path), model_kwargs={"in_features": 7})


@pytest.mark.parametrize("content,needle", [
    ({"inputs": torch.zeros(10, 3), "targets": torch.zeros(9, 1)}, "inputs has 10 rows but targets has 9"),
    ({"x": torch.zeros(10, 3)}, "expected a dict with 'inputs' and 'targets' tensors, found ['x']"),
    ({"inputs": torch.full((10, 3), float("nan")), "targets": torch.zeros(10, 1)}, "inputs holds NaN"),
])
def test_bad_tensor_files_are_refused_naming_the_key(tmp_path, content, needle):
    torch.save(content, tmp_path / "d.pt")
    config = dict(model__name="custom", model___target_=TABULAR, data__name="tensors",
                         data__path=str(tmp_path / "d.pt"))
    with pytest.raises(ConfigError, match="data.path=") as error:
        build(config, model_kwargs={"in_features": 3})
    assert needle in str(error.value)


def test_a_model_whose_width_does_not_fit_the_targets_is_one_line_and_exit_2(tmp_path):
    """The command line's own line, in-process (printed with exit 2 and no folder:
    tests/test_cli.py::test_bad_input_on_the_command_line_is_exit_2_one_line_and_writes_nothing)."""
    path = write_table(tmp_path / "t.csv")
    line = refusal("model=custom", f"model._target_={TABULAR}", "+model.in_features=7", "+model.out_features=3",
                   "data=csv", f"data.path={path}", "data.target=y")
    assert f"model._target_={TABULAR} outputs shape (32, 3)" in line and "have shape (32, 1)" in line


@pytest.mark.parametrize("args,needle", [
    (["+model.in_features=7", "+model.width=3"], "cannot build it with"),  # an argument it does not take
    ([], "cannot build it with"),  # a required argument missing
    (["data.path=missing.csv", "+model.in_features=7"], "data.path=missing.csv: no such file"),
])
def test_a_model_that_fails_to_build_or_missing_data_is_one_line(tmp_path, args, needle):
    """The command line's own line, in-process (printed with exit 2 and no folder, as every refusal)."""
    path = write_table(tmp_path / "t.csv")
    assert needle in refusal("model=custom", f"model._target_={TABULAR}", "data=csv", f"data.path={path}",
                             "data.target=y", *args)


def test_a_built_in_model_on_a_table_is_told_what_fits(tmp_path):
    path = write_table(tmp_path / "t.csv")
    with pytest.raises(ConfigError, match=r"model=mlp takes inputs of shape \(3, 10, 10\), and data=csv"):
        build(dict(data__name="csv", data__path=str(path), data__target="y"))


def test_a_regression_target_trains_with_your_loss_and_is_scored_by_mse(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 3, generator=g)
    torch.save({"inputs": x, "targets": x.sum(1, keepdim=True)}, tmp_path / "r.pt")
    config = dict(model__name="custom", model___target_=TABULAR, data__name="tensors",
                         data__path=str(tmp_path / "r.pt"), loss__name="custom",
                         loss___target_="torch.nn.MSELoss", trainer__steps=30, optim__lr=0.05)
    from runner.training.train import run

    training = build(config, model_kwargs={"in_features": 3})
    assert training.spec.kind == "regression"
    outcome = run(training, tmp_path / "run")
    assert outcome.status == "ok" and outcome.summary.eval_metric == "mse" and outcome.summary.eval_value < 3.0
    with pytest.raises(ConfigError, match="loss=bce does not fit model=custom \\(regression targets\\)"):
        build(dict(model__name="custom", model___target_=TABULAR, data__name="tensors",
                                   data__path=str(tmp_path / "r.pt")), model_kwargs={"in_features": 3})
