"""Components of your own: a model or loss class named by `_target_`, which declares its keys next to itself.

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
the group's declared ones are the class's arguments. `Keys` is optional; where it is there, each key is
checked for its type and range before anything is written (one line naming `loss.KEY`), its default is
recorded with the run (comparisons and resumes see it), and `python -m runner --help` and the reference
list it under the option that declares it. Nothing here imports torch.
"""
from __future__ import annotations

import typing
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Dict, Optional


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
    """The value as its declared scalar type (an int where a float is declared), or ComponentError."""
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ComponentError(f"{dotted}={value!r} is not allowed: expected {NAMES[hint]}")
    return value
