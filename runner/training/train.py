"""run(training) -> Outcome: prepare, the one visible training loop, finish; what watches the run hears
the loop's events (runner.recording.events).

    announce run start                                # trainer.loggers, the progress bar, checkpoints, ...
    for step in steps:
        window = batches.window(step)                 # a pure function of (seed, step)
        with watchers.step(step, host):               # the memory meter; first_grad.pt after the first step
            result = strategy.step(model, loss, optimizers, window.inputs, window.targets, window.sizes)
        log the result on the device; every log_every steps announce its rows (metrics.csv, the trackers, ...)
    announce run end                                  # once summary.json is complete

Everything that can go wrong is recorded, never lost: a strategy's exception (the deliberate
autograd errors included) ends the run with status=error and the message; a non-finite loss or
gradient with status=diverged and the step; SIGINT/SIGTERM after the current step with
status=interrupted. summary.json says status=running while the loop runs. Mapping an outcome
to an exit code is the command line's business (runner.cli).
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from runner.config.identity import training_id
from runner.config.schema import ConfigError, first_line, plain
from runner.recording import checkpoint, record
from runner.recording.events import RunStart, Subscribers
from runner.recording.record import Summary
from runner.recording.sinks import Progress
from runner.recording.steplog import StepLog
from runner.recording.trackers import loggers
from runner.recording.watchers import FirstGradientFile, MemoryMeter
from runner.training.build import Training
from runner.training.evaluate import evaluate


@dataclass
class Outcome:
    status: str  # the summary's status: ok | error | diverged | interrupted
    summary: Summary
    signum: Optional[int] = None  # the signal that interrupted the run


class StopOnSignal:
    """SIGINT/SIGTERM set a flag; the loop stops after the current step. A second signal
    falls back to the default behaviour, so an impatient user can still kill the run."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run(training: Training, run_dir: Path, summary: Optional[Summary] = None,
        resume: Optional[Dict[str, Any]] = None) -> Outcome:
    """Train, record, and return the outcome. Never raises for a failure of the run itself.

    `summary` may carry what the caller knows of the run (choices, overrides, config). `resume` is
    a loaded checkpoint (runner.recording.checkpoint.load) of this run: training continues from its step
    with its states, and metrics.csv is cut back to the rows it had then.
    """
    run_dir, known = Path(run_dir), summary or Summary()
    trainer = training.config.trainer
    start_step = int(resume["step"]) if resume is not None else 0
    watchers = Subscribers(_watchers(training, run_dir))
    # Announced before the run's clock starts: an MLflow store takes seconds to open.
    watchers.run_start(RunStart(run_dir, known, resumed=resume is not None, start_step=start_step,
                                steps=trainer.steps, host_columns=_host_columns(training)))
    summary, signum, failed = known, None, True
    try:
        summary, elapsed = _prepare(training, run_dir, known, resume)
        if summary.status == "running":
            signum = _train(training, summary, time.perf_counter() - elapsed, watchers)
        _finish(training, run_dir, summary)
        failed = False
    finally:  # each tracker's run ends with the summary's status, FAILED where an exception left the run
        watchers.run_end(summary, failed)
        watchers.close()
    training.engine.done()  # every rank waits for the others' records before any exits
    return Outcome(summary.status, summary, signum)


def _watchers(t: Training, run_dir: Path) -> List[Tuple[str, Any]]:
    """Who hears the loop, in order: trainer.loggers (metrics.csv among them), the progress bar, the
    checkpoints (after metrics.csv: they remember where its rows end), first_grad.pt, then the memory meter
    (innermost around the step, so that it measures the step alone)."""
    trainer = t.config.trainer
    named = loggers(t.config, run_dir) + [("the progress bar", Progress(trainer.progress))]
    if trainer.checkpoint_every:
        named.append(("checkpoints", checkpoint.Checkpoints(t, run_dir)))
    named.append(("first_grad.pt", FirstGradientFile(t, run_dir)))
    memory = plain(trainer.memory)
    if memory != "off":
        named.append(("the memory meter", MemoryMeter(every=memory == "every")))
    return named


def _host_columns(t: Training) -> Tuple[str, ...]:
    """The columns the loop adds from the host: loader mode's, the learning rate, the memory meter's."""
    return tuple((list(record.LOADER_COLUMNS) if t.config.data.micro_batch_size is not None else [])
                 + ([record.LR_COLUMN] if t.schedulers else [])
                 + ([] if plain(t.config.trainer.memory) == "off" else [record.MEMORY_COLUMN]))


