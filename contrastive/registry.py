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
import importlib
import inspect
import typing
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown name in a registry; the message lists the valid choices."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A named family of constructors (``losses``, ``samplers``, ``filters``, ...).

    Args:
        family: the family's name (in error messages).
        interface: ``"module:Class"`` every registration must produce: a subclass of it, or a factory
            function whose return annotation is one. Resolved lazily (at the first registration).
        builtins: modules whose import registers the family's built-in entries (imported at the first
            lookup).
    """

    def __init__(self, family: str, interface: Optional[str] = None, builtins: tuple[str, ...] = ()) -> None:
        self.family = family
        self.interface = interface
        self.builtins = builtins
        self._builtins_imported = False
        self._entries: dict[str, Callable[..., T]] = {}

    def _import_builtins(self) -> None:
        """Import the modules whose decorators fill this family (once, lazily): a loss lookup imports the
        losses only, never the application (``datamodules``) or Lightning."""
        if self._builtins_imported:
            return
        self._builtins_imported = True
        for mod in self.builtins:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:  # an optional package that is not installed stays empty
                if e.name != mod:
                    raise

    def _interface(self) -> Optional[type]:
        if self.interface is None:
            return None
        module, _, attr = self.interface.partition(":")
        return getattr(importlib.import_module(module), attr)

    def check(self, name: str, obj: Callable[..., Any]) -> None:
        """Raise ``TypeError`` unless ``obj`` builds the family's interface."""
        base = self._interface()
        if base is None:
            return
        made = obj
        if not inspect.isclass(obj):
            try:
                made = typing.get_type_hints(obj).get("return")
            except Exception:  # unresolvable annotations: treated as missing
                made = None
        if not (inspect.isclass(made) and issubclass(made, base)):
            what = obj.__qualname__ if hasattr(obj, "__qualname__") else repr(obj)
            raise TypeError(f"cannot register {what} as {self.family} {name!r}: a {self.family} must be a subclass of "
                            f"{base.__module__}.{base.__qualname__} (or a factory annotated to return one)")

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(obj: Callable[..., T]) -> Callable[..., T]:
            self.check(name, obj)
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.family}: name {name!r} is already registered to {self._entries[name]!r}")
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable[..., T]:
        self._import_builtins()
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
        self._import_builtins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._import_builtins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


LOSSES: Registry = Registry("loss", "contrastive.losses.base:ContrastiveLoss", ("contrastive.losses",))
SAMPLERS: Registry = Registry("sampler", "contrastive.samplers.base:NegativeSampler", ("contrastive.samplers",))
FILTERS: Registry = Registry("filter", "contrastive.filters.base:NegativeFilter", ("contrastive.filters",))
ENCODERS: Registry = Registry("encoder", "torch.nn:Module", ("contrastive.encoders",))
DATAMODULES: Registry = Registry("datamodule", "lightning.pytorch:LightningDataModule", ("datamodules",))
INDEXES: Registry = Registry("index", "contrastive.index.base:Index", ("contrastive.index",))
TRANSFORMS: Registry = Registry("feature transform", "contrastive.transforms.feature:FeatureTransform",
                                ("contrastive.transforms",))
#: settings register their configurations of the module (code search: ``dual_encoder``) in ``datamodules``
MODELS: Registry = Registry("model", "contrastive.models.contrastive:ContrastiveModule",
                            ("contrastive.models", "datamodules"))
ESTIMATORS: Registry = Registry("similarity estimator", "contrastive.losses.estimators:SimilarityEstimator",
                                ("contrastive.models.estimates",))
