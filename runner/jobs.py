"""One run or one job of a sweep, from its composed config to its exit code: prepare (the typed
config, a resume's checkpoint, validation, the thread policy), build once, reuse an equal job's
records, train in this process or as ranks, stop a sweep on a signal. The Hydra entry point
(runner.cli) and the notebook API (runner.api) both prepare through here.

Single run: exit 0 when it finished ok; 1 for a failed or diverged run; 2 for bad input; 128 + the
signal when interrupted (130/143).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

from runner.analysis.runs import flatten
from runner.config import schema
from runner.config.compose import (
    asked,
    config_for_resume,
    config_from_omegaconf,
    one_line,
)
from runner.config.schema import GROUPS, ConfigError
from runner.execution import processes
from runner.recording import record
from runner.recording.record import Summary
from runner.recording.terminal import print_summary


def origin(cfg, hydra_node) -> Summary:
    """What a run's summary records of how it was asked for (`cfg`: the composed DictConfig)."""
    return Summary(**asked(cfg, hydra_node))


def check_resume_overrides(run_dir: Path, saved: Dict[str, Any], choices: Dict[str, Any],
                           composed: Dict[str, Any], overrides: List[str]) -> None:
    """A resume repeats the run's command: an override equal to the run's own value is fine; one
    that differs is refused, naming the key, the run's value and the new one. Keys the schema lets
    a resume change (trainer.steps, ...) are not compared."""
    may_change = schema.resume_may_change()
    # A custom loss's, model's or the optimizer's arguments sit beside its keys in the command
    # (+loss.KEY), apart in the checkpoint.
    saved = {**saved, **{group: {**saved.get(group, {}), **saved.get(f"{group}_kwargs", {})}
                         for group in schema.ARGUMENT_GROUPS}}
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


class Exit(BaseException):
    """A sweep's exit code, raised from its last callback past Hydra (which catches Exception and
    exits 1 itself: bad input exits 2 here, so `entry` maps Hydra's 1; ours never use it)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


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
        """What the run would use (runner.config.identity), known before anything is built: the classes'
        arguments as the build takes them (runner.training.build.classes_arguments)."""
        from runner.config.identity import config_record, used_config_id
        from runner.training.build import classes_arguments

        used, _ = classes_arguments(self.config, self.extras)
        return used_config_id(self.config, config_record(self.config, used["loss"], used["model"], self.extras["optim"],
                                                         used["data"]))


def prepare(cfg, hydra_node, build: bool = True) -> Prepared:
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
                                                     optim_kwargs=extras["optim"], data_kwargs=extras["data"]))


def exit_code(status: str, signum: Optional[int]) -> int:
    if status == "interrupted" and signum is not None:
        return 128 + signum
    return {"ok": 0, "error": 1, "diverged": 1}.get(status, 1)


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
        print(f"warning: trainer.loggers: {run_dir.name} is not tracked: {one_line(exc)}", file=sys.stderr)


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
            print(f"warning: trainer.loggers: the sweep's record failed: {one_line(exc)}", file=sys.stderr)
    print(f"sweep stopped: {run_dir.name} was interrupted; the jobs after it did not run", file=sys.stderr)
    raise Exit(code)