def _prepare(t: Training, run_dir: Path, summary: Summary, resume: Optional[Dict[str, Any]]):
    """The summary as the run starts, and the training time a resumed run had already (its clock goes on
    from its checkpoint: time_s and wall_s count training, not downtime)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    world = t.config.trainer.processes
    if world > 1 and t.engine.world == 1:
        raise ConfigError(f"trainer.processes={world} needs its ranks started: run it with python -m runner "
                          f"(which launches them) or torchrun --nproc-per-node={world} -m runner")
    start_step, elapsed = 0, 0.0
    if resume is not None:
        checkpoint.check_matches(resume, t.config_record(), run_dir)
        start_step, elapsed = checkpoint.restore(resume, t), float(resume.get("elapsed_s", 0.0))
        record.truncate_metrics(run_dir, resume["metrics_bytes"])
    summary = replace(
        summary, status="running", steps_done=start_step, device=str(t.device),
        dtype=plain(t.config.trainer.dtype), seed=t.config.seed, accumulation=t.strategy.accumulation,
        params_without_grad=t.findings.params_without_grad, warnings=t.warnings(),
        features=t.dataset.columns.features if t.dataset.columns else None, outputs_from=t.findings.outputs_from,
        processes=world, parallel=t.engine.name,
        run_dir=str(run_dir.resolve()), resumed_from_step=start_step if resume is not None else None,
        training_id=training_id(t.config_record()), used_config_id=t.used_config_id())
    coupling = t.findings.coupling
    if coupling is not None:
        summary.batch_coupled, summary.stochastic = coupling.batch_coupled, coupling.stochastic
        summary.coupling_modules = coupling.modules
    if t.findings.not_differentiable:  # the loss probe's finding is this run's result
        summary.status, summary.error = "error", t.findings.not_differentiable
    else:
        summary.gradient_flow = t.findings.gradient_flow
        record.write_gradient_flow(run_dir, summary.gradient_flow)
    record.write_summary(run_dir, summary)
    return summary, elapsed


def _train(t: Training, summary: Summary, started: float, watchers: Subscribers) -> Optional[int]:
    """The loop. Fills in the summary's status, error and steps_done; returns a stopping signal."""
    trainer, start, engine = t.config.trainer, summary.steps_done, t.engine
    log_every = trainer.log_every or (50 if t.device.type == "cuda" else 1)
    scheduled = bool(t.schedulers)
    log = StepLog(t.model, engine.param_sums)
    if t.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(t.device)
    loop_started, step = time.perf_counter(), start
    with StopOnSignal() as stop:
        try:
            for step in range(start, trainer.steps):
                window = t.batches.window(step)
                host = window.columns()  # loader mode's epoch and window_size
                if scheduled:  # the learning rate this step uses
                    host[record.LR_COLUMN] = t.optimizers[0].param_groups[0]["lr"]
                shard = t.shard(window)  # this rank's share of the batch and its loss weight (all of it in one process)
                with watchers.step(step, host):  # the memory meter measures it; first_grad.pt after the first
                    result = t.strategy.step(engine.module, t.loss_fn, t.optimizers, shard.inputs, shard.targets,
                                             window.sizes, shard.weight)
                result = engine.gather(result, shard.share)  # the batch's loss, from every rank's share
                result.extras.update(engine.columns())  # grad_scale, step_skipped (fp16)
                log.add(step, result, time.perf_counter() - started, host)
                done = step + 1
                # A checkpoint holds the rows up to its step: they are flushed there.
                if done % log_every == 0 or done == trainer.steps or stop.signum \
                        or checkpoint.due(done, trainer.checkpoint_every, trainer.steps):
                    rows, diverged_at = log.flush()
                    watchers.rows(rows)  # metrics.csv, the progress bar, the trackers, a checkpoint at its step
                    if diverged_at is not None:
                        _diverged(summary, diverged_at)
                        break
                    summary.steps_done = done
                if stop.signum is not None:
                    summary.status = "interrupted"
                    summary.error = f"stopped by {signal.Signals(stop.signum).name} after step {done}"
                    break
            else:
                summary.status = "ok"
        except Exception as exc:  # a strategy's failure is a result, recorded with its message
            watchers.rows(log.flush()[0])
            summary.status, summary.steps_done = "error", step
            summary.error = f"{type(exc).__name__}: {first_line(exc)}"
            summary.hint = t.engine.hint(exc) or t.strategy.hint or None
    ran = summary.steps_done - start
    summary.time_per_step_s = (time.perf_counter() - loop_started) / ran if ran > 0 else None
    summary.wall_s = time.perf_counter() - started
    summary.peak_saved_bytes = log.peak_saved
    summary.final_loss = float(log.last_loss) if log.last_loss is not None else None
    for key, value in engine.figures(summary.steps_done - start).items():  # rounds, gradient bytes
        setattr(summary, key, value)
    return stop.signum


def _diverged(summary: Summary, step: int) -> None:
    summary.status, summary.steps_done, summary.diverged_at_step = "diverged", step, step
    summary.error = f"non-finite loss or gradient at step {step}"
    summary.hint = "lower optim.lr, or check the loss for log(0) / division by zero"


def _finish(t: Training, run_dir: Path, summary: Summary) -> None:
    """Final parameters, their checksums and the held-out metrics; summary.json last."""
    if t.device.type == "cuda":
        summary.cuda_max_memory_allocated = torch.cuda.max_memory_allocated(t.device)
    if summary.status != "error":
        params, state = t.engine.full_state(t.model)  # full tensors, however the ranks hold them
        record.write_params(run_dir, state)
        summary.param_sum = record.param_sum(params)
        summary.param_sha256 = record.param_sha256(params)
        summary.param_names = sorted(params)
    # Every rank takes part, whatever its status, so that none waits (None in one process).
    summary.ranks_agree = t.engine.agree(summary.param_sha256)
    if summary.status == "ok" and t.config.trainer.eval:
        metrics = evaluate(t.model, t.dataset.eval_inputs, t.dataset.eval_targets, t.spec.kind)
        if metrics:
            summary.eval = metrics
            summary.eval_metric, summary.eval_value = next(iter(metrics.items()))
    if t.ema is not None:
        _finish_ema(t, run_dir, summary)
    record.write_summary(run_dir, summary)


def _finish_ema(t: Training, run_dir: Path, summary: Summary) -> None:
    """trainer.ema: the averaged weights' file, checksums and headline held-out metric."""
    if summary.status == "error":
        return
    averaged = t.ema.module
    record.write_ema_weights(run_dir, averaged.state_dict())
    params = dict(averaged.named_parameters())
    summary.ema_param_sum, summary.ema_param_sha256 = record.param_sum(params), record.param_sha256(params)
    if summary.status == "ok" and summary.eval_metric is not None:
        metrics = evaluate(averaged, t.dataset.eval_inputs, t.dataset.eval_targets, t.spec.kind)
        summary.ema_eval_value = metrics.get(summary.eval_metric)
