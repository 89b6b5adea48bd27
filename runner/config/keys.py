"""How a config key is declared: its default, its meaning, its role and what values it allows.

Every key of the schema (runner.config.schema) and every backward.* option
(runner.config.backward_options) is a dataclass field built by `key()`. Its metadata is the one
source of what the key means: `validate()` enforces its `Allowed` range, and the key reference
(`python -m runner --help`, docs/reference.md; runner.config.reference) prints its help, default,
allowed values and role. A `Choice` enum carries the meaning of each of its values the same way.

Nothing here imports torch or Hydra.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from enum import Enum
from typing import Any, Callable, Optional


class Role(str, Enum):
    """What a key means for a run's identity."""

    training = "training"  # defines the training: a resume keeps the run's value; comparisons show it
    extent = "extent"  # how long or where it runs: a resume may change it; comparisons show it
    operational = "operational"  # changes no result (logging, threads, ...): resumes and comparisons ignore it


class Choice(str, Enum):
    """An enum whose members are declared as `name = "value", "what it means"`: the value is what
    configs hold and compare (`Normalize.tokens == "tokens"`), `meaning` is the reference's text."""

    def __new__(cls, value: str, meaning: str = ""):
        member = str.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        return member


@dataclass(frozen=True)
class Allowed:
    """A key's range on its own: `ok(value)` is the check `validate()` runs, `text` what the error
    and the reference say is allowed (cross-key checks stay in validate())."""

    text: str
    ok: Callable[[Any], bool]


def at_least(low: float, integer: bool = False, note: str = "") -> Allowed:
    return Allowed(f"{'an integer ' if integer else ''}>= {low}{note}", lambda value: value >= low)


def above(low: float) -> Allowed:
    return Allowed(f"> {low}", lambda value: value > low)


def at_most(high: float, note: str = "") -> Allowed:
    return Allowed(f"<= {high}{note}", lambda value: value <= high)


def half_open(low: float, high: float, note: str = "") -> Allowed:
    """[low, high)"""
    return Allowed(f"in [{low}, {high}){note}", lambda value: low <= value < high)


def strictly_between(low: float, high: float) -> Allowed:
    return Allowed(f"strictly between {low} and {high}", lambda value: low < value < high)


def key(default: Any = MISSING, help: str = "", role: Role = Role.training,
        allowed: Optional[Allowed] = None, values: str = "", **kwargs) -> Any:
    """A dataclass field with its documentation and role; `default_factory` passes through.

    help: what the key does, a sentence or two (which option reads it first: "lm: ...").
    allowed: a range validate() enforces; values: the allowed values in words where another part
    of the runner checks them (a model's cell, a loss's weighting)."""
    metadata = {"role": role, "help": help, "allowed": allowed, "values": values}
    return field(default=default, metadata=metadata, **kwargs)
