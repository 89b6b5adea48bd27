"""Components that own their config: a class an option names by `_target_`, which declares its keys next to itself.

    class Margin(torch.nn.Module):
        @dataclass
        class Keys:  # loss.margin: what it means, its default and its range
            margin: float = key(1.0, "how far apart the classes' scores must be", allowed=above(0))

        def __init__(self, margin: float = 1.0): ...

    # my_conf/loss/margin.yaml: one YAML names the class and holds its arguments
    name: margin
    _target_: mypackage.losses.Margin
    margin: 2.0

    python -m runner loss=margin loss.margin=3 'hydra.searchpath=[file://my_conf]'

The YAML is a complete option of its group (runner.config.schema.OPEN_GROUPS): its keys other than
the group's declared ones are the class's arguments. The built-in models, losses and data sources are
options of this kind too (conf/loss/focal.yaml names runner.components.losses.FocalLoss). `Keys` is
optional; where it is there, each key is checked for its type and range before anything is written (one
line naming `loss.KEY`), its default is recorded with the run (comparisons and resumes see it),
`python -m runner --help` and the reference list it under the option that declares it, and a key that
another option of the group declares is ignored with a warning (one sweep can cross the options, as
backward's strategies do).
Nothing here imports torch until a class is asked for by its import path.
"""
from __future__ import annotations

import inspect
import typing
from dataclasses import MISSING, fields, is_dataclass
from enum import Enum
from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

import yaml

from runner.config.location import CONF_DIR


class ComponentError(ValueError):
    """An argument of your component that its declared keys do not allow (a ConfigError's message)."""


def declared_keys(cls: Any) -> Optional[type]:
    """The `Keys` dataclass a component class declares, or None."""
    keys = getattr(cls, "Keys", None)
    return keys if isinstance(keys, type) and is_dataclass(keys) else None


def default_of(f) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def checked_arguments(group: str, target: str, cls: Any, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """`kwargs` with the declared keys' defaults filled in, each declared key's type and range checked."""
    keys = declared_keys(cls)
    if keys is None:
        return dict(kwargs)
    hints, checked = typing.get_type_hints(keys), dict(kwargs)
    for f in fields(keys):
        if f.name not in checked:
            if default_of(f) is MISSING:
                raise ComponentError(f"{group}.{f.name} is missing: {target} declares it without a default, "
                                     f"expected {group}.{f.name}=VALUE")
            checked[f.name] = default_of(f)
        checked[f.name] = _typed(f"{group}.{f.name}", checked[f.name], hints[f.name])
        allowed = f.metadata.get("allowed")
        if allowed is not None and not allowed.ok(checked[f.name]):
            raise ComponentError(f"{group}.{f.name}={checked[f.name]} is not allowed: expected {allowed.text}")
    return checked


NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _typed(dotted: str, value: Any, hint: Any) -> Any:
    """The value as its declared scalar type (an int where a float is declared; a choice's plain value),
    or ComponentError."""
    if isinstance(hint, type) and issubclass(hint, Enum):
        values = [member.value for member in hint]
        if getattr(value, "value", value) not in values:
            raise ComponentError(f"{dotted}={value} is not allowed: expected one of {', '.join(values)}")
        return getattr(value, "value", value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ComponentError(f"{dotted}={value!r} is not allowed: expected {NAMES[hint]}")
    return value


@lru_cache(maxsize=None)
def option_values(group: str, option: str) -> Dict[str, Any]:
    """What an option of conf/ sets (conf/<group>/<option>.yaml), or {} where there is no such option."""
    path = CONF_DIR / group / f"{option}.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def option_target(group: str, option: str) -> Optional[str]:
    """The class an option of conf/ names by `_target_` (loss=focal: runner.components.losses.FocalLoss), or
    None: what a config built in Python with the option's name alone trains, as the command line would."""
    target = option_values(group, option).get("_target_")
    return None if target in (None, "???") else str(target)


def class_of(target: Optional[str]) -> Any:
    """The class (or function) an import path names, or None where it does not import (the build names
    that in one line)."""
    if not target:
        return None
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception:  # ImportError, AttributeError, or the module's own failure
        return None


def options(group: str) -> List[str]:
    """The options of conf/<group>, by name."""
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


@lru_cache(maxsize=None)
def keys_of_options(group: str) -> Dict[str, Tuple[str, ...]]:
    """key -> the options of conf/<group> whose class declares it."""
    found: Dict[str, List[str]] = {}
    for option in options(group):
        keys = declared_keys(class_of(option_target(group, option)))
        for f in fields(keys) if keys else ():
            found.setdefault(f.name, []).append(option)
    return {name: tuple(options) for name, options in found.items()}


def takes(cls: Any) -> Tuple[bool, set]:
    """(does its constructor take any keyword, the keywords it names)."""
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return True, set()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()), set(parameters)


def option_arguments(group: str, label: str, target: Optional[str],
                     kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """(the arguments the option's class takes from the group's keys, the warnings for those it ignores).

    A class that declares `Keys`: its declared keys are checked and defaulted (checked_arguments); a key it
    neither declares nor takes that another option of the group declares (loss.gamma under loss=bce) is
    left out with a warning, so that a sweep can cross the options; any other is ComponentError naming it.
    A class that declares nothing takes what it is given (its constructor decides). `label`: how messages
    name the option (loss=focal, or loss._target_=package.module.Class)."""
    cls = class_of(target)
    keys = declared_keys(cls)
    if keys is None:
        return dict(kwargs), []
    declared = [f.name for f in fields(keys)]
    any_keyword, named = takes(cls)
    others = keys_of_options(group)
    used, ignored = {}, []
    for name, value in kwargs.items():
        if name in declared or name in named or any_keyword:
            used[name] = value
        elif name in others:
            ignored.append(f"{group}.{name}={_shown(value)} is ignored by {label}: it applies to "
                           + " or ".join(f"{group}={option}" for option in others[name]))
        else:
            expected = f"one of {', '.join(f'{group}.{k}' for k in declared)}" if declared else "none of its own"
            raise ComponentError(f"{group}.{name} is not a key of {label}: expected {expected} (python -m runner "
                                 f"--help lists every option's keys)")
    return checked_arguments(group, str(target), cls, used), ignored


def _shown(value: Any) -> str:
    value = getattr(value, "value", value)
    return str(value).lower() if isinstance(value, bool) else str(value)
