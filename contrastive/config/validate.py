"""Validate a composed config against typed schemas and registered constructors before anything runs.

Every error is one :class:`ConfigError` whose message names the dotted key, the file it came from and the
valid choices (keys, registered names or the expected type).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import typing
from typing import Any, Callable, Literal, Union, get_args, get_origin

from omegaconf import DictConfig

from contrastive.config.errors import ConfigError
from contrastive.config.loader import Provenance, to_container
from contrastive.config.schema import BUILD_FILLED, REQUIRED_TOP_LEVEL, TOP_LEVEL
from contrastive.registry import (DATAMODULES, ENCODERS, ESTIMATORS, FILTERS, LOSSES, MODELS, SAMPLERS,
                                  TRANSFORMS, Registry)

FAMILIES: dict[str, Registry] = {r.family: r for r in (DATAMODULES, ENCODERS, ESTIMATORS, FILTERS, LOSSES, MODELS,
                                                       SAMPLERS, TRANSFORMS)}

#: component keys nested inside another component's section: section family → {key: family}
NESTED: dict[str, dict[str, str]] = {"model": {"encoder": "encoder", "doc_encoder": "encoder",
                                               "similarity_estimator": "similarity estimator"}}


def resolve(cfg: DictConfig, prov: Provenance) -> dict:
    """``cfg`` as a plain dict with interpolations resolved; raises :class:`ConfigError` on an interpolation
    error or a key left at ``???``."""
    try:
        data = to_container(cfg)
    except Exception as e:  # interpolation errors
        raise ConfigError(f"config: cannot resolve interpolations: {e}") from None
    missing = _find_missing(data)
    if missing:
        raise ConfigError(f"key '{missing}' (from {prov.of(missing)}) has no value (???); set it on the command "
                          f"line, e.g. {missing}=...")
    return data


def validate(cfg: DictConfig, prov: Provenance) -> dict:
    """Check ``cfg``; return it as a plain resolved dict. Raises :class:`ConfigError`."""
    return check_experiment(resolve(cfg, prov), prov)


def check_experiment(data: dict, prov: Provenance) -> dict:
    """Check a resolved experiment (:func:`resolve`) against the schemas and registries; returns it."""
    for key in data:
        if key not in TOP_LEVEL:
            raise ConfigError(_unknown(key, prov, TOP_LEVEL))
    for key in REQUIRED_TOP_LEVEL:
        if key not in data or data[key] is None:
            raise ConfigError(f"missing required key '{key}' (experiment file {prov.of('experiment')}); "
                              f"add a '{key}' section or a '- {key}: <name>' entry to defaults")
    for key, kind in TOP_LEVEL.items():
        if key not in data or data[key] is None:
            continue
        value = data[key]
        if isinstance(kind, str) and kind.startswith("component:"):
            _check_component(value, key, kind.split(":", 1)[1], prov)
        elif isinstance(kind, str) and kind.startswith("list:"):
            fam = kind.split(":", 1)[1]
            if not isinstance(value, list):
                raise ConfigError(f"key '{key}' (from {prov.of(key)}) must be a list of components with a 'name'")
            for i, item in enumerate(value):
                _check_component(item, f"{key}.{i}", fam, prov)
        elif dataclasses.is_dataclass(kind):
            _check_dataclass(value, key, kind, prov)
        else:
            check_type(value, kind, key, prov)
    return data


def _find_missing(node: Any, prefix: str = "") -> str | None:
    """The first dotted key whose value is OmegaConf's mandatory-missing marker ``???``."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return prefix if node == "???" else None
    for k, v in items:
        found = _find_missing(v, f"{prefix}.{k}" if prefix else str(k))
        if found:
            return found
    return None


def _unknown(key: str, prov: Provenance, valid: typing.Iterable[str]) -> str:
    return f"unknown key '{key}' (from {prov.of(key)}); valid keys: {', '.join(sorted(valid))}"


