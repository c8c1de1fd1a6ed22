"""One generic name registry for every extension point (anti-forgetting methods, replay strategies, priority
functions, routers, ...).

An extension is one file that defines a class (or function) and registers it under a name; configs refer to it by
that name, and an unknown name fails with the list of known ones. Built-ins register when their package is
imported (the package `__init__` imports its modules), so nothing needs a hand-kept list of names.
"""

from __future__ import annotations

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

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            if self._loader is not None:
                self._loader()


__all__ = ["Registry"]
