"""The record format: every file a run or a sweep leaves, the summary's keys, and how they are written.

record.py is the only module that spells a record file name or a summary key; every other
module reads and writes records through it. Files presented as results are written atomically
(`atomic_path`: a temporary file renamed over the target), so a reader sees the old file or the
new one, never half of one; metrics.csv is appended and flushed batch by batch, so a killed run
leaves a CSV that pandas reads up to the last completed step.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Union

import torch

# Per run
METRICS = "metrics.csv"
SUMMARY = "summary.json"
PARAMS = "params.pt"
EMA_WEIGHTS = "ema_weights.pt"  # trainer.ema: the averaged model's state_dict (parameters and buffers)
FIRST_GRAD = "first_grad.pt"  # parameter name -> the first optimizer step's gradient (trainer.first_grad)
CHECKPOINT = "checkpoint.pt"
GRADIENT_FLOW = "gradient_flow.csv"
TENSORBOARD_DIR = "tensorboard"  # trainer.loggers=[...,tensorboard]: the run's SummaryWriter folder
# trainer.loggers=[...,mlflow] without trainer.mlflow_uri: the SQLite store and the artifacts' folder, in the
# folder above a run's folder (a sweep's jobs: above the sweep's folder), shared by the runs kept there
MLFLOW_STORE = "mlflow.db"
MLFLOW_ARTIFACTS = "mlflow-artifacts"
# Per sweep
COMPARISON = "comparison.csv"
REPLICATES = "replicates.csv"  # a sweep crossing seeds: one row per configuration without the seed
LOSS_CURVES = "loss_curves.png"
ORACLE_DRIFT = "grad_diff_to_oracle.png"  # first-gradient error against the float64 oracle, per accumulation
# A sweep's pictures, in the order a report shows them.
SWEEP_PICTURES = (LOSS_CURVES, ORACLE_DRIFT)
SWEEP_MARKER = "multirun.yaml"  # what Hydra writes in every sweep folder
# A fingerprint (runner.fingerprint): one row per probe and the dimension it names, in the job's folder
# and, for a sweep, all jobs' rows in the sweep's; each step's micro-batch weights; their picture.
FINGERPRINT = "fingerprint.csv"
FINGERPRINT_COLUMNS = ("loop", "version", "probe", "dimension", "observed", "exact", "evidence")
FINGERPRINT_WEIGHTS = "fingerprint_weights.csv"
FINGERPRINT_WEIGHT_COLUMNS = ("loop", "probe", "step", "micro_batch", "epoch", "index", "rows", "count", "weight",
                              "exact_weight", "residual")
FINGERPRINT_PICTURE = "fingerprint.png"

# Columns every metrics.csv starts with; loss components and extras follow.
BASE_COLUMNS = ("step", "loss", "grad_norm", "param_sum", "time_s")
MEMORY_COLUMN = "peak_saved_bytes"  # on the steps the saved-tensor meter measured
LOADER_COLUMNS = ("epoch", "window_size")  # loader mode (data.micro_batch_size): epoch, examples in the window
LR_COLUMN = "lr"  # with optim.scheduler: the learning rate of the step
TOKENS_COLUMN = "tokens"  # loss=lm: the scored (non-ignored) tokens of the step, an integer
GRAD_SCALE_COLUMN = "grad_scale"  # trainer.autocast=fp16: the loss scale this step's backwards used
STEP_SKIPPED_COLUMN = "step_skipped"  # trainer.autocast=fp16: 1 where GradScaler skipped the step (overflow)
# model=moe with loss.aux_weight > 0: the spread of the expert load, std / mean over the experts of the
# step's scored tokens per expert (0 = perfectly even); the load-balancing term itself is loss_aux
EXPERT_LOAD_CV_COLUMN = "expert_load_cv"
INTEGER_COLUMNS = (TOKENS_COLUMN, STEP_SKIPPED_COLUMN)  # counts, written as integers
ADDITIVE_COLUMNS = (TOKENS_COLUMN,)  # counts over the batch: several ranks' counts add up
LOSS_PART_PREFIX = "loss_"  # loss_<name>: each named part of a multi-part loss
GRAD_COS_PREFIX = "grad_cos_"  # grad_cos_<a>_<b>: backward=separate, two tasks' gradient cosine on the trunk
METRICS_COLUMNS = (*BASE_COLUMNS, MEMORY_COLUMN, *LOADER_COLUMNS, LR_COLUMN, TOKENS_COLUMN, GRAD_SCALE_COLUMN,
                   STEP_SKIPPED_COLUMN, EXPERT_LOAD_CV_COLUMN)


def loss_part_column(part: str) -> str:
    return LOSS_PART_PREFIX + part


def grad_cos_column(a: str, b: str) -> str:
    return f"{GRAD_COS_PREFIX}{a}_{b}"


def is_metrics_column(name: str) -> bool:
    """Is `name` a metrics.csv column declared here (by name, or by its prefix)?"""
    return name in METRICS_COLUMNS or name.startswith((LOSS_PART_PREFIX, GRAD_COS_PREFIX))


@dataclass
class Summary:
    """summary.json: the outcome of one run, its costs and what it was (JSON keys = field names)."""

    status: str = "running"  # running | ok | error | diverged | interrupted
    error: Optional[str] = None
    hint: Optional[str] = None
    steps_done: int = 0
    final_loss: Optional[float] = None
    eval_metric: Optional[str] = None  # the headline held-out metric's name, and its value
    eval_value: Optional[float] = None
    eval: Dict[str, float] = field(default_factory=dict)
    param_sum: Optional[float] = None  # the sum of all parameters, as the accumulation answer prints it
    param_sha256: Optional[str] = None  # bit-exact hash of the parameters, in name order
    param_names: List[str] = field(default_factory=list)
    # trainer.ema: the same checksums of the averaged weights, and their headline held-out metric.
    ema_param_sum: Optional[float] = None
    ema_param_sha256: Optional[str] = None
    ema_eval_value: Optional[float] = None
    peak_saved_bytes: Optional[int] = None  # the saved-tensor meter's peak (runner.execution.memory)
    cuda_max_memory_allocated: Optional[int] = None
    wall_s: Optional[float] = None
    time_per_step_s: Optional[float] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    torch_version: str = torch.__version__
    seed: Optional[int] = None
    accumulation: Optional[int] = None
    # Processes (trainer.processes / torchrun): how many ranks trained and how (trainer.parallel), the
    # communication rounds per optimizer step the engine's own hook counted, and whether every rank
    # ended bit-identical.
    processes: int = 1
    parallel: Optional[str] = None  # none | ddp | fsdp (runner.execution.parallel)
    allreduce_calls_per_step: Optional[float] = None  # ddp
    reduce_scatter_calls_per_step: Optional[float] = None  # fsdp: rounds of a reduce-scatter per sharded block
    # ddp, fsdp: the most bytes of gradients one rank held after a micro-batch of the first step
    peak_grad_bytes: Optional[int] = None
    ranks_agree: Optional[bool] = None
    params_without_grad: List[str] = field(default_factory=list)
    # The coupling probe (runner.training.checks): does an example's output depend on another example's
    # input, or does the loss fail the accumulation identity (None: not tested), does the forward draw
    # random numbers, and which modules do it ("bn1: BatchNorm1d", "loss: InfoNCE").
    batch_coupled: Optional[bool] = None
    stochastic: Optional[bool] = None
    coupling_modules: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    features: Optional[List[str]] = None  # data=csv: the table's columns the model was fed, in order
    # model=custom under a built-in loss: "logits" where the model returned a mapping (a Hugging Face
    # ModelOutput) and the loss read its logits entry; None where it returned the tensor itself
    outputs_from: Optional[str] = None
    run_dir: Optional[str] = None
    resumed_from_step: Optional[int] = None
    diverged_at_step: Optional[int] = None
    training_id: Optional[str] = None  # a hash of the keys that define the training (runner.recording.checkpoint)
    # The same, with what this run's strategy and process count ignore set aside: two jobs of a sweep
    # with one used_config_id are one training, which runs once (runner.cli, trainer.rerun).
    used_config_id: Optional[str] = None
    reused_from: Optional[str] = None  # the job folder whose records this job's are (not trained again)
    gradient_flow: List[Dict[str, Any]] = field(default_factory=list)
    choices: Dict[str, Any] = field(default_factory=dict)  # group -> option (model=mlp, ...)
    overrides: List[str] = field(default_factory=list)  # as typed on the command line
    config: Dict[str, Any] = field(default_factory=dict)  # the full composed config

    def expected_difference(self) -> Optional[str]:
        """Why this run's micro-batches cannot give the full batch's result, or None."""
        return expected_difference(self.batch_coupled, self.stochastic, self.coupling_modules)

    def metric(self, name: str) -> Optional[float]:
        """A numeric summary key by name (claims select one, e.g. peak_saved_bytes)."""
        value = getattr(self, name, None) if name in SUMMARY_KEYS else None
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def expected_difference(batch_coupled: Optional[bool], stochastic: Optional[bool], modules: List[str]) -> Optional[str]:
    """"batch-coupled: bn1", "batch-coupled: loss InfoNCE", "stochastic: drop", both, or None: the
    coupling probe's and the loss identity check's findings as a reason."""
    causes = [cause for cause, present in (("batch-coupled", batch_coupled), ("stochastic", stochastic)) if present]
    # A module by its name (bn1), the loss by its class (the identity check's "loss: InfoNCE").
    named = ", ".join(m.replace(": ", " ", 1) if m.startswith("loss: ") else m.split(":")[0] for m in modules)
    named = named or "unnamed modules"
    return f"{' and '.join(causes)}: {named}" if causes else None


SUMMARY_KEYS = tuple(f.name for f in fields(Summary))
# Summary keys a comparison row carries, in order (runner.compare adds the verdict's columns).
COMPARED_KEYS = ("status", "final_loss", "eval_metric", "eval_value", "param_sum", "param_sha256",
                 "peak_saved_bytes", "time_per_step_s", "steps_done", "error", "reused_from", "ema_eval_value",
                 "ema_param_sum")
# comparison.csv: the config keys that vary, then these columns; the terminal shows SHOWN, in order.
SHOWN_COLUMNS = ("status", "final_loss", "eval_value", "param_sum", "param_sha256", "max_abs_diff", "grad_rel_diff",
                 "verdict", "diff_to_oracle", "grad_diff_to_oracle", "ema_eval_value", "ema_max_abs_diff",
                 "peak_saved_bytes", "time_per_step_s", "error")
# Shown only where a run keeps a moving average of its weights (trainer.ema).
EMA_COLUMNS = ("ema_eval_value", "ema_max_abs_diff")
ORACLE_COLUMNS = ("diff_to_oracle", "grad_diff_to_oracle")  # against a float64 run of the reference's config
HIDDEN_COLUMNS = ("eval_metric", "tolerance", "steps_done", "config_key", "sweep", "run_dir", "reused_from",
                  "ema_param_sum")
# The rows appended while a sweep runs, before its verdicts exist.
JOB_COLUMNS = ("job", "overrides", *COMPARED_KEYS, "run_dir")


@contextmanager
def atomic_path(path: Path, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed over `path` when the block succeeds.

    Readers see the old file or the new one, never half of one, even if the process is killed.
    durable=True also fsyncs before the rename (checkpoints: they must survive a power loss; the
    other records are cheap to redo and skip the milliseconds an fsync costs).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # keeps the suffix: savefig reads it
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON; write them as strings pandas and humans both read."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_summary(run_dir: Path, summary: Summary) -> None:
    text = json.dumps(_json_safe(asdict(summary)), indent=2)
    atomic_write_bytes(Path(run_dir) / SUMMARY, (text + "\n").encode())


def has_summary(run_dir: Path) -> bool:
    return (Path(run_dir) / SUMMARY).exists()


def read_summary(run_dir: Path) -> Summary:
    """summary.json as a Summary; keys this version does not know are left out."""
    with open(Path(run_dir) / SUMMARY) as f:
        data = json.load(f)
    return Summary(**{k: v for k, v in data.items() if k in SUMMARY_KEYS})


def summary_files(base: Path) -> List[Path]:
    """Every summary.json at or under `base`."""
    base = Path(base)
    return [base / SUMMARY] if has_summary(base) else list(base.rglob(SUMMARY))


def holds_a_run(run_dir: Path) -> bool:
    return has_summary(run_dir) or (Path(run_dir) / METRICS).exists()


def is_sweep(folder: Path) -> bool:
    return (Path(folder) / SWEEP_MARKER).exists()


def sweep_of(run_dir: Path) -> Optional[Path]:
    """The sweep folder a job's folder belongs to, or None for a single run."""
    return next((p for p in Path(run_dir).resolve().parents if is_sweep(p)), None)


