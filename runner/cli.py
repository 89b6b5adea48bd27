"""The only Hydra entry point: compose, validate and build once, run, map the outcome to an exit code.

Single run: exit 0 when it finished ok; 1 for a failed or diverged run; 2 for bad input (Hydra's
own composition errors included); 130/143 when interrupted by SIGINT/SIGTERM. A single run is
prepared (validated, built, its loss probed) by the PrepareRun callback before Hydra creates
its folder, so bad input leaves nothing behind; the task function then runs what was prepared.
In a sweep (-m) each job prepares itself and never raises: its outcome, bad input included, is
recorded in its summary.json and the sweep's verdicts decide the exit code; only SIGINT/SIGTERM
stops the whole sweep (130/143) after recording the interrupted job.
`trainer.resume=<run dir>` continues that run in its own folder from its checkpoint.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.analysis.runs import flatten
from runner.config import schema
from runner.config.location import CONF_DIR
from runner.config.schema import (
    GROUPS,
    Config,
    ConfigError,
    LossConf,
    ModelConf,
    OptimConf,
)
from runner.execution import processes
from runner.recording import record
from runner.recording.record import Summary

schema.register()


def _reference(part: str) -> str:
    """`--help`'s groups and keys, generated from the keys' declarations as docs/reference.md is:
    conf/config.yaml's hydra.help.template reads them as ${reference:groups} and ${reference:keys}."""
    from runner.config import reference

    conf = [CONF_DIR, *_own_config_dirs()]
    return reference.groups_text(conf) if part == "groups" else reference.text(conf)


def _own_config_dirs() -> List[Path]:
    """Your config directories (hydra.searchpath=[file://DIR]), whose options --help lists beside conf/'s."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    sources = HydraConfig.get().runtime.config_sources
    return [Path(source.path) for source in sources
            if source.schema == "file" and Path(source.path).resolve() != CONF_DIR.resolve()]


OmegaConf.register_new_resolver("reference", _reference, replace=True)


class Exit(BaseException):
    """A sweep's exit code, raised from its last callback past Hydra (which catches Exception and
    exits 1 itself: bad input exits 2 here, so `entry` maps Hydra's 1; ours never use it)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def config_from_omegaconf(cfg: DictConfig) -> Tuple[Config, Dict[str, Dict[str, Any]]]:
    """Composed config -> (typed plain dataclasses, the extra keyword arguments (+GROUP.KEY) of a
    custom loss, a custom model and the optimizer by group: {"loss": {...}, "model": {...}, "optim": {...}})."""
    try:
        if "hydra" in cfg:  # callbacks see Hydra's own node; its sweep keys only resolve in a job
            cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        declared = {"loss": LossConf, "model": ModelConf, "optim": OptimConf}
        if OmegaConf.get_type(cfg) is Config and not any(
                set(cfg[group].keys()) - {f.name for f in fields(kind)} for group, kind in declared.items()):
            return OmegaConf.to_object(cfg), {group: {} for group in declared}  # the fast, common path
        container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        extras = {group: schema.extra_keys(container[group], kind) for group, kind in declared.items()}
        for group in declared:
            container[group] = {k: v for k, v in container[group].items() if k not in extras[group]}
        typed = OmegaConf.merge(OmegaConf.structured(Config), container)
        return OmegaConf.to_object(typed), extras
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        if "Missing mandatory value" in str(exc):
            missing = key or "a key"
            example = "package.module.Class" if missing.endswith("_target_") else "..."
            raise ConfigError(f"{missing} is missing: expected {missing}={example}") from None
        raise ConfigError(f"{key or 'config'}: {str(exc).splitlines()[0]}") from None


def check_resume_overrides(run_dir: Path, saved: Dict[str, Any], choices: Dict[str, Any],
                           composed: Dict[str, Any], overrides: List[str]) -> None:
    """A resume repeats the run's command: an override equal to the run's own value is fine; one
    that differs is refused, naming the key, the run's value and the new one. Keys the schema lets
    a resume change (trainer.steps, ...) are not compared."""
    may_change = schema.resume_may_change()
    # A custom loss's, model's or the optimizer's arguments sit beside its keys in the command
    # (+loss.KEY), apart in the checkpoint.
    saved = {**saved, **{group: {**saved.get(group, {}), **saved.get(f"{group}_kwargs", {})}
                         for group in ("loss", "model", "optim")}}
    theirs_flat, mine_flat = flatten(saved), flatten(composed)
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith("hydra.") or key in may_change:
            continue
        if key in GROUPS or key == "experiment":
            theirs, mine = str(choices.get(key, theirs_flat.get(f"{key}.name"))), value
        else:
            theirs, mine = theirs_flat.get(key, "(not set)"), mine_flat.get(key, "(not set)")
        if theirs != mine:
            raise ConfigError(f"trainer.resume={run_dir}: {key} differs from the run's own config: the run "
                              f"has {key}={theirs}, this command {key}={mine}; repeat the run's value or drop {key}")


