"""The shape of the package: one owner per concern, no import cycle, Hydra only at the edge."""
import ast
import re
from dataclasses import fields
from pathlib import Path

import pytest

import runner
from runner.config import schema
from runner.config.backward_options import PassOptions, readers_by_option
from runner.recording import record
from runner.training.strategies import STRATEGIES

PACKAGE = Path(runner.__file__).parent
# Every module by its dotted name under runner (config.schema, training.strategies, cli, ...).
MODULES = {".".join(p.relative_to(PACKAGE).with_suffix("").parts): ast.parse(p.read_text())
           for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" and "conf" not in p.relative_to(PACKAGE).parts}


def imported(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            # `from runner.training import checks` imports runner.training.checks
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def runner_modules(tree: ast.Module):
    """The runner modules a module imports, by dotted name under runner."""
    return {m[len("runner."):] for m in imported(tree) if m.startswith("runner.")} & set(MODULES)


def test_the_folders_show_the_sides():
    """Entry points and commands at the top; in folders: what is trained (components), how it is
    trained (training), what is recorded (recording), execution units, analysis and config."""
    sides = {name.split(".")[0] for name in MODULES if "." in name}
    assert sides == {"config", "components", "training", "recording", "execution", "analysis", "fingerprint"}
    top = {name for name in MODULES if "." not in name}
    assert top == {"__main__", "cli", "callbacks", "jobs", "api", "compare", "report", "bench", "gpu_check"}


def sides_imported(name: str):
    """The sides (folders) a module imports, by the modules it imports; a top-level module is its own."""
    return {m.split(".")[0] for m in runner_modules(MODULES[name]) if "." in m}


# What each side may import besides itself: the layering, as rules.
MAY_IMPORT = {
    "config": set(),  # the base: keys, schema, reference; only this side and the entry points know Hydra
    "components": {"config", "recording"},  # what is trained: plain modules, the record's column names
    "execution": {"config", "recording"},  # engines get numbers (a loss weight), never a component
    "recording": {"config", "execution", "analysis"},  # the record, sinks, trackers: no training code
    "analysis": {"config", "recording"},  # reads the records, never the training code
    "training": {"config", "components", "execution", "recording"},
    # a loop under test, fed the lab's model and micro-batches and observed: the lab's whole stack is below it
    "fingerprint": {"config", "components", "training", "execution", "recording", "analysis"},
}


def test_each_side_imports_only_the_sides_below_it():
    for name in MODULES:
        side = name.split(".")[0]
        if "." in name:
            assert sides_imported(name) - {side} <= MAY_IMPORT[side], (name, sides_imported(name) - {side})
    for command in ("compare", "report", "gpu_check"):  # the analysis commands read records alone
        assert sides_imported(command) <= {"analysis", "recording", "config"}, command


def test_runner_has_no_import_cycle():
    graph = {name: runner_modules(tree) - {name} for name, tree in MODULES.items()}
    done, path = set(), []

    def visit(name):
        assert name not in path, "import cycle: " + " -> ".join(path[path.index(name):] + [name])
        if name in done:
            return
        path.append(name)
        for dependency in sorted(graph.get(name, ())):
            visit(dependency)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_only_the_config_side_and_the_entry_points_import_hydra_or_omegaconf():
    edge = {name for name, tree in MODULES.items()
            if any(m.split(".")[0] in ("hydra", "omegaconf") for m in imported(tree))}
    assert {name for name in edge if not name.startswith("config.")} <= {"cli", "callbacks"}, edge


def string_constants(tree: ast.Module):
    """String literals that are neither docstrings nor a key's documentation (a `key(...)` call's
    text, which names files as users see them)."""
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)}
    docs |= {id(constant) for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "key"
             for constant in ast.walk(node)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs]


def test_every_record_file_name_is_spelled_once_in_the_package():
    names = [record.METRICS, record.SUMMARY, record.PARAMS, record.CHECKPOINT, record.GRADIENT_FLOW,
             record.COMPARISON, record.REPLICATES, record.LOSS_CURVES, record.SWEEP_MARKER,
             record.EMA_WEIGHTS, record.MLFLOW_STORE, record.MLFLOW_ARTIFACTS, record.FINGERPRINT,
             record.FINGERPRINT_WEIGHTS, record.FINGERPRINT_PICTURE]
    for name in names:
        spelled = {module: sum(name in text for text in string_constants(tree))
                   for module, tree in MODULES.items()}
        spelled = {module: count for module, count in spelled.items() if count}
        assert spelled == {"recording.record": 1}, (name, spelled)


def test_the_summary_is_one_declared_type():
    keys = [f.name for f in fields(record.Summary)]
    for required in ("status", "error", "steps_done", "final_loss", "param_sum", "param_sha256",
                     "peak_saved_bytes", "wall_s", "device", "torch_version", "seed", "choices", "overrides"):
        assert required in keys
    assert set(record.COMPARED_KEYS) <= set(keys)


