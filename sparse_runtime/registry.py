"""A tiny registry: one per kind of thing (pruning method, allocation, repair, exporter, engine, stage).

Adding a method is adding one file and one ``@REGISTRY.register("name")`` line; nothing else changes.
Lookups of unknown names fail with the list of known ones, so a typo names its own fix.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._lazy: dict[str, str] = {}  # name -> the module that registers it, imported on first lookup

    def register_lazy(self, name: str, module: str) -> None:
        """Name an entry that ``module`` registers when it is imported, and import it on the first
        lookup. Why: a method that lives in its own package (LoSA) is listed and found wherever the
        registry is, without the registry's package importing it (no import climbing back up)."""
        self._lazy[name.lower()] = module

    def _resolve(self, key: str) -> None:
        module = self._lazy.get(key)
        if module is None or key in self._items:
            return
        import importlib

        importlib.import_module(module)
        if key not in self._items:
            raise ConfigError(f"{self.kind} {key!r} is not available: {module} did not register it")

    def register(self, name: str) -> Callable[[T], T]:
        key = name.lower()

        def deco(obj: T) -> T:
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        key = str(name).lower()
        self._resolve(key)
        if key not in self._items:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            )
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self._lazy))

    def __contains__(self, name: object) -> bool:
        key = str(name).lower()
        return key in self._items or key in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_submodules(package: str, path) -> None:
    """Import every module of a package (its ``register`` lines run), so that adding a method to
    the package is adding its file. Modules whose names start with ``_`` are left alone."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(path):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{package}.{mod.name}")
