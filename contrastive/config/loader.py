"""Compose an experiment config from OmegaConf YAML files, config groups and command-line overrides.

An experiment file names its building blocks in a ``defaults`` list (``- loss: infonce`` loads
``configs/loss/infonce.yaml`` into the ``loss`` key), then overrides keys in its body. On the command line
``group=name`` swaps a group (``sampler=faiss_hard``) and ``a.b=value`` sets any key
(``loss.temperature=0.05``). Precedence, lowest first: group files, the experiment body, command-line keys.

Every leaf remembers the file it came from (:class:`Provenance`), so that validation errors can name it.
A resolved config (no ``defaults``) is self-contained: saved beside a run, it relaunches the run alone.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf

from contrastive.config.errors import ConfigError
from contrastive.io import atomic_write_text


@dataclass
class Provenance:
    """Maps a dotted key to the file (or ``"command line"``) that last set it."""

    sources: dict[str, str] = field(default_factory=dict)
    group_choices: dict[str, str] = field(default_factory=dict)

    def record(self, node: Any, source: str, prefix: str = "") -> None:
        if isinstance(node, dict):
            if prefix:
                self.sources[prefix] = source
            for k, v in node.items():
                self.record(v, source, f"{prefix}.{k}" if prefix else str(k))
        else:
            self.sources[prefix] = source

    def drop(self, prefix: str) -> None:
        for k in [k for k in self.sources if k == prefix or k.startswith(prefix + ".")]:
            del self.sources[k]

    def of(self, key: str) -> str:
        while key:
            if key in self.sources:
                return self.sources[key]
            key = key.rpartition(".")[0]
        return "defaults"


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's float rule: ``1e-3``, ``5e-2`` and ``1e6`` are floats (YAML 1.1,
    PyYAML's default, needs a dot: ``1.0e-3``, and reads ``1e-3`` as a string)."""


Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 floats (:class:`Yaml12Loader`)."""
    return yaml.load(text, Loader=Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def yaml_error_message(path: Path | str, e: yaml.YAMLError) -> str:
    """``file:line:column: problem`` of a YAML syntax error (1-based line and column, as editors count)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    return f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{what}: file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}, offset {e.start}); "
                          "save the config as UTF-8") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error_message(path, e)) from None
    if data is None:
        raise ConfigError(f"{path}: empty config file ({what}); it must hold a YAML mapping of keys")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def find_config_root(experiment_path: Path) -> Optional[Path]:
    """The directory holding the group folders: ``CONTRASTIVE_CONFIG_DIR``, else the nearest ancestor of
    the experiment file named ``configs`` (or containing one), else ``./configs``."""
    env = os.environ.get("CONTRASTIVE_CONFIG_DIR")
    if env:
        return Path(env)
    for parent in experiment_path.resolve().parents:
        if parent.name == "configs":
            return parent
        if (parent / "configs").is_dir():
            return parent / "configs"
    cwd = Path.cwd() / "configs"
    return cwd if cwd.is_dir() else None


def available_choices(root: Optional[Path], group: str) -> list[str]:
    if root is None or not (root / group).is_dir():
        return []
    return sorted(p.stem for p in (root / group).glob("*.yaml"))


def _is_group_override(item: str, root: Optional[Path]) -> bool:
    key, _, _ = item.partition("=")
    return "." not in key and root is not None and (root / key).is_dir()


def _parse_defaults(raw: Any, path: Path) -> list[tuple[str, Optional[str]]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: 'defaults' must be a list of 'group: name' entries")
    out = []
    for i, entry in enumerate(raw):
        if not (isinstance(entry, dict) and len(entry) == 1):
            raise ConfigError(f"{path}: defaults[{i}] must be a single 'group: name' mapping, got {entry!r}")
        (group, name), = entry.items()
        out.append((str(group), None if name is None else str(name)))
    return out


def compose(experiment: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[DictConfig, Provenance]:
    """Load ``experiment`` with its groups and apply ``overrides``; returns the merged config and provenance."""
    path = Path(experiment)
    body = _read_yaml(path, "experiment config")
    root = find_config_root(path)
    prov = Provenance()
    defaults = _parse_defaults(body.pop("defaults", None), path)
    choices = {g: n for g, n in defaults}
    group_src = {g: str(path) for g in choices}

    dotted: list[str] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} must look like key=value or group=name")
        key, _, value = item.partition("=")
        if not _KEY.fullmatch(key):
            raise ConfigError(f"command line: override {item!r} has "
                              + ("an empty key" if not key else f"an invalid key {key!r}")
                              + "; expected key=value (e.g. optim.lr=1e-3) or group=name (e.g. loss=infonce)")
        if _is_group_override(item, root) and not _looks_like_mapping(value):
            choices[key] = value
            group_src[key] = "command line"
        else:
            dotted.append(item)

    merged: dict = {}
    for group, name in choices.items():
        if name is None:
            continue
        gpath = root / group / f"{name}.yaml" if root is not None else Path(group) / f"{name}.yaml"
        if not gpath.is_file():
            valid = available_choices(root, group)
            raise ConfigError(
                f"{group}={name} (from {group_src[group]}): no file {gpath}; valid choices: {', '.join(valid) or '(none)'}"
            )
        node = _read_yaml(gpath, f"{group}={name}")
        merged[group] = node
        prov.record(node, str(gpath), group)
        prov.group_choices[group] = name

    cfg = OmegaConf.create(merged)
    cfg = OmegaConf.merge(cfg, OmegaConf.create(body))
    prov.record(body, str(path))
    for item in dotted:
        key, _, value = item.partition("=")
        try:
            parsed = parse_yaml(value) if value != "" else ""
        except yaml.YAMLError as e:
            if _looks_like_mapping(value) or value.lstrip().startswith("["):
                raise ConfigError(f"command line: override {item!r}: " + yaml_error_message("value", e)) from None
            parsed = value
        # a whole mapping replaces the node; a scalar sets the leaf
        OmegaConf.update(cfg, key, parsed, merge=False, force_add=True)
        prov.drop(key)
        # intermediate keys the override created come from the command line too (an unknown key deep in
        # the tree is then blamed on the command line, not on the group file of its top-level section)
        parts = key.split(".")
        for i in range(1, len(parts)):
            prov.sources.setdefault(".".join(parts[:i]), "command line")
        prov.record(parsed, "command line", key)
    return cfg, prov


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_\-]+)*")


def _looks_like_mapping(value: str) -> bool:
    return value.strip().startswith("{")


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def save_resolved(cfg: DictConfig, path: Path) -> None:
    """Write the fully resolved config atomically (temp file + rename)."""
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(to_container(cfg)), sort_keys=False))
