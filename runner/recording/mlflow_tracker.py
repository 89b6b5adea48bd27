"""trainer.loggers=[csv,mlflow]: one MLflow run per job, a sweep as a parent run with its jobs nested; a
subscriber of the loop's events (runner.recording.events).

A job's run starts with the run's config as params (flattened keys: optim.lr); the per-step rows go as metrics,
queued with `log_batch(..., synchronous=False)` a batch at a time (`batched`: runner.recording.trackers.Batched,
never a call per column per step; MLflow's own thread writes them, and the run's end waits for them); at the end
the summary's figures as metrics (final_loss, eval_value, param_sum, peak_saved_bytes, ...) and its
outcome as tags (status, error, param_sha256); it ends FINISHED, FAILED (error, diverged, or an
exception) or KILLED (interrupted). The sweep's parent run is found or created by its folder (tag
backward_lab.sweep_dir), first by the sweep's start (`sweep_start`, from runner.callbacks), so that jobs in other
processes (joblib) find it; the sweep's end (`sweep_end`) sets each job's `verdict` tag and verdict metrics from
comparison.csv and attaches comparison.csv and the pictures to the parent run.

mlflow is imported here only, and only when the logger is on (`python -m runner` stays fast). The
default store is SQLite (record.MLFLOW_STORE above the run's or the sweep's folder): no server. See
MLflow's log_batch limits (1000 metrics, 100 params per call) and nested runs (tag mlflow.parentRunId):
https://mlflow.org/docs/latest/api_reference/python_api/mlflow.client.html
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from runner.recording import record
from runner.recording.events import RunStart, Subscriber, number, step_scalars
from runner.recording.record import Summary

EXPERIMENT = "backward-lab"
RUN_DIR_TAG = "backward_lab.run_dir"  # a job's run: its folder (the sweep's end finds it by this)
SWEEP_DIR_TAG = "backward_lab.sweep_dir"  # a sweep's parent run: the sweep's folder
VERDICT_TAG = "verdict"
# Summary keys logged as metrics at a run's end (numbers only; eval adds eval.<metric> for each held-out metric).
FINAL_METRICS = tuple(k for k in record.COMPARED_KEYS if k not in ("status", "error", "eval_metric", "param_sha256",
                                                                   "reused_from")) + ("wall_s",)
FINAL_TAGS = ("status", "error", "hint", "param_sha256", "training_id", "reused_from")
# Comparison columns logged as metrics on each job's run at the sweep's end.
VERDICT_METRICS = ("max_abs_diff", "grad_rel_diff", "diff_to_oracle", "ema_max_abs_diff")
STATUS = {"ok": "FINISHED", "interrupted": "KILLED"}  # anything else: FAILED
MAX_METRICS, MAX_PARAMS, MAX_VALUE = 1000, 100, 6000  # MLflow's limits per log_batch call and per value


def store_uri(uri: Optional[str], folder: Path) -> str:
    """trainer.mlflow_uri, or the SQLite store in `folder` (a run's or a sweep's folder's parent)."""
    return uri or f"sqlite:///{(Path(folder).resolve() / record.MLFLOW_STORE)}"


def store_folder(run_dir: Path) -> Path:
    """Where a run's default store lives: above its sweep's folder, or above its own."""
    return (record.sweep_of(run_dir) or Path(run_dir).resolve()).parent


def _client(uri: Optional[str], folder: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store_uri(uri, folder))


def _experiment_id(client, uri: Optional[str], folder: Path) -> str:
    """The backward-lab experiment; with a SQLite store its artifacts sit beside the database (a server
    keeps its own artifact root)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(EXPERIMENT)
    if found is not None:
        return found.experiment_id
    sqlite = "sqlite:///"
    database = store_uri(uri, folder)
    location = (Path(database[len(sqlite):]).resolve().parent / record.MLFLOW_ARTIFACTS).as_uri() \
        if database.startswith(sqlite) else None
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=location)
    except MlflowException:  # another job of a parallel sweep created it first
        return client.get_experiment_by_name(EXPERIMENT).experiment_id


def _find_run(client, experiment_id: str, tag: str, value: str):
    quoted = value.replace("'", "\\'")
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{tag}` = '{quoted}'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def _text(value: Any) -> str:
    text = "" if value is None else str(value)
    return text[:MAX_VALUE]


def _chunks(items: List[Any], size: int) -> Iterable[List[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def start_sweep(sweep_dir: Path, uri: Optional[str]) -> str:
    """The sweep's parent run, found by its folder or created: its run id."""
    sweep_dir = Path(sweep_dir).resolve()
    client = _client(uri, sweep_dir.parent)
    experiment_id = _experiment_id(client, uri, sweep_dir.parent)
    found = _find_run(client, experiment_id, SWEEP_DIR_TAG, str(sweep_dir))
    if found is not None:
        return found.info.run_id
    return client.create_run(experiment_id, run_name=sweep_dir.name,
                             tags={SWEEP_DIR_TAG: str(sweep_dir)}).info.run_id


class MlflowTracker(Subscriber):
    """One job's MLflow run: params at the start, a log_batch per batch of rows, figures and status at the end."""

    requires = "mlflow"
    batched = True

    def __init__(self, run_dir: Path, config: Any):
        self.run_dir, self.uri = Path(run_dir).resolve(), _uri(config)
        self.pending: List[Any] = []  # log_batch operations queued, not yet known to be stored

    def run_start(self, run: RunStart) -> None:
        from mlflow.entities import Param

        from runner.analysis.runs import flatten

        run_dir, summary = self.run_dir, run.summary
        folder = store_folder(run_dir)
        self.client = _client(self.uri, folder)
        experiment_id = _experiment_id(self.client, self.uri, folder)
        tags = {RUN_DIR_TAG: str(run_dir), **{f"choice.{g}": _text(v) for g, v in summary.choices.items() if v}}
        sweep_dir = record.sweep_of(run_dir)
        if sweep_dir is not None:
            tags["mlflow.parentRunId"] = start_sweep(sweep_dir, self.uri)
        earlier = _find_run(self.client, experiment_id, RUN_DIR_TAG, str(run_dir)) if run.resumed else None
        if earlier is not None:  # a resumed run goes on in its MLflow run
            self.run_id = earlier.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags).info.run_id
        params = [Param(key[:250], _text(value)) for key, value in flatten(summary.config).items()]
        for chunk in _chunks(params, MAX_PARAMS):
            self.client.log_batch(self.run_id, params=chunk)

    def rows(self, rows: List[Dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(column, value, now, step)
                   for step, scalars in map(step_scalars, rows) for column, value in scalars]
        for chunk in _chunks(metrics, MAX_METRICS):  # queued: MLflow's own thread writes them to the store
            self.pending.append(self.client.log_batch(self.run_id, metrics=chunk, synchronous=False))

    def close(self) -> None:
        """The queued rows reach the store (a failure to store them raises here); the run ends in
        `run_end`, once the summary is complete."""
        pending, self.pending = self.pending, []
        for operation in pending:
            operation.wait()

    def run_end(self, summary: Summary, failed: bool) -> None:
        from mlflow.entities import Metric, RunTag

        self.close()

        now = int(time.time() * 1000)
        step = summary.steps_done
        figures = {key: number(getattr(summary, key)) for key in FINAL_METRICS}
        figures.update({f"eval.{name}": number(value) for name, value in summary.eval.items()})
        metrics = [Metric(key, value, now, step) for key, value in figures.items() if value is not None]
        tags = [RunTag(key, _text(getattr(summary, key))) for key in FINAL_TAGS if getattr(summary, key) is not None]
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
        status = "FAILED" if failed else STATUS.get(summary.status, "FAILED")
        self.client.set_terminated(self.run_id, status=status)

    @classmethod
    def sweep_start(cls, sweep_dir: Path, config: Any) -> None:
        start_sweep(sweep_dir, _uri(config))

    @classmethod
    def sweep_end(cls, sweep_dir: Path, config: Any, exit_code: int) -> None:
        finish_sweep(sweep_dir, _uri(config), exit_code)


def _uri(config: Any) -> Optional[str]:
    """trainer.mlflow_uri (None: the SQLite store beside the runs)."""
    return getattr(config.trainer, "mlflow_uri", None)


def finish_sweep(sweep_dir: Path, uri: Optional[str], exit_code: int) -> None:
    """The sweep's end: each job's verdict (tag and metrics), the parent's artifacts and status."""
    from mlflow.entities import Metric, RunTag

    sweep_dir = Path(sweep_dir).resolve()
    client = _client(uri, sweep_dir.parent)
    experiment_id = _experiment_id(client, uri, sweep_dir.parent)
    parent_id = start_sweep(sweep_dir, uri)
    now = int(time.time() * 1000)
    for row in record.read_comparison_rows(sweep_dir):
        job = _find_run(client, experiment_id, RUN_DIR_TAG, str(Path(row.get("run_dir", "")).resolve()))
        if job is None or not row.get("verdict"):
            continue
        metrics = [Metric(key, float(row[key]), now, 0) for key in VERDICT_METRICS
                   if row.get(key) not in (None, "") and not math.isnan(float(row[key]))]
        client.log_batch(job.info.run_id, metrics=metrics, tags=[RunTag(VERDICT_TAG, _text(row["verdict"]))])
    for name in (record.COMPARISON, record.REPLICATES, record.LOSS_CURVES, record.ORACLE_DRIFT):
        if (sweep_dir / name).exists():
            client.log_artifact(parent_id, str(sweep_dir / name))
    client.set_tag(parent_id, "exit_code", str(exit_code))
    # 130/143: stopped by SIGINT/SIGTERM (runner.jobs.stop_sweep); 1: a claim or a job failed
    client.set_terminated(parent_id, status="FINISHED" if exit_code == 0 else "KILLED" if exit_code > 128 else "FAILED")