def _check_dataclass(value: Any, key: str, schema: type, prov: Provenance) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"key '{key}' (from {prov.of(key)}) must be a mapping, got {type(value).__name__}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for k, v in value.items():
        if k not in fields:
            raise ConfigError(_unknown(f"{key}.{k}", prov, fields))
        check_type(v, hints[k], f"{key}.{k}", prov)


def constructor_params(obj: Callable) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    """The keyword parameters a config section may set, with their type hints.

    A parameter typed with a settings dataclass (``mining: Optional[MiningSettings]``) of a constructor
    that also takes ``**kwargs`` is given flattened: the dataclass's fields are the section's keys (the
    constructor builds the dataclass from them)."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    sig = inspect.signature(target)
    params = {n: p for n, p in sig.parameters.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    try:
        hints = typing.get_type_hints(target)
    except Exception:
        hints = {}
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        for name in list(params):
            schema = next((a for a in (hints.get(name), *get_args(hints.get(name))) if dataclasses.is_dataclass(a)), None)
            if schema is None:
                continue
            del params[name]
            field_hints = typing.get_type_hints(schema)
            for f in dataclasses.fields(schema):
                params[f.name] = inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
                hints[f.name] = field_hints[f.name]
    return params, hints


def _check_component(value: Any, key: str, family: str, prov: Provenance) -> None:
    registry = FAMILIES[family]
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"key '{key}' (from {prov.of(key)}) must be a mapping with a 'name'; valid {family} "
                          f"names: {', '.join(registry.names())}")
    name = value["name"]
    if name not in registry:
        raise ConfigError(f"unknown {family} '{name}' at key '{key}.name' (from {prov.of(key + '.name')}); "
                          f"valid choices: {', '.join(registry.names())}")
    params, hints = constructor_params(registry.get(name))
    nested = NESTED.get(family, {})
    filled = set(BUILD_FILLED.get(family, ()))
    valid = (set(params) - filled) | set(nested)
    for k, v in value.items():
        if k == "name":
            continue
        sub = f"{key}.{k}"
        if k in nested:
            if v is not None:
                _check_component(v, sub, nested[k], prov)
            continue
        if k not in valid:
            raise ConfigError(f"unknown key '{sub}' for {family} '{name}' (from {prov.of(sub)}); valid keys: "
                              f"{', '.join(sorted(valid)) or '(none)'}")
        if k in hints:
            check_type(v, hints[k], sub, prov)
    for k, p in params.items():
        if p.default is inspect.Parameter.empty and k not in value and k not in filled:
            raise ConfigError(f"missing required key '{key}.{k}' for {family} '{name}' (section from {prov.of(key)})")


def _type_name(ann: Any) -> str:
    origin = get_origin(ann)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(ann))
    if origin is Union:
        return " or ".join(_type_name(a) for a in get_args(ann))
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann))


def _matches(value: Any, ann: Any) -> bool:
    if ann is Any or ann is inspect.Parameter.empty:
        return True
    origin = get_origin(ann)
    if origin is Union:
        return any(_matches(value, a) for a in get_args(ann))
    if origin is Literal:
        return value in get_args(ann)
    if ann is type(None):
        return value is None
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence) or ann in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in get_args(ann) if a is not Ellipsis]
        if origin is tuple and args and Ellipsis not in get_args(ann) and len(args) != len(value):
            return False
        return all(_matches(v, args[0] if len(args) == 1 or origin is not tuple else args[i])
                   for i, v in enumerate(value)) if args else True
    if origin in (dict, collections.abc.Mapping) or ann is dict:
        return isinstance(value, dict)
    if inspect.isclass(ann):
        # objects built elsewhere (modules, tensors): a config may give a nested spec or a path
        return isinstance(value, (dict, str)) or value is None or isinstance(value, ann)
    return True


def check_type(value: Any, ann: Any, key: str, prov: Provenance) -> None:
    if not _matches(value, ann):
        raise ConfigError(f"key '{key}' (from {prov.of(key)}) must be {_type_name(ann)}; got {value!r} "
                          f"({type(value).__name__})")
