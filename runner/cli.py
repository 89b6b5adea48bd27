"""The only Hydra entry point: compose, build, run, map the outcome to an exit code.

Single run: exit 0 when it finished ok; 1 for a failed or diverged run; 2 for bad input;
130/143 when interrupted by SIGINT/SIGTERM. In a sweep (-m) a job never raises: its outcome is
recorded in its summary.json and the sweep's comparison decides the exit code; only SIGINT/SIGTERM
stops the whole sweep (130/143) after recording the interrupted job.
`trainer.resume=<run dir>` continues that run in its own folder from its checkpoint.pt.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Tuple

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner import schema
from runner.schema import Config, ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "data", "loss", "backward", "optim")

schema.register()


def config_from_omegaconf(cfg: DictConfig) -> Tuple[Config, Dict[str, Any]]:
    """Composed config -> (typed plain dataclasses, the custom loss's extra keyword arguments)."""
    try:
        if "hydra" in cfg:  # callbacks see Hydra's own node; its sweep keys only resolve in a job
            cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        if OmegaConf.get_type(cfg) is Config and not schema.loss_kwargs(cfg.loss):
            return OmegaConf.to_object(cfg), {}  # already typed by Hydra: the fast, common path
        container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        kwargs = schema.loss_kwargs(container["loss"])
        container["loss"] = {k: v for k, v in container["loss"].items() if k not in kwargs}
        typed = OmegaConf.merge(OmegaConf.structured(Config), container)
        return OmegaConf.to_object(typed), kwargs
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        if key == "loss._target_" or "_target_" in str(exc):
            raise ConfigError("loss._target_ is missing: loss=custom needs "
                              "loss._target_=package.module.Class") from None
        raise ConfigError(f"{key or 'config'}: {str(exc).splitlines()[0]}") from None


# trainer.* keys a resumed run may change; everything else comes from the checkpoint.
RESUME_MAY_CHANGE = ("trainer.resume", "trainer.steps", "trainer.device", "trainer.progress",
                     "trainer.log_every", "trainer.checkpoint_every", "trainer.threads", "trainer.memory")


def config_for_resume(state: Dict[str, Any], overrides: list, current: Config) -> Tuple[Config, Dict[str, Any]]:
    """The checkpoint's own config, with the few trainer settings a resume may change."""
    saved = dict(state["config"])
    loss_kwargs = saved.pop("loss_kwargs", {}) or {}
    foreign = [o for o in overrides if not o.lstrip("+~").startswith(RESUME_MAY_CHANGE)]
    if foreign:
        raise ConfigError(f"trainer.resume continues a run with its own config: drop {foreign[0]} "
                          f"(allowed with a resume: {', '.join(RESUME_MAY_CHANGE[1:])})")
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), saved))
    for dotted in RESUME_MAY_CHANGE:
        if any(o.lstrip("+~").startswith(dotted + "=") for o in overrides):
            key = dotted.split(".")[1]
            setattr(config.trainer, key, getattr(current.trainer, key))
    return config, loss_kwargs


def report_bad_input(exc: Exception) -> None:
    print(f"error: {exc}", file=sys.stderr)


def _run_meta(cfg: DictConfig) -> Dict[str, Any]:
    hc = HydraConfig.get()
    choices = {g: hc.runtime.choices.get(g) for g in GROUPS}
    if hc.runtime.choices.get("experiment"):
        choices["experiment"] = hc.runtime.choices.get("experiment")
    return {
        "choices": choices,
        "overrides": list(hc.overrides.task),
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
    }