def sweeps_under(base: Path) -> List[Path]:
    """Sweep folders at or under `base`, in name order."""
    base = Path(base)
    return [base] if is_sweep(base) else sorted(p.parent for p in base.rglob(SWEEP_MARKER))


def has_sweep_jobs(sweep_dir: Path) -> bool:
    return any(Path(sweep_dir).glob(f"*/{SUMMARY}"))


def _csv_field(value: Any) -> str:
    """One CSV field as csv.writer writes it (floats with repr, which round-trips exactly)."""
    if type(value) is float:
        return repr(value)
    if value is None:
        return ""
    if type(value) is int:
        return str(value)
    text = str(value)
    if any(ch in text for ch in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def csv_text(rows: Iterable[Mapping[str, Any]], columns: List[str], header: bool = True) -> str:
    lines = [",".join(_csv_field(c) for c in columns)] if header else []
    lines += [",".join(_csv_field(row.get(c)) for c in columns) for row in rows]
    return "".join(line + "\n" for line in lines)


def write_gradient_flow(run_dir: Path, rows: List[Dict[str, Any]]) -> None:
    if rows:
        atomic_write_bytes(Path(run_dir) / GRADIENT_FLOW, csv_text(rows, list(rows[0])).encode())


Parameters = Union[torch.nn.Module, Mapping[str, torch.Tensor]]  # a model, or its parameters by name


def named_parameters_in_order(params: Parameters) -> list[tuple[str, torch.Tensor]]:
    named = params.named_parameters() if isinstance(params, torch.nn.Module) else params.items()
    return sorted(named, key=lambda item: item[0])


def param_sum(params: Parameters) -> float:
    """The checksum the gradient-accumulation answer prints: sum of per-parameter sums."""
    tensors = params.parameters() if isinstance(params, torch.nn.Module) else params.values()
    return sum(p.detach().sum().item() for p in tensors)


def param_sha256(params: Parameters) -> str:
    """Bit-exact hash of the parameters alone, in name order (names, dtypes and shapes included)."""
    digest = hashlib.sha256()
    for name, p in named_parameters_in_order(params):
        t = p.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def write_params(run_dir: Path, state: Mapping[str, torch.Tensor]) -> None:
    """params.pt: a state_dict (parameters and buffers), as full tensors."""
    state = {k: v.detach().cpu() for k, v in state.items()}
    with atomic_path(Path(run_dir) / PARAMS) as tmp:
        torch.save(state, tmp)


def load_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / PARAMS, map_location="cpu", weights_only=True)


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        torch.save({name: t.detach().cpu() for name, t in tensors.items()}, tmp)


