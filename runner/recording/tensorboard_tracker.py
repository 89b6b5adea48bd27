"""trainer.loggers=[csv,tensorboard]: torch.utils.tensorboard's SummaryWriter in the run's folder, a
subscriber of the loop's events (runner.recording.events).

Per-step scalars (one per column per step, at the row's optimizer step, one event per step), and at the end the run's
hparams (its config, flattened, scalar values only, and its status) with the summary's figures
as the HParams metrics (final/final_loss, ...); the sweep's end adds each job's verdict (max_abs_diff, verdict_matches: 1 where the
verdict is reference, identical or equivalent, 0 where it differs: `sweep_end`) to its folder, so that
`tensorboard --logdir <sweep folder>` compares the jobs in its HParams table. The hparams summary
is written into the run's own folder, not add_hparams' timestamped subfolder: one TensorBoard run per job.
https://pytorch.org/docs/stable/tensorboard.html#torch.utils.tensorboard.writer.SummaryWriter.add_hparams
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

from runner.recording import record
from runner.recording.events import RunStart, Subscriber, number, step_scalars
from runner.recording.record import Summary

# The HParams table's metrics: the summary's figures, then the verdict's (a sweep's jobs).
FINAL_METRICS = ("final_loss", "eval_value", "param_sum", "peak_saved_bytes", "wall_s")
VERDICT_METRICS = ("max_abs_diff", "verdict_matches")
MATCHING_VERDICTS = ("reference", "identical", "equivalent")


def log_dir(run_dir: Path) -> Path:
    return Path(run_dir) / record.TENSORBOARD_DIR


class TensorBoardTracker(Subscriber):
    requires = "tensorboard"
    batched = True

    def __init__(self, run_dir: Path, config: Any):
        self.run_dir = Path(run_dir)
        self.in_sweep = record.sweep_of(run_dir) is not None

    def run_start(self, run: RunStart) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.config = run.summary.config
        self.writer = SummaryWriter(log_dir=str(log_dir(self.run_dir)))

    def rows(self, rows: List[Dict[str, Any]]) -> None:
        """One event per row, holding each column as the scalar add_scalar would write (a simple_value
        under the column's tag): a third of the cost of an event per column."""
        from tensorboard.compat.proto.summary_pb2 import Summary as Scalars

        for step, scalars in map(step_scalars, rows):
            values = [Scalars.Value(tag=column, simple_value=value) for column, value in scalars]
            self.writer.file_writer.add_summary(Scalars(value=values), step)
        self.writer.flush()

    def close(self) -> None:
        """The writer stays open for the hparams the summary's figures complete (`run_end`)."""

    def run_end(self, summary: Summary, failed: bool) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        config = dict(_scalars(self.config), status="failed" if failed else summary.status)
        figures = {f"final/{key}": number(getattr(summary, key)) for key in FINAL_METRICS}
        figures = {key: value for key, value in figures.items() if value is not None}
        declared = dict(figures)
        if self.in_sweep:  # declared now, written by the sweep's end (sweep_end) once verdicts exist
            declared.update({f"verdict/{key}": math.nan for key in VERDICT_METRICS})
        # add_hparams' own steps, in the run's folder instead of a timestamped one beside it
        for part in hparams_summaries(config, declared):
            self.writer.file_writer.add_summary(part, summary.steps_done)
        for key, value in figures.items():
            self.writer.add_scalar(key, value, summary.steps_done)
        self.writer.close()

    @classmethod
    def sweep_end(cls, sweep_dir: Path, config: Any, exit_code: int) -> None:
        finish_sweep(sweep_dir)


def _scalars(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """The config flattened (optim.lr), keeping the numbers, strings and booleans HParams can show."""
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_scalars(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix + key] = value
        elif value is None:
            flat[prefix + key] = "null"
    return flat


def finish_sweep(sweep_dir: Path) -> None:
    """Each job's verdict against the reference, as the HParams metrics its hparams declared."""
    from torch.utils.tensorboard import SummaryWriter

    for row in record.read_comparison_rows(sweep_dir):
        run_dir = Path(row.get("run_dir", ""))
        if not row.get("verdict") or not log_dir(run_dir).is_dir():
            continue
        matches = 1.0 if row["verdict"] in MATCHING_VERDICTS else 0.0 if row["verdict"].startswith("differs") \
            else math.nan
        figures = {"max_abs_diff": float(row["max_abs_diff"]) if row.get("max_abs_diff") else math.nan,
                   "verdict_matches": matches}
        with SummaryWriter(log_dir=str(log_dir(run_dir))) as writer:
            for key in VERDICT_METRICS:
                writer.add_scalar(f"verdict/{key}", figures[key], 0)