def config_for_resume(state: Dict[str, Any], current: Config,
                      overrides: List[str]) -> Tuple[Config, Dict[str, Dict[str, Any]]]:
    """The checkpoint's own config, with the keys a resume may change taken from this command."""
    saved = dict(state["config"])
    extras = {group: saved.pop(f"{group}_kwargs", {}) or {} for group in ("loss", "model", "optim")}
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), saved))
    typed = {o.lstrip("+~").partition("=")[0] for o in overrides}
    for dotted in schema.resume_may_change():
        if dotted in typed:
            *path, leaf = dotted.split(".")
            source, target = current, config
            for name in path:
                source, target = getattr(source, name), getattr(target, name)
            setattr(target, leaf, getattr(source, leaf))
    return config, extras


@contextmanager
def _hydra(config_dir: Path) -> Iterator[None]:
    """Hydra initialised on config_dir for one composition. A Hydra already initialised in this
    process (a @hydra.main run, the caller's own `hydra.initialize`) is set aside and put back."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    outer = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with hydra.initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
            yield
    finally:
        GlobalHydra.instance().hydra = outer


def _one_line(exc: BaseException) -> str:
    """Hydra's message, first line, with its cause's first line when Hydra's own says little
    ("Error merging override trainer.steps=abc: Value 'abc' ... could not be converted to Integer")."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        text = f"{text}: {str(cause).strip().splitlines()[0]}"
    return text


def compose(overrides: List[str], config_dir: Optional[Path] = None) -> DictConfig:
    """What the command line composes for `overrides` (the groups' YAML applied), Hydra's own node
    kept (its runtime choices and task overrides are the run's record): runner.api's path in.
    Hydra's composition errors become one ConfigError line."""
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException

    try:
        with _hydra(config_dir or CONF_DIR):
            return hydra_compose("config", overrides=overrides, return_hydra_config=True)
    except HydraException as exc:
        raise ConfigError(_one_line(exc)) from None


def report_bad_input(exc: Exception) -> None:
    print(f"error: {exc}", file=sys.stderr)