def _load_tensors(path: Path) -> Optional[Dict[str, torch.Tensor]]:
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def write_ema_weights(run_dir: Path, state: Mapping[str, torch.Tensor]) -> None:
    """ema_weights.pt: the averaged model's state_dict (trainer.ema), named as params.pt's."""
    _save_tensors(Path(run_dir) / EMA_WEIGHTS, state)


def load_ema_weights(run_dir: Path) -> Optional[dict[str, torch.Tensor]]:
    """ema_weights.pt, or None where the run kept no average."""
    return _load_tensors(Path(run_dir) / EMA_WEIGHTS)


def write_first_grad(run_dir: Path, grads: Dict[str, torch.Tensor]) -> None:
    _save_tensors(Path(run_dir) / FIRST_GRAD, grads)


def load_first_grad(run_dir: Path) -> Optional[Dict[str, torch.Tensor]]:
    """first_grad.pt, or None where the run wrote none (trainer.first_grad=false, an early error)."""
    return _load_tensors(Path(run_dir) / FIRST_GRAD)


# ---- checkpoints (their content is runner.recording.checkpoint's; the file is this module's) ---------------

def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT


def write_checkpoint(run_dir: Path, state: Dict[str, Any]) -> None:
    with atomic_path(checkpoint_path(run_dir), durable=True) as tmp:
        torch.save(state, tmp)


