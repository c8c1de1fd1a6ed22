"""The bank manifest: which version of every adapter serves, and which router state picks among them.

One manifest is one servable state of the whole bank. The pipeline registers it as one MLflow model version,
promotion stages every adapter version it names on every replica (or none), and the gateway routes with its router
to the names it gives. Rolling back is serving an older manifest. Written as JSON, atomically.

Served names on vLLM: `<stable>-<adapter>@v<version>` (e.g. `continual-facts@v3`): a new name per version, so no
replica ever pays vLLM's same-name reload (stale prefix cache, sticky in-place flag).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cl_core.errors import CheckpointError, InvalidInputError

MANIFEST_FORMAT = 1
MANIFEST_FILE = "bank.json"
ADAPTER_STATUSES = ("active", "frozen", "retired")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_adapter_name(name: str) -> str:
    """Adapter names become parts of served names and file paths: letters, digits, `_ . -`, at most 64."""
    if not isinstance(name, str) or not _NAME.match(name) or "@" in name:
        raise InvalidInputError(f"adapter name {name!r} is invalid: use 1-64 letters, digits, '_', '.' or '-', "
                                "starting with a letter or digit (e.g. 'facts', 'intent-v2')")
    return name


def served_name(stable_name: str, adapter: str, version: int) -> str:
    """The vLLM name of one adapter version (`continual-facts@v3`)."""
    return f"{stable_name}-{check_adapter_name(adapter)}@v{int(version)}"


@dataclass(frozen=True)
class ManifestAdapter:
    """One adapter of the bank as served: its lineage version and where its PEFT files are."""

    name: str
    version: int
    path: str
    status: str = "active"
    """`active` (learns and serves), `frozen` (serves, never trains again), `retired` (kept, never routed to)."""

    def __post_init__(self) -> None:
        check_adapter_name(self.name)
        if not isinstance(self.version, int) or self.version < 1:
            raise InvalidInputError(f"adapter {self.name!r}: version must be a positive integer, got "
                                    f"{self.version!r}")
        if self.status not in ADAPTER_STATUSES:
            raise InvalidInputError(f"adapter {self.name!r}: status {self.status!r} is not one of "
                                    f"{', '.join(ADAPTER_STATUSES)}")


@dataclass(frozen=True)
class BankManifest:
    """Every adapter's served version plus the router (its registered name and the directory of its state)."""

    base_model: str
    router: str
    router_dir: str | None = None
    adapters: tuple[ManifestAdapter, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [a.name for a in self.adapters]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidInputError(f"the manifest names adapter(s) {', '.join(duplicates)} more than once")

    @property
    def serving(self) -> list[ManifestAdapter]:
        """Adapters requests may be routed to (active and frozen)."""
        return [a for a in self.adapters if a.status != "retired"]

    def adapter(self, name: str) -> ManifestAdapter:
        for a in self.adapters:
            if a.name == name:
                return a
        raise InvalidInputError(f"the bank has no adapter {name!r}; it has: "
                                f"{', '.join(a.name for a in self.adapters) or 'none'}")

    def served_names(self, stable_name: str) -> dict[str, str]:
        """Adapter name -> the vLLM name its served version is loaded under."""
        return {a.name: served_name(stable_name, a.name, a.version) for a in self.serving}

    # --- JSON -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": MANIFEST_FORMAT, "base_model": self.base_model, "router": self.router,
                "router_dir": self.router_dir, "adapters": [asdict(a) for a in self.adapters],
                "metadata": dict(self.metadata)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BankManifest:
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise CheckpointError(f"not a bank manifest of format {MANIFEST_FORMAT}: "
                                  f"{str(data)[:200] if not isinstance(data, dict) else data.get('format')!r}")
        try:
            return cls(base_model=data["base_model"], router=data["router"], router_dir=data.get("router_dir"),
                       adapters=tuple(ManifestAdapter(**a) for a in data.get("adapters", [])),
                       metadata=dict(data.get("metadata") or {}))
        except (KeyError, TypeError, InvalidInputError) as exc:
            raise CheckpointError(f"the bank manifest is malformed: {exc}") from exc

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the manifest JSON to `path` (a file, or a directory that gets `bank.json`), atomically."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BankManifest:
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read the bank manifest {path}: {exc}") from exc
        return cls.from_dict(data)


__all__ = ["ADAPTER_STATUSES", "BankManifest", "ManifestAdapter", "check_adapter_name", "served_name"]
