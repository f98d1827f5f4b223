"""Name → constructor registries, one per family, so an ablation is one YAML line.

A registry maps a short name (``"infonce"``) to a class or factory with typed constructor arguments.
Registries never see config objects: :mod:`contrastive.config` validates the YAML against each
constructor's signature and calls it with plain keyword arguments.

Example::

    from contrastive.registry import LOSSES

    @LOSSES.register("infonce")
    class InfoNCELoss(ContrastiveLoss): ...

    loss = LOSSES.build("infonce", temperature=0.05)
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown name in a registry; the message lists the valid choices."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A named family of constructors (``losses``, ``samplers``, ``filters``, ...)."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(obj: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.family}: name {name!r} is already registered to {self._entries[name]!r}")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable[..., T]:
        _import_builtins()
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RegistryError(
                f"unknown {self.family} {name!r}{hint}; valid choices: {', '.join(sorted(self._entries))}"
            ) from None

    def build(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        _import_builtins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        _import_builtins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


_BUILTINS_IMPORTED = False


def _import_builtins() -> None:
    """Import the modules whose decorators fill the registries (once, lazily, to keep start-up cheap)."""
    global _BUILTINS_IMPORTED
    if _BUILTINS_IMPORTED:
        return
    _BUILTINS_IMPORTED = True
    import importlib

    for mod in (
        "contrastive.losses",
        "contrastive.models",
        "contrastive.transforms",
        "contrastive.encoders",
        "contrastive.samplers",
        "contrastive.filters",
        "contrastive.index",
        "datamodules",
    ):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a family with no module yet simply stays empty
            if e.name != mod:
                raise


LOSSES: Registry = Registry("loss")
SAMPLERS: Registry = Registry("sampler")
FILTERS: Registry = Registry("filter")
ENCODERS: Registry = Registry("encoder")
DATAMODULES: Registry = Registry("datamodule")
INDEXES: Registry = Registry("index")
TRANSFORMS: Registry = Registry("feature transform")
MODELS: Registry = Registry("model")
ESTIMATORS: Registry = Registry("similarity estimator")