def copy_records(run_dir: Path, to: Path) -> None:
    """A finished run's per-run files (not its summary) copied to `to`: a job equal to it."""
    import shutil

    for name in (METRICS, PARAMS, EMA_WEIGHTS, FIRST_GRAD, GRADIENT_FLOW):
        if (Path(run_dir) / name).exists():
            shutil.copyfile(Path(run_dir) / name, Path(to) / name)


def copy_resumable(run_dir: Path, to: Path) -> None:
    """What a resume reads besides the checkpoint (metrics.csv, summary.json), copied to `to`."""
    import shutil

    for name in (METRICS, SUMMARY):
        if (Path(run_dir) / name).exists():
            shutil.copyfile(Path(run_dir) / name, Path(to) / name)


def metrics_size(run_dir: Path) -> int:
    path = Path(run_dir) / METRICS
    return path.stat().st_size if path.exists() else 0


def truncate_metrics(run_dir: Path, size: int) -> None:
    """Drop the rows written after `size` bytes (a resumed run writes them again)."""
    if metrics_size(run_dir) > size:
        with open(Path(run_dir) / METRICS, "r+b") as f:
            f.truncate(size)


def read_metrics(run_dir: Path):
    """metrics.csv as a pandas DataFrame, or None when the run wrote none (pandas imported here)."""
    import pandas as pd

    path = Path(run_dir) / METRICS
    return pd.read_csv(path) if path.exists() else None


