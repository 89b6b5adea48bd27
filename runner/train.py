"""run(parts) -> Outcome: the one visible training loop.

    for step in steps:
        inputs, targets = dataset.batch(step)         # a pure function of (seed, step)
        result = strategy.step(model, loss, optimizers, inputs, targets)   # backward + step
        buffer result on the device; every log_every steps write the rows to metrics.csv

Everything that can go wrong is recorded, never lost: a strategy's exception (the deliberate
autograd errors included) ends the run with status=error and the message; a non-finite loss or
gradient with status=diverged and the step; SIGINT/SIGTERM after the current step with
status=interrupted. summary.json says status=running while the loop runs.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from runner import checkpoint, record
from runner.evaluate import evaluate
from runner.gradflow import gradient_flow
from runner.memory import SavedTensorsMeter
from runner.parts import Parts


class NotDifferentiable(ValueError):
    pass


@dataclass
class Outcome:
    status: str
    exit_code: int
    summary: Dict[str, Any] = field(default_factory=dict)


def _value(x):
    return getattr(x, "value", x)


def probe_loss(parts: Parts) -> List[str]:
    """Check, before training, that the loss can be backpropagated; return the names of
    parameters that receive no gradient from it.

    It leaves no trace: the RNG state is restored, the model runs in eval mode (no BatchNorm
    statistics change) and gradients come from autograd.grad, which does not touch .grad.
    """
    model, loss_fn = parts.model, parts.loss_fn
    inputs, targets = parts.dataset.batch(0)
    was_training = model.training
    with torch.random.fork_rng(devices=[parts.device] if parts.device.type == "cuda" else []):
        model.eval()
        try:
            loss = loss_fn(model(inputs), targets)
        finally:
            model.train(was_training)
        name = _loss_name(parts)
        if not isinstance(loss, torch.Tensor):
            raise NotDifferentiable(
                f"{name} returned {type(loss).__name__}, not a tensor: it is not differentiable "
                "(a .item() or float() inside the loss cuts the graph); return a torch tensor")
        if loss.dim() != 0:
            raise NotDifferentiable(f"{name} returned shape {tuple(loss.shape)}, not a scalar: "
                                    "reduce it (reduction=mean or sum) to train with it")
        if loss.grad_fn is None:
            raise NotDifferentiable(
                f"{name} is not differentiable: its output has no grad_fn (an argmax, a comparison, "
                ".detach(), .item() or a new torch.tensor(...) inside the loss cuts the graph)")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return [n for (n, _), g in zip(named, grads) if g is None]


def _loss_name(parts: Parts) -> str:
    target = getattr(parts.config.loss, "_target_", None)
    return f"loss={parts.config.loss.name}" + (f" ({target})" if target else "")


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


def _progress(enabled: bool, total: int, start: int):
    """A rich progress bar on a terminal; a no-op otherwise (rich is only imported then)."""
    if not (enabled and sys.stdout.isatty()):
        return None
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.start()
    bar.add_task("training", total=total, completed=start)
    return bar


class StepBuffer:
    """Per-step results kept on the device and turned into CSV rows in one transfer.

    metrics.csv is opened at the first flush, when the loss's parts (loss_<name> columns) are known.
    """

    def __init__(self, parts: Parts, run_dir: Path, append: bool, extra_columns: List[str]):
        self.run_dir, self.append, self.extra_columns = run_dir, append, extra_columns
        self.params = list(parts.model.parameters())
        self.writer: Optional[record.MetricsWriter] = None
        self.columns: Optional[List[str]] = None
        self.steps: List[int] = []
        self.values: List[torch.Tensor] = []
        self.times: List[float] = []
        self.extras: List[Dict[str, float]] = []

    def add(self, step: int, result, elapsed: float, extra: Optional[Dict[str, float]] = None) -> None:
        named = {"loss": result.loss, "grad_norm": result.grad_norm}
        named.update({f"loss_{k}": v for k, v in result.parts.items()})
        named.update(result.extras)
        if self.columns is None:
            self.columns = list(named)
        values = [named[c] for c in self.columns] + [p.detach().sum() for p in self.params]
        try:  # one op when every value has the run's dtype (the common case)
            self.values.append(torch.stack(values))
        except RuntimeError:
            self.values.append(torch.stack([v.reshape(()).to(torch.float64) for v in values]))
        self.steps.append(step)
        self.times.append(elapsed)
        self.extras.append(extra or {})

    def flush(self) -> Optional[int]:
        """Write buffered rows. Returns the first step whose loss or gradient is not finite."""
        if not self.steps:
            return None
        if self.writer is None:
            self.writer = record.MetricsWriter(self.run_dir, self.columns[2:] + self.extra_columns,
                                               append=self.append)
        buffered = self.values  # one transfer for all buffered rows (no stack for a single row)
        table = [buffered[0].cpu().tolist()] if len(buffered) == 1 else torch.stack(buffered).cpu().tolist()
        rows, diverged_at = [], None
        width = len(self.columns)
        for step, values, elapsed, extra in zip(self.steps, table, self.times, self.extras):
            row = dict(zip(self.columns, values[:width]))
            # param_sum as the accumulation answer prints it: a Python sum of per-tensor sums
            row.update(step=step + 1, param_sum=sum(values[width:]), time_s=elapsed, **extra)
            rows.append(row)
            if not all(map(_finite, (row["loss"], row["grad_norm"]))):
                diverged_at = step + 1
                break  # the run ends at this step: rows batched after it are not its record
        self.writer.write_rows(rows)
        self.steps, self.values, self.times, self.extras = [], [], [], []
        return diverged_at

    def position(self) -> int:
        return self.writer.position() if self.writer is not None else 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def config_record(parts: Parts) -> Dict[str, Any]:
    """The run's config as plain JSON-able data, with a custom loss's arguments."""
    return {**json.loads(json.dumps(asdict(parts.config), default=str)), "loss_kwargs": parts.loss_kwargs or {}}


def run(parts: Parts, run_dir: Path, meta: Optional[Dict[str, Any]] = None,
        resume: Optional[Dict[str, Any]] = None) -> Outcome:
    """Train, record, and return the outcome. Never raises for a failure of the run itself.

    `resume` is a loaded checkpoint (runner.checkpoint.load) of this run: training continues
    from its step with its states, and metrics.csv is cut back to the rows it had then.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = parts.config
    start_step = 0
    if resume is not None:
        checkpoint.check_matches(resume, config_record(parts), run_dir)
        start_step = checkpoint.restore(resume, parts)
        checkpoint.truncate_metrics(run_dir, resume["metrics_bytes"])
    checkpoint_every = cfg.trainer.checkpoint_every
    steps = cfg.trainer.steps
    log_every = cfg.trainer.log_every or (50 if parts.device.type == "cuda" else 1)
    memory_mode = _value(cfg.trainer.memory)
    summary: Dict[str, Any] = {
        "status": "running", "error": None, "hint": None, "steps_done": start_step,
        "final_loss": None, "eval_metric": None, "eval_value": None, "eval": {},
        "param_sum": None, "param_sha256": None, "peak_saved_bytes": None,
        "cuda_max_memory_allocated": None, "wall_s": None, "time_per_step_s": None,
        "device": str(parts.device), "dtype": _value(cfg.trainer.dtype),
        "torch_version": torch.__version__, "seed": cfg.seed,
        "accumulation": parts.strategy.accumulation, "params_without_grad": [],
        "warnings": parts.strategy.ignored_switches(cfg.backward),
        "run_dir": str(run_dir.resolve()), "resumed_from_step": start_step if resume else None,
        "training_id": checkpoint.training_id(config_record(parts)),
    }
    summary.update(meta or {})
    # A resumed run's clock goes on from its checkpoint (time_s, wall_s count training, not downtime).
    started = time.perf_counter() - (float(resume.get("elapsed_s", 0.0)) if resume is not None else 0.0)

    try:
        summary["params_without_grad"] = probe_loss(parts)
    except NotDifferentiable as exc:
        summary.update(status="error", error=str(exc), wall_s=time.perf_counter() - started)
        record.write_summary(run_dir, summary)
        return Outcome("error", 1, summary)

    first_inputs, first_targets = parts.dataset.batch(start_step)
    summary["gradient_flow"] = gradient_flow(parts.strategy, parts.model, parts.loss_fn,
                                             first_inputs, first_targets)
    record.write_table(run_dir, record.GRADIENT_FLOW, summary["gradient_flow"])
    record.write_summary(run_dir, summary)
    buffer = StepBuffer(parts, run_dir, append=resume is not None,
                        extra_columns=[] if memory_mode == "off" else ["peak_saved_bytes"])
    if parts.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(parts.device)
    peak_saved = None
    last_loss = None
    step = start_step
    bar = _progress(cfg.trainer.progress, steps, start_step)
    loop_started = time.perf_counter()
    try:
        with StopOnSignal() as stop:
            for step in range(start_step, steps):
                inputs, targets = parts.dataset.batch(step)
                measure = memory_mode == "every" or (memory_mode == "first" and step == start_step)
                if measure:
                    with SavedTensorsMeter() as meter:
                        result = parts.strategy.step(parts.model, parts.loss_fn, parts.optimizers,
                                                     inputs, targets)
                    peak_saved = max(peak_saved or 0, meter.peak)
                else:
                    result = parts.strategy.step(parts.model, parts.loss_fn, parts.optimizers,
                                                 inputs, targets)
                extra = {"peak_saved_bytes": meter.peak} if measure else None
                buffer.add(step, result, time.perf_counter() - started, extra)
                last_loss = result.loss
                done = step + 1
                if bar is not None:
                    bar.update(bar.task_ids[0], completed=done)
                checkpoint_due = checkpoint_every and done % checkpoint_every == 0 and done < steps
                if done % log_every == 0 or done == steps or stop.signum is not None or checkpoint_due:
                    diverged_at = buffer.flush()
                    if diverged_at is not None:
                        summary.update(status="diverged", steps_done=diverged_at, diverged_at_step=diverged_at,
                                       error=f"non-finite loss or gradient at step {diverged_at}",
                                       hint="lower optim.lr, or check the loss for log(0) / division by zero")
                        break
                    summary["steps_done"] = done
                    if checkpoint_due:
                        checkpoint.save(run_dir, parts, done, buffer.position(), config_record(parts),
                                        elapsed_s=time.perf_counter() - started)
                if stop.signum is not None:
                    name = signal.Signals(stop.signum).name
                    summary.update(status="interrupted", error=f"stopped by {name} after step {done}")
                    break
            else:
                summary["status"] = "ok"
    except Exception as exc:  # a strategy's failure is a result, recorded with its message
        buffer.flush()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        summary.update(status="error", error=f"{type(exc).__name__}: {message}",
                       hint=parts.strategy.hint or None, steps_done=step)
    finally:
        if bar is not None:
            bar.stop()
        buffer.close()

    loop_s = time.perf_counter() - loop_started
    ran = summary["steps_done"] - start_step
    summary.update(
        wall_s=time.perf_counter() - started,
        time_per_step_s=loop_s / ran if ran > 0 else None,
        peak_saved_bytes=peak_saved,
        final_loss=float(last_loss) if last_loss is not None else None,
    )
    if parts.device.type == "cuda":
        summary["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(parts.device)
    if summary["status"] != "error":
        record.write_params(run_dir, parts.model)
        summary.update(param_sum=record.param_sum(parts.model),
                       param_sha256=record.param_sha256(parts.model),
                       param_names=[name for name, _ in record.named_parameters_in_order(parts.model)])
        if summary["status"] == "ok" and cfg.trainer.eval:
            metrics = evaluate(parts.model, parts.dataset.eval_inputs, parts.dataset.eval_targets,
                               parts.spec.kind)
            if metrics:
                summary.update(eval=metrics, eval_metric=next(iter(metrics)),
                               eval_value=next(iter(metrics.values())))
    record.write_summary(run_dir, summary)
    codes = {"ok": 0, "error": 1, "diverged": 1}
    if summary["status"] == "interrupted":
        return Outcome("interrupted", 128 + stop.signum, summary)
    return Outcome(summary["status"], codes[summary["status"]], summary)