def test_backward_options_are_the_strategies_own():
    declared = {f.name for f in fields(schema.BackwardConf)} - {"name"}
    # The strategies' own options, and the options of every strategy's passes (precision, recompute).
    assert declared == set(readers_by_option()) | {f.name for f in fields(PassOptions)}
    assert readers_by_option()["sync"] == ["accumulate"]
    assert readers_by_option()["joint"] == ["naive", "retain_graph", "detach"]
    assert set(readers_by_option()["accumulation"]) == {"sum", "accumulate", "gradcache"}
    full = STRATEGIES["full"](STRATEGIES["full"].Options())
    conf = schema.BackwardConf(name="full", joint=True, step_per_task=True)
    assert full.ignored_switches(conf) == [
        "backward.joint=true is ignored by backward=full: it applies to backward=naive or retain_graph or detach",
        "backward.step_per_task=true is ignored by backward=full: it applies to backward=separate"]
    # Every non-default value of another strategy's option, not only booleans; accumulation is the
    # axis a sweep crosses strategies on, so it never warns.
    conf = schema.BackwardConf(name="full", scale="mean", accumulation=4)
    assert full.ignored_switches(conf) == [
        "backward.scale=mean is ignored by backward=full: it applies to backward=sum or accumulate"]
    total = STRATEGIES["sum"](STRATEGIES["sum"].Options())
    assert total.ignored_switches(schema.BackwardConf(name="sum", sync="first")) == [
        "backward.sync=first is ignored by backward=sum: it applies to backward=accumulate"]


def test_reading_runs_imports_no_training_code():
    import subprocess
    import sys

    code = ("import sys, runner.compare, runner.report, runner.analysis.claims, runner.analysis.runs, "
            "runner.config.schema; "
            "print(sorted(m for m in sys.modules if m.startswith('runner')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent).stdout
    assert "'runner.analysis.runs'" in loaded and "'runner.recording.record'" in loaded, loaded
    for side in ("training", "components", "execution"):
        assert f"'runner.{side}." not in loaded, loaded


def test_strategies_and_the_loop_do_not_know_which_parallel_unit_they_hold():
    """DDP and FSDP live in their units (runner.execution.parallel, runner.execution.fsdp): adding one edits neither."""
    for module in ("training/strategies", "training/update", "training/weighting", "training/train",
                   "recording/steplog"):
        words = set(re.findall(r"[a-z_]+", (PACKAGE / f"{module}.py").read_text().lower()))
        assert not words & {"fsdp", "ddp", "distributed", "no_sync", "dtensor", "fully_shard"}, module


def test_key_roles_are_declared_once_on_the_schema():
    may_change = schema.resume_may_change()
    assert {"trainer.steps", "trainer.device", "trainer.resume", "trainer.log_every"} <= set(may_change)
    assert not {"backward.accumulation", "model.name", "seed", "trainer.dtype"} & set(may_change)
    ignored = schema.ignored_by_comparison()
    assert {"claims", "trainer.progress", "trainer.threads", "trainer.resume"} <= set(ignored)
    assert not {"trainer.steps", "trainer.device", "trainer.dtype", "backward.scale"} & set(ignored)


def test_every_metrics_column_is_declared_in_record(tmp_path):
    """One recording seam: the columns that reach metrics.csv are record.py's, by name or prefix."""
    import pandas as pd

    from tests.conftest import train

    runs = [dict(model__name="multitask", loss__name="multitask", backward__name="separate"),
            dict(model__name="seq", data__name="seq", loss__name="lm", model__vocab=8, data__max_length=8,
                 backward__name="accumulate", backward__accumulation=2, optim__scheduler="linear"),
            dict(data__micro_batch_size=8, backward__name="accumulate", backward__accumulation=2)]
    for overrides in runs:
        _, _, run_dir = train(tmp_path, trainer__steps=2, data__train_size=64, data__eval_size=16, **overrides)
        columns = list(pd.read_csv(run_dir / record.METRICS).columns)
        assert all(record.is_metrics_column(c) for c in columns), columns
        assert any(c.startswith((record.LOSS_PART_PREFIX, record.GRAD_COS_PREFIX)) or c in record.LOADER_COLUMNS
                   or c == record.TOKENS_COLUMN for c in columns), columns


def test_built_in_choices_come_through_one_registry():
    """Strategies and parallel engines: one mechanism; models and losses, as the user's own, through `_target_`."""
    from runner.config.registry import Registry
    from runner.execution.parallel import ENGINES

    assert all(isinstance(r, Registry) for r in (STRATEGIES, ENGINES))
    assert set(ENGINES) == {"ddp", "fsdp"} and {"full", "accumulate"} <= set(STRATEGIES)


@pytest.mark.parametrize("group", ["model", "loss", "data"])
def test_each_built_in_component_is_one_class_and_one_yaml(group):
    """conf/GROUP/NAME.yaml names its class by `_target_`; the class declares its keys (Keys) and what it
    fits (a loss: `fits`; a model: `spec()`; a data source: `build()`), and the YAML sets each declared key
    (to the class's default, or a preset of it: data=imbalanced), as summary.json records it."""
    import yaml

    from runner.config.components import class_of, declared_keys, default_of, options
    from runner.config.location import CONF_DIR

    group_keys = {f.name for f in fields(getattr(schema, f"{group.capitalize()}Conf"))}
    for option in options(group):
        tree = yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text())
        if option == "custom":
            assert tree["_target_"] == "???"
            continue
        cls = class_of(tree["_target_"])
        assert tree["_target_"].startswith(schema.BUILT_IN) and cls is not None, option
        offers = {"loss": lambda: cls.fits, "model": lambda: callable(cls.spec), "data": lambda: callable(cls.build)}
        assert declared_keys(cls) is not None and offers[group](), option
        declared = {f.name: default_of(f) for f in fields(declared_keys(cls))}
        assert set(tree) - group_keys == set(declared), option
        if option != "imbalanced":  # a preset of data=default's class
            assert {k: tree[k] for k in declared if tree[k] != "???"} == \
                {k: getattr(v, "value", v) for k, v in declared.items() if tree[k] != "???"}, option