def read_curves(run_dir: Path) -> Dict[str, Any]:
    """The loss and param_sum per step (pandas Series indexed by step) from one read of
    metrics.csv; {} when the run wrote no rows."""
    metrics = read_metrics(run_dir)
    step, loss, _, param_sum, _ = BASE_COLUMNS
    if metrics is None or not len(metrics):
        return {}
    metrics = metrics.set_index(step)
    return {column: metrics[column] for column in (loss, param_sum) if column in metrics}


class MetricsWriter:
    """Appends one row per optimizer step to metrics.csv and flushes after each batch of rows."""

    def __init__(self, run_dir: Path, extra_columns: Iterable[str] = (), append: bool = False):
        self.path = Path(run_dir) / METRICS
        self.columns = list(BASE_COLUMNS) + [c for c in extra_columns if c not in BASE_COLUMNS]
        exists = append and self.path.exists()
        self._file = open(self.path, "a" if exists else "w", newline="")
        if not exists:
            self._file.write(csv_text([], self.columns))
            self._file.flush()

    def write_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        # The batch goes to the OS in one write, so a SIGKILL leaves whole rows only (row by row,
        # a buffer filling up mid-row could reach the file as half a row). flush, not fsync: a
        # killed process loses nothing the OS already has, and an fsync per step would cost
        # more than a small training step.
        self._file.write(csv_text(rows, self.columns, header=False))
        self._file.flush()

    def position(self) -> int:
        """Bytes written so far (a checkpoint remembers where its rows end)."""
        return self._file.tell()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


# ---- sweeps --------------------------------------------------------------------------------------

def read_comparison_rows(sweep_dir: Path) -> List[Dict[str, str]]:
    path = Path(sweep_dir) / COMPARISON
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_comparison_row(sweep_dir: Path, columns: List[str], row: Mapping[str, Any]) -> None:
    """Add one job's row to comparison.csv, rewriting the file atomically (a sweep has few rows)."""
    rows = read_comparison_rows(sweep_dir) + [dict(row)]
    atomic_write_bytes(Path(sweep_dir) / COMPARISON, csv_text(rows, columns).encode())


def write_comparison(sweep_dir: Path, table) -> None:
    """The sweep's full comparison (a pandas DataFrame)."""
    write_table_csv(table, Path(sweep_dir) / COMPARISON)


def write_replicates(sweep_dir: Path, table) -> None:
    """Per configuration (the seed set aside): n, mean, std, min and max of the compared figures,
    and its impact against the reference configuration (a pandas DataFrame)."""
    write_table_csv(table, Path(sweep_dir) / REPLICATES)


def write_table_csv(table, path: Path) -> None:
    atomic_write_bytes(Path(path), table.to_csv(index=False).encode())


def save_figure(figure, sweep_dir: Path, dpi: int = 110, name: str = LOSS_CURVES) -> Path:
    path = Path(sweep_dir) / name
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi)
    return path


def write_fingerprint(folder: Path, rows: List[Mapping[str, Any]], weights: List[Mapping[str, Any]]) -> None:
    """A fingerprint's rows and its steps' weights; the rows file is written last: it marks a finished one."""
    atomic_write_bytes(Path(folder) / FINGERPRINT_WEIGHTS,
                       csv_text(weights, list(FINGERPRINT_WEIGHT_COLUMNS)).encode())
    atomic_write_bytes(Path(folder) / FINGERPRINT, csv_text(rows, list(FINGERPRINT_COLUMNS)).encode())


def fingerprint_folders(base: Path) -> List[Path]:
    """The folders under `base` (a sweep's jobs) that hold a finished fingerprint, in job order."""
    found = [path.parent for path in Path(base).glob(f"*/{FINGERPRINT}")]
    return sorted(found, key=lambda p: (int(p.name.split("_")[0]) if p.name.split("_")[0].isdigit() else 0, p.name))


def read_fingerprint(folder: Path):
    """(rows, weights) of a fingerprint folder, as pandas DataFrames."""
    import pandas as pd

    rows = pd.read_csv(Path(folder) / FINGERPRINT, keep_default_na=False)
    path = Path(folder) / FINGERPRINT_WEIGHTS
    return rows, pd.read_csv(path) if path.exists() else pd.DataFrame(columns=list(FINGERPRINT_WEIGHT_COLUMNS))
