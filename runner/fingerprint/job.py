"""A fingerprint as the command line runs it (python -m runner -m experiment=fingerprint loop=NAME): check the
loop before anything is written, fingerprint it, record fingerprint.csv and fingerprint_weights.csv in the
job's folder, print the verdicts (a single run) or one line (a sweep's job: the sweep prints them all).

Bad input (an unknown loop, loop=custom without an importable function, a framework not installed) is one
line and exit 2; so is a loop that raises. In a sweep, a loop that raises is that job's recorded result.
"""
from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from runner.analysis import fingerprints
from runner.config.compose import config_from_omegaconf
from runner.config.schema import Config, ConfigError, validate
from runner.fingerprint.loops import Loop, LoopError, build
from runner.fingerprint.probes import DIMENSIONS, PROBES
from runner.fingerprint.session import Fingerprint, fingerprint, mode_overrides
from runner.recording import record


def chosen(cfg) -> bool:
    """Whether the composed config chooses a loop under test (loop=NAME)."""
    loop = cfg.get("loop") if hasattr(cfg, "get") else None
    return bool(loop is not None and loop.get("name"))


def check(cfg) -> Tuple[Config, Loop]:
    """The typed config and the loop it chooses; ConfigError (one line) where it cannot run."""
    config, _ = config_from_omegaconf(cfg)
    validate(config)
    try:
        return config, build(config.loop.name, config.loop._target_, config.loop.zero_stage)
    except LoopError as exc:
        raise ConfigError(str(exc)) from None


def label(loop: Loop, modes: Sequence[str]) -> str:
    """The loop column: the loop's name, and the lab's modes where they choose what it does."""
    shown = [m for m in modes if not m.startswith("seed=")] if loop.modes else []
    return " ".join([loop.name, *shown])


def _notes(loop: Loop, modes: Sequence[str]) -> List[str]:
    modes = [m for m in modes if not m.startswith("seed=")]
    if not loop.modes and modes:
        return [f"{' '.join(modes)} is ignored by loop={loop.name}: the lab's modes choose only loop=runner's"]
    if any(m.startswith("backward.accumulation=") for m in modes):
        return ["backward.accumulation is each probe's own (k = "
                f"{', '.join(str(k) for k in sorted({p.accumulation for p in PROBES.values()}))}): ignored"]
    return []


def weight_rows(name: str, result: Fingerprint) -> List[Dict[str, Any]]:
    rows = []
    for probe in result.results:
        for step, solved in enumerate(probe.steps):
            exact = probe.exact_weights(solved) if solved.micro_batches else []
            for i, (mb, weight) in enumerate(zip(solved.micro_batches, solved.weights)):
                rows.append(dict(loop=name, probe=probe.probe.name, step=step, micro_batch=i + 1, epoch=mb.epoch,
                                 index=mb.index, rows=mb.rows, count=mb.count, weight=float(weight),
                                 exact_weight=float(exact[i]), residual=solved.residual))
    return rows


def error_rows(name: str, message: str) -> List[Dict[str, Any]]:
    return [dict(loop=name, version="", probe="", dimension=d, observed=f"error: {message}", exact=False, evidence="")
            for d in DIMENSIONS]


def run(cfg, run_dir: Path, overrides: Sequence[str], multirun: bool, checked: Optional[Tuple[Config, Loop]] = None) -> int:
    """Fingerprint the loop `cfg` chooses into run_dir; the exit code (0; 2 for bad input or a loop that raised)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = str(cfg.loop.name)
    try:
        config, loop = checked or check(cfg)
        modes = mode_overrides(overrides)
        name = label(loop, modes)
        for note in _notes(loop, modes):
            print(f"note: {note}", file=sys.stderr)
        result = fingerprint(loop, modes, seed=config.seed)
    except (ConfigError, LoopError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if multirun:  # the job's result: the sweep goes on and its exit code says so
            record.write_fingerprint(run_dir, error_rows(name, str(exc)), [])
        return 2
    rows = [dict(asdict(row), loop=name) for row in result.rows()]
    record.write_fingerprint(run_dir, rows, weight_rows(name, result))
    if multirun:
        wrong = sorted({r["dimension"] for r in rows if not r["exact"]}, key=DIMENSIONS.index)
        print(f"{name}: " + ("exact" if not wrong else "not exact in " + ", ".join(wrong)))
        return 0
    version = f" ({result.version})" if result.version else ""
    return fingerprints.summarise([run_dir], run_dir, f"fingerprint of loop={name}{version}")
