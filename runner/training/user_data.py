"""The user's own data: a CSV table (pandas) or a file of tensors (torch.load, weights only).

Each reader returns (inputs, targets) as tensors and the TaskSpec they describe; runner.training.data
splits them into train and held-out parts by `seed` and draws batches in seeded order. Every
problem is a ValueError whose message names the key and what was found, and becomes one line
and exit code 2 before anything is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Tuple

import torch

from runner.training.data import TaskSpec


def _existing(path: Any) -> Path:
    if not path or str(path) == "???":
        raise ValueError("data.path is missing: expected data.path=FILE")
    found = Path(str(path)).expanduser()
    if not found.is_file():
        raise ValueError(f"data.path={path}: no such file")
    return found


def target_columns(target: Any) -> List[str]:
    """data.target as columns: one name, names separated by commas, or a list of names."""
    names = target if isinstance(target, (list, tuple)) else str(target or "").split(",")
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names or names == ["???"]:
        raise ValueError("data.target is missing: expected data.target=COLUMN (several: data.target=[A,B])")
    return names


def spec_of(inputs: torch.Tensor, targets: torch.Tensor) -> TaskSpec:
    """What a model must consume and predict for these tensors: binary 0/1 targets are labels
    (loss=bce, focal), integer class indices of one dimension are classes (loss=ce), anything else
    is a regression target (a loss=custom of yours)."""
    if not targets.is_floating_point() and targets.dim() == 1:
        return TaskSpec(tuple(inputs.shape[1:]), "multiclass", int(targets.max()) + 1)
    width = targets.shape[1] if targets.dim() > 1 else 1
    binary = bool(((targets == 0) | (targets == 1)).all())
    return TaskSpec(tuple(inputs.shape[1:]), "multilabel" if binary else "regression", width)


def read_csv(path: Any, target: Any) -> Tuple[torch.Tensor, torch.Tensor, TaskSpec]:
    """Features: every numeric column but the target(s); targets: the target column(s), (N, T)."""
    import pandas as pd

    file = _existing(path)
    try:
        table = pd.read_csv(file)
    except Exception as exc:  # not a CSV, empty, undecodable
        raise ValueError(f"data.path={path}: cannot read it as CSV ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    names = target_columns(target)
    missing = [n for n in names if n not in table.columns]
    if missing:
        raise ValueError(f"data.target={','.join(names)}: no column {missing[0]!r} in {path} "
                         f"(columns: {', '.join(map(str, table.columns[:12]))}{', ...' if len(table.columns) > 12 else ''})")
    for name in names:
        if not pd.api.types.is_numeric_dtype(table[name]):
            example = table[name].dropna().iloc[0] if table[name].notna().any() else None
            raise ValueError(f"data.target={name}: the column is not numeric (found {example!r}); "
                             "encode it as numbers (0/1 for labels)")
    features = [c for c in table.columns if c not in names and pd.api.types.is_numeric_dtype(table[c])]
    if not features:
        raise ValueError(f"data.path={path}: no numeric feature column besides data.target")
    used = table[features + names]
    if used.isna().any().any():
        column = used.columns[used.isna().any()][0]
        row = int(used[column].isna().to_numpy().nonzero()[0][0])
        raise ValueError(f"data.path={path}: NaN or an empty value in column {column!r} (row {row + 2} of the "
                         f"file, {int(used.isna().sum().sum())} in all): fill or drop them first")
    inputs = torch.tensor(used[features].to_numpy(dtype="float64"), dtype=torch.float32)
    targets = torch.tensor(used[names].to_numpy(dtype="float64"), dtype=torch.float32)
    return inputs, targets, spec_of(inputs, targets)


def read_tensors(path: Any) -> Tuple[torch.Tensor, torch.Tensor, TaskSpec]:
    """A dict {"inputs": tensor (N, ...), "targets": tensor (N, ...)} saved with torch.save."""
    file = _existing(path)
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or objects that need unpickling
        raise ValueError(f"data.path={path}: cannot load it with torch.load(weights_only=True) "
                         f"({type(exc).__name__})") from None
    if not isinstance(data, dict) or not {"inputs", "targets"} <= set(data):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"data.path={path}: expected a dict with 'inputs' and 'targets' tensors, found {found}")
    inputs, targets = data["inputs"], data["targets"]
    for name, value in (("inputs", inputs), ("targets", targets)):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            raise ValueError(f"data.path={path}: {name} must be a tensor with one row per example, "
                             f"found {type(value).__name__}")
    if len(inputs) != len(targets):
        raise ValueError(f"data.path={path}: inputs has {len(inputs)} rows but targets has {len(targets)}: "
                         "expected one target row per input row")
    for name, value in (("inputs", inputs), ("targets", targets)):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"data.path={path}: {name} holds NaN or infinite values: fill or drop them first")
    inputs = inputs.float() if inputs.is_floating_point() else inputs
    if targets.is_floating_point():
        targets = targets.float()
        targets = targets[:, None] if targets.dim() == 1 else targets
    return inputs, targets, spec_of(inputs, targets)


READERS = {"csv": lambda cfg: read_csv(cfg.path, cfg.target), "tensors": lambda cfg: read_tensors(cfg.path)}
