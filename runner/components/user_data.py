"""The user's own data: a CSV table (pandas), a file of tensors (torch.load, weights only), or UTF-8 text
(paragraphs as byte sequences).

Each reader returns (inputs, targets) as tensors and the TaskSpec they describe; runner.components.data
splits them into train and held-out parts by `seed` and draws batches in seeded order. Every
problem is a ValueError whose message names the key and what was found, and becomes one line
and exit code 2 before anything is written.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Tuple

import torch

from runner.components.data import IGNORE_INDEX, TaskSpec

BYTE_VOCAB = 256  # data=text: a token is a byte of the UTF-8 text, no tokenizer


@dataclass
class Columns:
    """What a table gave the run: its feature columns (the summary's `features`), and a warning line
    naming the non-numeric columns left out of them (issue 19: one such cell used to drop its column
    silently, and the run failed later with "mat1 and mat2 shapes cannot be multiplied")."""

    features: List[str]
    warnings: List[str] = field(default_factory=list)


def _existing(path: Any) -> Path:
    if not path or str(path) == "???":
        raise ValueError("data.path is missing: expected data.path=FILE")
    found = Path(str(path)).expanduser()
    if not found.is_file():
        raise ValueError(f"data.path={path}: no such file")
    return found


def column_names(value: Any) -> List[str]:
    """One name, names separated by commas, or a list of names (data.target, data.features)."""
    names = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
    return [str(n).strip() for n in names if str(n).strip()]


def target_columns(target: Any) -> List[str]:
    """data.target as columns: one name, names separated by commas, or a list of names."""
    names = column_names(target)
    if not names or names == ["???"]:
        raise ValueError("data.target is missing: expected data.target=COLUMN (several: data.target=[A,B])")
    return names


def first_non_numeric(column) -> Optional[Tuple[int, Any]]:
    """(row of the file, cell) of a column's first cell that is not a number, or None: the header is row 1."""
    import pandas as pd

    bad = pd.to_numeric(column, errors="coerce").isna() & column.notna()
    if not bad.any():
        return None
    index = int(bad.to_numpy().nonzero()[0][0])
    return index + 2, column.iloc[index]


def _listed(columns) -> str:
    return f"{', '.join(map(str, columns[:12]))}{', ...' if len(columns) > 12 else ''}"


def feature_columns(table, path: Any, features: Any, targets: List[str]) -> Columns:
    """data.features as given, each numeric (else ValueError naming the key), or every numeric column but
    the targets, with the non-numeric ones named in one warning line (column, first bad cell, its row)."""
    import pandas as pd

    chosen = column_names(features)
    if chosen:
        for name in chosen:
            if name not in table.columns:
                raise ValueError(f"data.features={','.join(chosen)}: no column {name!r} in {path} "
                                 f"(columns: {_listed(table.columns)})")
            if name in targets:
                raise ValueError(f"data.features={','.join(chosen)}: {name!r} is data.target: expected other columns")
            bad = None if pd.api.types.is_numeric_dtype(table[name]) else first_non_numeric(table[name])
            if bad:
                raise ValueError(f"data.features={','.join(chosen)}: column {name!r} is not numeric (row {bad[0]} "
                                 f"of the file holds {bad[1]!r}): fix the cell or leave the column out")
        return Columns(chosen)
    candidates = [c for c in table.columns if c not in targets]
    numeric = [c for c in candidates if pd.api.types.is_numeric_dtype(table[c])]
    left_out = [(c, first_non_numeric(table[c])) for c in candidates if c not in numeric]
    named = "; ".join(f"{c!r} (row {bad[0]}: {bad[1]!r})" if bad else repr(c) for c, bad in left_out)
    if not numeric:
        raise ValueError(f"data.path={path}: no numeric feature column besides data.target"
                         + (f" (not numeric: {named})" if named else ""))
    warnings = [f"data.path={path}: {len(left_out)} non-numeric column(s) left out of the features: {named}; "
                "pick the columns with data.features=[A,B]"] if left_out else []
    return Columns(numeric, warnings)


def spec_of(inputs: torch.Tensor, targets: torch.Tensor) -> TaskSpec:
    """What a model must consume and predict for these tensors: binary 0/1 targets are labels
    (loss=bce, focal), integer class indices of one dimension are classes (loss=ce), anything else
    is a regression target (a loss=custom of yours)."""
    if not targets.is_floating_point() and targets.dim() == 1:
        return TaskSpec(tuple(inputs.shape[1:]), "multiclass", int(targets.max()) + 1)
    width = targets.shape[1] if targets.dim() > 1 else 1
    binary = bool(((targets == 0) | (targets == 1)).all())
    return TaskSpec(tuple(inputs.shape[1:]), "multilabel" if binary else "regression", width)


def read_csv(path: Any, target: Any, features: Any = None) -> Tuple[torch.Tensor, torch.Tensor, TaskSpec, Columns]:
    """Features: data.features, or every numeric column but the target(s); targets: the target column(s), (N, T)."""
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
                         f"(columns: {_listed(table.columns)})")
    for name in names:
        if not pd.api.types.is_numeric_dtype(table[name]):
            example = table[name].dropna().iloc[0] if table[name].notna().any() else None
            raise ValueError(f"data.target={name}: the column is not numeric (found {example!r}); "
                             "encode it as numbers (0/1 for labels)")
    columns = feature_columns(table, path, features, names)
    features = columns.features
    used = table[features + names]
    if used.isna().any().any():
        column = used.columns[used.isna().any()][0]
        row = int(used[column].isna().to_numpy().nonzero()[0][0])
        raise ValueError(f"data.path={path}: NaN or an empty value in column {column!r} (row {row + 2} of the "
                         f"file, {int(used.isna().sum().sum())} in all): fill or drop them first")
    inputs = torch.tensor(used[features].to_numpy(dtype="float64"), dtype=torch.float32)
    targets = torch.tensor(used[names].to_numpy(dtype="float64"), dtype=torch.float32)
    return inputs, targets, spec_of(inputs, targets), columns


def read_tensors(path: Any) -> Tuple[torch.Tensor, torch.Tensor, TaskSpec, None]:
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
    return inputs, targets, spec_of(inputs, targets), None


def paragraphs(text: str) -> List[str]:
    """Blank-line separated paragraphs, without their surrounding whitespace."""
    return [p.strip() for p in re.split(r"\n[ \t\r\f\v]*\n", text) if p.strip()]


def read_text(path: Any, max_length: int, min_length: int = 2) -> Tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 text as next-token rows, laid out as data=seq's (runner.components.data.markov_sequences): one
    sequence per paragraph, its bytes as tokens (0..255), cut at max_length bytes, so lengths vary as real
    text does; paragraphs shorter than min_length bytes are left out. Inputs are right-padded with 0 to
    max_length - 1, labels are the next bytes with IGNORE_INDEX at padding."""
    file = _existing(path)
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"data.path={path}: not UTF-8 text (byte {exc.start} of the file): "
                         "expected a UTF-8 text file") from None
    rows = [p.encode("utf-8")[:max_length] for p in paragraphs(text)]
    rows = [r for r in rows if len(r) >= min_length]
    if not rows:
        raise ValueError(f"data.path={path}: no paragraph of at least data.min_length={min_length} bytes "
                         "(paragraphs are separated by blank lines)")
    tokens = torch.zeros(len(rows), max_length, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.frombuffer(bytearray(row), dtype=torch.uint8).long()
    position = torch.arange(1, max_length)[None, :]
    labels = tokens[:, 1:].masked_fill(position >= lengths[:, None], IGNORE_INDEX)
    return tokens[:, :-1].contiguous(), labels.contiguous()

