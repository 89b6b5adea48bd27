"""What a run leaves behind: metrics.csv, summary.json, params.pt.

record.py is the only writer of these files; compare.py reads only what is written here.
Every file that is presented as a result is written atomically (temp file + rename), and
metrics.csv is appended and flushed row by row, so a killed run leaves a CSV that pandas reads
up to the last completed step.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

METRICS = "metrics.csv"
SUMMARY = "summary.json"
PARAMS = "params.pt"

# Columns every metrics.csv starts with; loss components and extras follow.
BASE_COLUMNS = ("step", "loss", "grad_norm", "param_sum", "time_s")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file, then rename: readers see the old file or the new one, never
    half of one, even if the process is killed. (No fsync: that guards against power loss, not
    against a killed process, and costs milliseconds per write; checkpoints do fsync.)"""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON; write them as strings pandas and humans both read."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> None:
    text = json.dumps(_json_safe(dict(summary)), indent=2, sort_keys=False)
    atomic_write_bytes(Path(run_dir) / SUMMARY, (text + "\n").encode())


def read_summary(run_dir: Path) -> dict:
    with open(Path(run_dir) / SUMMARY) as f:
        return json.load(f)


GRADIENT_FLOW = "gradient_flow.csv"


def write_table(run_dir: Path, name: str, rows: list) -> None:
    """A small CSV written whole and atomically (e.g. gradient_flow.csv)."""
    import io

    if not rows:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _csv_value(v) for k, v in row.items()} for row in rows)
    atomic_write_bytes(Path(run_dir) / name, buffer.getvalue().encode())


def named_parameters_in_order(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return sorted(model.named_parameters(), key=lambda item: item[0])


def param_sum(model: torch.nn.Module) -> float:
    """The checksum the gradient-accumulation answer prints: sum of per-parameter sums."""
    return sum(p.detach().sum().item() for p in model.parameters())


def param_sha256(model: torch.nn.Module) -> str:
    """Bit-exact hash of the parameters alone, in name order (names, dtypes and shapes included)."""
    digest = hashlib.sha256()
    for name, p in named_parameters_in_order(model):
        t = p.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def write_params(run_dir: Path, model: torch.nn.Module) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path = Path(run_dir) / PARAMS
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / PARAMS, map_location="cpu", weights_only=True)


class MetricsWriter:
    """Appends one row per optimizer step to metrics.csv and flushes after each batch of rows."""

    def __init__(self, run_dir: Path, extra_columns: Iterable[str] = (), append: bool = False):
        self.path = Path(run_dir) / METRICS
        self.columns = list(BASE_COLUMNS) + [c for c in extra_columns if c not in BASE_COLUMNS]
        exists = append and self.path.exists()
        self._file = open(self.path, "a" if exists else "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="ignore",
                                      lineterminator="\n")
        if not exists:
            self._writer.writeheader()
            self._file.flush()

    def write_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        # Formatted by hand (numbers need no CSV quoting; this runs once per step on a CPU).
        text = "".join(",".join([_csv_field(row.get(c, "")) for c in self.columns]) + "\n" for row in rows)
        # The batch goes to the OS in one write, so a SIGKILL leaves whole rows only (row by row,
        # a buffer filling up mid-row could reach the file as half a row). flush, not fsync: a
        # killed process loses nothing the OS already has, and an fsync per step would cost
        # more than a small training step.
        self._file.write(text)
        self._file.flush()

    def position(self) -> int:
        """Bytes written so far (a checkpoint remembers where its rows end)."""
        return self._file.tell()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return value


def _csv_field(value: Any) -> str:
    """One CSV field as csv.writer writes it (floats with repr, which round-trips exactly)."""
    if type(value) is float:
        return repr(value)
    if type(value) is int or value is None:
        return "" if value is None else str(value)
    text = str(value)
    if any(ch in text for ch in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text