def _print_summary(summary: Dict[str, Any], multirun: bool) -> None:
    from rich.console import Console

    console = Console(stderr=False, highlight=False)
    status = summary["status"]
    colour = {"ok": "green", "interrupted": "yellow"}.get(status, "red")
    if multirun:
        detail = summary.get("error") if status != "ok" else \
            f"loss={summary.get('final_loss')} param_sum={summary.get('param_sum')}"
        console.print(f"[{colour}]{status}[/] {Path(summary.get('run_dir', '')).name} {detail}",
                      soft_wrap=True, highlight=False, markup=True)
        return
    from rich.table import Table

    table = Table(title=f"run: [{colour}]{status}[/]", show_header=False)
    rows = [("run dir", summary.get("run_dir")), ("steps", summary.get("steps_done")),
            ("final loss", summary.get("final_loss")),
            (summary.get("eval_metric") or "eval", summary.get("eval_value")),
            ("param_sum", summary.get("param_sum")),
            ("param_sha256", (summary.get("param_sha256") or "")[:16]),
            ("peak_saved_bytes", summary.get("peak_saved_bytes")),
            ("wall s", summary.get("wall_s"))]
    if summary.get("params_without_grad"):
        rows.append(("no gradient", ", ".join(summary["params_without_grad"])))
    if summary.get("error"):
        rows.append(("error", summary["error"]))
    if summary.get("hint"):
        rows.append(("hint", summary["hint"]))
    for key, value in rows:
        table.add_row(key, "" if value is None else str(value))
    console.print(table)
    flow = summary.get("gradient_flow")
    if flow:
        flow_table = Table(title="gradient flow, first step")
        for column in ("module", "component", "grad_norm"):
            flow_table.add_column(column)
        for row in flow:
            norm = f"{row['grad_norm']:.3g}" if row["receives_gradient"] else "none"
            flow_table.add_row(row["module"], row["component"], norm)
        console.print(flow_table)


def parallel_job_threads(hc) -> int:
    """Torch threads for one job of a parallel sweep, so that jobs don't oversubscribe the cores:
    the cores divided by the launcher's workers (0 = leave torch's default)."""
    launcher = hc.launcher.get("_target_", "") if hc.launcher else ""
    if "Joblib" not in launcher:
        return 0
    import os

    cores = os.cpu_count() or 1
    workers = hc.launcher.get("n_jobs", -1)
    workers = cores if workers in (None, -1) or workers > cores else max(1, workers)
    return max(1, cores // workers)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    # Imported here, not at the top, so that `--help` never pays for torch.
    import torch

    from runner import checkpoint, record
    from runner.parts import build_parts
    from runner.train import run

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    meta = _run_meta(cfg)
    resume_state = None
    try:
        config, loss_kwargs = config_from_omegaconf(cfg)
        if config.trainer.resume:
            resume_state = checkpoint.load(Path(config.trainer.resume))
            config, loss_kwargs = config_for_resume(resume_state, meta["overrides"], config)
            run_dir = Path(config.trainer.resume)
            previous = record.read_summary(run_dir) if (run_dir / record.SUMMARY).exists() else {}
            meta = {k: previous.get(k, v) for k, v in meta.items()}  # the run's own choices and config
        schema.validate(config)
        threads = config.trainer.threads or parallel_job_threads(hc)
        if threads:
            torch.set_num_threads(threads)
        parts = build_parts(config, loss_kwargs)
    except (ConfigError, checkpoint.CheckpointError) as exc:
        report_bad_input(exc)
        if not multirun:
            sys.exit(2)
        # The job's row in the sweep says what was wrong; the other jobs go on.
        record.write_summary(run_dir, {"status": "error", "error": str(exc), "steps_done": 0,
                                       "run_dir": str(run_dir.resolve()), **meta})
        return
    for warning in parts.strategy.ignored_switches(config.backward):
        print(f"warning: {warning}", file=sys.stderr)
    try:
        outcome = run(parts, run_dir, meta, resume=resume_state)
    except checkpoint.CheckpointError as exc:
        report_bad_input(exc)
        sys.exit(2)
    if outcome.status == "error" and not multirun:
        print(f"error: {outcome.summary['error']}", file=sys.stderr)
    _print_summary(outcome.summary, multirun)
    if multirun and outcome.status == "interrupted" and in_process_launcher(hc):
        stop_sweep(run_dir, outcome.exit_code)
    if not multirun and outcome.exit_code:
        sys.exit(outcome.exit_code)


def in_process_launcher(hc) -> bool:
    return "BasicLauncher" in (hc.launcher.get("_target_", "") if hc.launcher else "")


def stop_sweep(run_dir: Path, exit_code: int) -> None:
    """Ctrl-C (or SIGTERM) stops the whole sweep, not just its current job: record this job's
    row and the comparison of the jobs so far, then exit 130/143 as a single run does. (Hydra
    skips on_job_end and on_multirun_end once the task exits, hence the explicit calls.)"""
    from runner.compare import append_job_row, summarise_sweep

    sweep_dir = next((p for p in run_dir.resolve().parents if (p / "multirun.yaml").exists()), run_dir.parent)
    append_job_row(sweep_dir, run_dir)
    summarise_sweep(sweep_dir)
    print(f"sweep stopped: {run_dir.name} was interrupted; the jobs after it did not run", file=sys.stderr)
    sys.exit(exit_code)
