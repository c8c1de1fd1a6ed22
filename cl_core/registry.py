"""One generic name registry for every extension point (anti-forgetting methods, replay strategies, priority
functions, routers, ...).

An extension is one file that defines a class (or function) and registers it under a name; configs refer to it by
that name, and an unknown name fails with the list of known ones. Built-ins register on the first lookup: a
registry's loader imports them, either a package whose `__init__` imports its modules, or every module of a package
(`package_loader`), so nothing needs a hand-kept list of names and a new extension is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from cl_core.errors import InvalidInputError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind. `what` is the kind in words ("router", "replay strategy"), used in errors."""

    def __init__(self, what: str, loader: Callable[[], None] | None = None) -> None:
        self.what = what
        self._entries: dict[str, T] = {}
        self._loader = loader  # imports the built-ins on first lookup (lazy: no import-time side effects)
        self._loaded = loader is None

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make the decorated class or function available under `name`."""
        if not isinstance(name, str) or not name.strip():
            raise InvalidInputError(f"a {self.what} name must be a non-empty string, got {name!r}")

        def decorate(entry: T) -> T:
            known = self._entries.get(name)
            if known is not None and known is not entry and getattr(known, "__qualname__", None) != \
                    getattr(entry, "__qualname__", object()):
                raise InvalidInputError(f"{self.what} {name!r} is already registered by {known!r}")
            self._entries[name] = entry
            if isinstance(entry, type):
                entry.name = name  # type: ignore[attr-defined]
            return entry

        return decorate

    def get(self, name: str) -> T:
        """The entry registered as `name`; an unknown name raises `InvalidInputError` listing the known ones."""
        self._load()
        if not isinstance(name, str) or name not in self._entries:
            raise InvalidInputError(f"unknown {self.what} {name!r}; known: {', '.join(self.names()) or 'none'}")
        return self._entries[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs, sorted by name (e.g. to derive a check from a class attribute of each entry)."""
        self._load()
        return sorted(self._entries.items())

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # first: the modules the loader imports may look names up themselves
            if self._loader is not None:
                try:
                    self._loader()
                except BaseException:
                    self._loaded = False  # a broken import is reported again, never a silently short list
                    raise


def package_loader(package: str) -> Callable[[], None]:
    """A registry loader that imports every module of `package` (names starting with `_` excepted), so that each
    module's `@register(...)` runs: dropping a file into the package is all it takes to add an extension."""

    def load() -> None:
        root = importlib.import_module(package)
        for module in sorted(pkgutil.iter_modules(getattr(root, "__path__", [])), key=lambda m: m.name):
            if not module.name.startswith("_"):
                importlib.import_module(f"{package}.{module.name}")

    return load


__all__ = ["Registry", "package_loader"]