def parallel_job_threads(hydra_node) -> int:
    """trainer.threads=0 (auto): torch threads for a training process that shares the cores, so
    that concurrent processes don't oversubscribe them (two at 2 threads on 2 cores run 3-4x
    slower than at 1 each): the cores divided by a parallel sweep's workers (joblib), or by the
    ranks on this node (torchrun, whose own default is 1); 0 = one process: torch's default."""
    cores = os.cpu_count() or 1
    launcher = hydra_node.launcher.get("_target_", "") if hydra_node.launcher else ""
    if "Joblib" in launcher:
        workers = hydra_node.launcher.get("n_jobs", -1)
        workers = cores if workers in (None, -1) or workers > cores else max(1, workers)
        return max(1, cores // workers)
    if processes.under_torchrun():
        return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", processes.rank_and_world()[1])))
    return 0


@dataclass
class Prepared:
    """One run, validated and (once `built`) built: what the task function runs."""

    training: Any  # runner.training.build.Training; None until built
    summary: Summary  # what is known before training: choices, overrides, config
    resume: Optional[Dict[str, Any]] = None  # the loaded checkpoint of a resumed run
    run_dir: Optional[Path] = None  # a resumed run's own folder
    config: Any = None  # the typed, validated Config
    extras: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # +loss/+model/+optim arguments

    def used_config_id(self) -> str:
        """What the run would use (runner.config.identity), known before anything is built."""
        from runner.config.identity import config_record, used_config_id

        extras = self.extras
        return used_config_id(self.config, config_record(self.config, extras["loss"], extras["model"],
                                                         extras["optim"]))


def origin(cfg: DictConfig, hydra_node) -> Summary:
    """What a run's summary records of how it was asked for: choices, overrides, full config."""
    choices = {g: hydra_node.runtime.choices.get(g) for g in GROUPS}
    if hydra_node.runtime.choices.get("experiment"):
        choices["experiment"] = hydra_node.runtime.choices.get("experiment")
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    return Summary(choices=choices, overrides=list(hydra_node.overrides.task),
                   config=OmegaConf.to_container(task, resolve=True, enum_to_str=True))


def prepare(cfg: DictConfig, hydra_node, build: bool = True) -> Prepared:
    """Compose the typed config, apply a resume, validate, then (unless `build` is false: see
    `built`) build and probe: once per run. Raises ConfigError (bad input, the user's code
    raising included)."""
    import torch

    from runner.recording import checkpoint

    summary = origin(cfg, hydra_node)
    choices = summary.choices
    config, extras = config_from_omegaconf(cfg)
    resume, run_dir = None, None
    if config.trainer.resume:
        run_dir = Path(config.trainer.resume)
        resume = checkpoint.load(run_dir)
        previous = record.read_summary(run_dir) if record.has_summary(run_dir) else Summary()
        check_resume_overrides(run_dir, resume["config"], previous.choices, summary.config, summary.overrides)
        config, extras = config_for_resume(resume, config, summary.overrides)
        # The run's own choices, overrides and config stay its record.
        summary = replace(summary, choices=previous.choices or choices,
                          overrides=previous.overrides or summary.overrides, config=previous.config or summary.config)
    if processes.under_torchrun():  # a rank: torchrun says how many there are
        _, world = processes.rank_and_world()
        if config.trainer.processes not in (1, world):
            raise ConfigError(f"trainer.processes={config.trainer.processes} does not match torchrun's "
                              f"--nproc-per-node x --nnodes ({world}): expected {world}, or leave it out")
        config.trainer.processes = world
        if torch.cuda.is_available():
            torch.cuda.set_device(processes.local_rank())  # trainer.device=cuda is this rank's GPU
    schema.validate(config)
    threads = config.trainer.threads or parallel_job_threads(hydra_node)
    if threads:
        torch.set_num_threads(threads)
    prepared = Prepared(None, summary, resume, run_dir, config, extras)
    return built(prepared) if build else prepared


def built(prepared: Prepared) -> Prepared:
    """The prepared run with its Training built (model, data, loss, the checks before training)."""
    from runner.training.build import build_training

    config, extras = prepared.config, prepared.extras
    return replace(prepared, training=build_training(config, extras["loss"], model_kwargs=extras["model"],
                                                     optim_kwargs=extras["optim"]))


def exit_code(status: str, signum: Optional[int]) -> int:
    if status == "interrupted" and signum is not None:
        return 128 + signum
    return {"ok": 0, "error": 1, "diverged": 1}.get(status, 1)


def _round(value: Any) -> str:
    """A number as a reader needs it on a terminal (exact values stay in the files)."""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def print_summary(summary: Summary, multirun: bool) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    colour = {"ok": "green", "interrupted": "yellow"}.get(summary.status, "red")
    if multirun:
        detail = summary.error if summary.status != "ok" else \
            f"loss={_round(summary.final_loss)} param_sum={_round(summary.param_sum)}"
        # Error texts hold brackets ([/path/pair.cc:537]) that rich would read as markup.
        reused = f" (reused from {summary.reused_from})" if summary.reused_from else ""
        console.print(f"[{colour}]{summary.status}[/] {escape(Path(summary.run_dir or '').name)} {escape(str(detail))}"
                      f"{escape(reused)}", soft_wrap=True)
        return
    table = Table(title=f"run: [{colour}]{summary.status}[/]", show_header=False)
    rows = [("run dir", summary.run_dir), ("steps", summary.steps_done), ("final loss", summary.final_loss),
            (summary.eval_metric or "eval", summary.eval_value), ("param_sum", summary.param_sum),
            ("param_sha256", (summary.param_sha256 or "")[:16]), ("peak_saved_bytes", summary.peak_saved_bytes),
            ("wall s", summary.wall_s)]
    if summary.processes > 1:  # how the ranks shared the work, as counted
        shared = [("parallel", f"{summary.parallel} x {summary.processes} ranks"),
                  ("all-reduce rounds/step", summary.allreduce_calls_per_step),
                  ("reduce-scatter rounds/step", summary.reduce_scatter_calls_per_step),
                  ("peak_grad_bytes", summary.peak_grad_bytes), ("ranks agree", summary.ranks_agree)]
        rows += [(name, value) for name, value in shared if value is not None]  # the engine's own figures
    if summary.ema_param_sha256:  # trainer.ema: the averaged weights' figures
        rows += [(f"EMA {summary.eval_metric or 'eval'}", summary.ema_eval_value),
                 ("EMA param_sum", summary.ema_param_sum)]
    if summary.params_without_grad:
        rows.append(("no gradient", ", ".join(summary.params_without_grad)))
    rows += [(name, text) for name, text in (("error", summary.error), ("hint", summary.hint)) if text]
    for name, value in rows:
        table.add_row(escape(name), escape(_round(value)))
    console.print(table)
    if summary.gradient_flow:
        flow = Table(title="gradient flow, first step")
        for column in ("module", "component", "grad_norm"):
            flow.add_column(column)
        for row in summary.gradient_flow:
            norm = f"{row['grad_norm']:.3g}" if row["receives_gradient"] else "none"
            flow.add_row(escape(row["module"]), escape(row["component"]), norm)
        console.print(flow)


class Command:
    """The task function `python -m runner` hands Hydra: one run, or one job of a sweep.

    A single run arrives prepared: the PrepareRun callback prepared it before Hydra created its
    folder and hands it over (`take`) as the job starts. A sweep's job prepares itself, and bad
    input is its recorded result. The single run's exit code is kept here for `entry`."""

    def __init__(self):
        self.prepared: Optional[Prepared] = None
        self.exit_code = 0

    def take(self, prepared: Prepared) -> None:
        self.prepared = prepared

    def __call__(self, cfg: DictConfig) -> None:
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        prepared, self.prepared = self.prepared, None
        if prepared is None:
            run_dir = Path(hc.runtime.output_dir)
            try:
                prepared = prepare(cfg, hc, build=False)
                # A job equal to one its sweep already trained is not built, let alone trained.
                if multirun and not prepared.config.trainer.rerun and reuse_twin(prepared, hc):
                    return
                prepared = built(prepared)
            except ConfigError as exc:
                report_bad_input(exc)
                refused = replace(origin(cfg, hc), status="error", error=str(exc), run_dir=str(run_dir.resolve()))
                record.write_summary(run_dir, refused)
                if multirun:
                    track_untrained_job(cfg, run_dir, refused)
                self.exit_code = 2 if not multirun else self.exit_code
                return
        code = run_prepared(prepared, hc, multirun)
        if code is not None:
            self.exit_code = code


def track_untrained_job(config: Any, run_dir: Path, summary: Summary) -> None:
    """A sweep's job that did not train (refused as bad input: ended FAILED with its error; reusing an
    equal job's records) is still one of the sweep's runs in trainer.loggers' trackers
    (runner.recording.trackers); loggers that are themselves bad are skipped."""
    try:
        schema.validate_loggers(config)
        if list(config.trainer.loggers) == ["csv"]:
            return
        from runner.recording.trackers import record_untrained

        record_untrained(config, run_dir, summary)
    except Exception as exc:  # the job's outcome is recorded in its summary: a tracker only warns
        print(f"warning: trainer.loggers: {run_dir.name} is not tracked: {_one_line(exc)}", file=sys.stderr)


def reuse_twin(prepared: Prepared, hc) -> bool:
    """A sweep's job whose used configuration an earlier job of the sweep already trained (full at
    another accumulation, an option only another strategy reads) trains no more: its folder gets
    that job's records and a summary that says so (reused_from). True where it did."""
    run_dir = Path(hc.runtime.output_dir)
    sweep_dir = record.sweep_of(run_dir) or run_dir.parent
    wanted = prepared.used_config_id()
    for path in record.summary_files(sweep_dir):
        twin_dir = path.parent
        if twin_dir.resolve() == run_dir.resolve():
            continue
        twin = record.read_summary(twin_dir)
        if twin.status == "ok" and twin.used_config_id == wanted and twin.reused_from is None:
            record.copy_records(twin_dir, run_dir)
            mine = prepared.summary
            summary = replace(twin, choices=mine.choices, overrides=mine.overrides, config=mine.config,
                              run_dir=str(run_dir.resolve()), reused_from=twin_dir.name, warnings=[])
            record.write_summary(run_dir, summary)
            track_untrained_job(prepared.config, run_dir, summary)
            print_summary(summary, multirun=True)
            return True
    return False


def run_prepared(prepared: Prepared, hc, multirun: bool) -> Optional[int]:
    """Train what was prepared, print its outcome; the exit code of a single run (None in a sweep)."""
    from runner.training.train import run

    run_dir = Path(hc.runtime.output_dir)
    training = prepared.training
    for warning in training.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    coupling = training.findings.coupling
    reason = coupling and record.expected_difference(coupling.batch_coupled, coupling.stochastic, coupling.modules)
    if reason and training.strategy.accumulation > 1 and not multirun:
        print(f"note: micro-batches cannot give the full batch's gradient with this model ({reason}): "
              f"backward={training.strategy.name} is a different training here", file=sys.stderr)
    target = prepared.run_dir or run_dir
    if prepared.run_dir is not None and processes.other_rank():
        # Rank 0 continues the run in its folder; another rank continues a copy in its throwaway one.
        record.copy_resumable(prepared.run_dir, run_dir)
        target = run_dir
    try:
        if training.config.trainer.processes > 1 and not processes.under_torchrun():
            outcome = run_ranks(training.config.trainer.processes, hc, target, prepared.summary)
        else:
            outcome = run(training, target, prepared.summary, resume=prepared.resume)
    except ConfigError as exc:  # a checkpoint that does not fit the folder it is resumed in
        report_bad_input(exc)
        return 2
    if outcome.status == "error" and not multirun:
        print(f"error: {outcome.summary.error}", file=sys.stderr)
    print_summary(outcome.summary, multirun)
    if multirun and outcome.status == "interrupted" and in_process_launcher(hc):
        stop_sweep(run_dir, exit_code(outcome.status, outcome.signum), training.config)
    return None if multirun else exit_code(outcome.status, outcome.signum)


def run_ranks(count: int, hc, run_dir: Path, known: Summary):
    """trainer.processes=N: the same command as N ranks (runner.execution.processes.launch), recording into
    run_dir; the outcome is what rank 0 recorded. A rank that dies (a signal, an exit code other
    than a run's own 0 or 1) fails the run with one line, and its summary says so."""
    from runner.training.train import Outcome

    launched = processes.launch(count, list(hc.overrides.task), run_dir)
    summary = record.read_summary(run_dir) if record.has_summary(run_dir) else \
        replace(known, status="running", run_dir=str(run_dir.resolve()))
    if not launched.ok and (launched.lost or summary.status == "running"):
        lost = launched.lost or "rank 0 ended without recording an outcome"
        summary.status, summary.hint = "error", None
        summary.error = f"lost a rank: {lost}" + (f" (rank 0: {summary.error})" if summary.error else "")
        record.write_summary(run_dir, summary)
    return Outcome(summary.status, summary)


def in_process_launcher(hc) -> bool:
    return "BasicLauncher" in (hc.launcher.get("_target_", "") if hc.launcher else "")


def stop_sweep(run_dir: Path, code: int, config: Optional[schema.Config] = None) -> None:
    """Ctrl-C (or SIGTERM) stops the whole sweep, not just its current job: record this job's
    row and the comparison of the jobs so far, then exit 130/143 as a single run does. (Hydra
    skips on_job_end and on_multirun_end once the task exits, hence the explicit calls.)"""
    from runner.compare import append_job_row, summarise_sweep

    sweep_dir = record.sweep_of(run_dir) or run_dir.parent
    append_job_row(sweep_dir, run_dir)
    summarise_sweep(sweep_dir)
    if config is not None and list(config.trainer.loggers) != ["csv"]:  # the trackers' parent run ends too
        from runner.recording.trackers import finish_sweep

        try:
            finish_sweep(sweep_dir, config, code)
        except Exception as exc:
            print(f"warning: trainer.loggers: the sweep's record failed: {_one_line(exc)}", file=sys.stderr)
    print(f"sweep stopped: {run_dir.name} was interrupted; the jobs after it did not run", file=sys.stderr)
    raise Exit(code)


def entry() -> None:
    """`python -m runner`: Hydra's main, with exit codes as the contract says. Under torchrun, ranks
    other than 0 record into a throwaway folder and print nothing on stdout (rank 0 speaks)."""
    argv, throwaway = processes.other_rank_argv(sys.argv[1:])
    sys.argv = sys.argv[:1] + argv
    if processes.quiet():
        sys.stdout = open(os.devnull, "w")
    command = Command()
    try:
        hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(command)()
    except Exit as exc:  # a sweep's verdict, or a sweep stopped by a signal
        command.exit_code = exc.code
    except SystemExit as exc:
        # Hydra reports an exception it caught (a composition error) with exit 1; ours never use 1.
        sys.exit(2 if exc.code == 1 else exc.code)
    finally:
        processes.remove_folder(throwaway)
        from runner.execution.parallel import leave

        leave()
    sys.exit(command.exit_code)
