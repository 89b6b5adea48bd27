"""The Hydra side of a run: compose the config as the command line does, convert it to the typed
dataclasses, and what --help's reference reads (your config directories too).

    compose(overrides)            the composed DictConfig, Hydra's own node kept (runner.api's path in)
    config_from_omegaconf(cfg)    -> (Config, the extra arguments of your own classes by group)
    asked(cfg, hydra_node)        how a run was asked for: choices, overrides, the full config
    config_for_resume(state, ...) a checkpoint's own config, with the keys a resume may change
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.config import schema
from runner.config.location import CONF_DIR
from runner.config.schema import (
    ARGUMENT_GROUPS,
    GROUPS,
    Config,
    ConfigError,
    DataConf,
    LossConf,
    ModelConf,
    OptimConf,
)

schema.register()


def _reference(part: str) -> str:
    """`--help`'s groups and keys, generated from the keys' declarations as docs/reference.md is:
    conf/config.yaml's hydra.help.template reads them as ${reference:groups} and ${reference:keys}."""
    from runner.config import reference

    conf = [CONF_DIR, *_own_config_dirs()]
    return reference.groups_text(conf) if part == "groups" else reference.text(conf)


def _own_config_dirs() -> List[Path]:
    """Your config directories (hydra.searchpath=[file://DIR]), whose options --help lists beside conf/'s."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    sources = HydraConfig.get().runtime.config_sources
    return [Path(source.path) for source in sources
            if source.schema == "file" and Path(source.path).resolve() != CONF_DIR.resolve()]


@contextmanager
def _hydra(config_dir: Path) -> Iterator[None]:
    """Hydra initialised on config_dir for one composition. A Hydra already initialised in this
    process (a @hydra.main run, the caller's own `hydra.initialize`) is set aside and put back."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    outer = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with hydra.initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
            yield
    finally:
        GlobalHydra.instance().hydra = outer


def one_line(exc: BaseException) -> str:
    """Hydra's message, first line, with its cause's first line when Hydra's own says little
    ("Error merging override trainer.steps=abc: Value 'abc' ... could not be converted to Integer")."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        text = f"{text}: {str(cause).strip().splitlines()[0]}"
    return text


def compose(overrides: List[str], config_dir: Optional[Path] = None) -> DictConfig:
    """What the command line composes for `overrides` (the groups' YAML applied), Hydra's own node
    kept (its runtime choices and task overrides are the run's record): runner.api's path in.
    Hydra's composition errors become one ConfigError line."""
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException

    try:
        with _hydra(config_dir or CONF_DIR):
            return hydra_compose("config", overrides=overrides, return_hydra_config=True)
    except HydraException as exc:
        raise ConfigError(one_line(exc)) from None


@lru_cache(maxsize=32)
def _composed(overrides: Tuple[str, ...]) -> DictConfig:
    return compose(list(overrides))


def compose_merged(choices: List[str], keys: List[str]) -> DictConfig:
    """compose(choices + keys) where `keys` set plain keys (KEY=VALUE, no group choice): Hydra composes the
    group choices once (cached: a fingerprint composes the same probe under many modes), and the keys merge
    into a copy as Hydra's own override would, typed by the schema. Hydra's record of the task's overrides
    lists the choices only."""
    cfg = _composed(tuple(choices)).copy()
    try:
        for override in keys:
            key, _, value = override.partition("=")
            OmegaConf.update(cfg, key, yaml_value(value), merge=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{override}: {str(exc).splitlines()[0]}") from None
    return cfg


def yaml_value(text: str) -> Any:
    """A command-line value as Hydra reads it (YAML: 2 -> int, 0.5 -> float, true -> bool, else text)."""
    import yaml

    return yaml.safe_load(text) if text else text


def config_from_omegaconf(cfg: DictConfig) -> Tuple[Config, Dict[str, Dict[str, Any]]]:
    """Composed config -> (typed plain dataclasses, the extra keyword arguments (+GROUP.KEY) of a
    custom loss, a custom model and the optimizer by group: {"loss": {...}, "model": {...}, "optim": {...}})."""
    try:
        if "hydra" in cfg:  # callbacks see Hydra's own node; its sweep keys only resolve in a job
            cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        declared = {"loss": LossConf, "model": ModelConf, "optim": OptimConf, "data": DataConf}
        if OmegaConf.get_type(cfg) is Config and not any(
                set(cfg[group].keys()) - {f.name for f in fields(kind)} for group, kind in declared.items()):
            return OmegaConf.to_object(cfg), {group: {} for group in declared}  # the fast, common path
        container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        extras = {group: schema.extra_keys(container[group], kind) for group, kind in declared.items()}
        for group in declared:
            container[group] = {k: v for k, v in container[group].items() if k not in extras[group]}
        typed = OmegaConf.merge(OmegaConf.structured(Config), container)
        return OmegaConf.to_object(typed), extras
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        if "Missing mandatory value" in str(exc):
            missing = key or "a key"
            example = "package.module.Class" if missing.endswith("_target_") else "..."
            raise ConfigError(f"{missing} is missing: expected {missing}={example}") from None
        raise ConfigError(f"{key or 'config'}: {str(exc).splitlines()[0]}") from None


def asked(cfg: DictConfig, hydra_node) -> Dict[str, Any]:
    """How a run was asked for, as its summary records it: choices, overrides, the full config."""
    choices = {g: hydra_node.runtime.choices.get(g) for g in GROUPS}
    if hydra_node.runtime.choices.get("experiment"):
        choices["experiment"] = hydra_node.runtime.choices.get("experiment")
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    return dict(choices=choices, overrides=list(hydra_node.overrides.task),
                config=OmegaConf.to_container(task, resolve=True, enum_to_str=True))


def config_for_resume(state: Dict[str, Any], current: Config,
                      overrides: List[str]) -> Tuple[Config, Dict[str, Dict[str, Any]]]:
    """The checkpoint's own config, with the keys a resume may change taken from this command."""
    saved = dict(state["config"])
    extras = {group: saved.pop(f"{group}_kwargs", {}) or {} for group in ARGUMENT_GROUPS}
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), saved))
    typed = {o.lstrip("+~").partition("=")[0] for o in overrides}
    for dotted in schema.resume_may_change():
        if dotted in typed:
            *path, leaf = dotted.split(".")
            source, target = current, config
            for name in path:
                source, target = getattr(source, name), getattr(target, name)
            setattr(target, leaf, getattr(source, leaf))
    return config, extras


OmegaConf.register_new_resolver("reference", _reference, replace=True)
