"""The pipeline's view of a bank: the candidate a round trained, its servable bundle, and how items are routed.

Why here: training writes a `ContinualLLM` checkpoint (every adapter's versions, the router, the store); what
evaluation, the registry and promotion need is one *servable state*: the current version of each adapter, the
router state, and the served name of each. That is a bundle directory:

```
bundle/bank.json          the BankManifest (paths relative to the bundle)
bundle/<adapter>/         the PEFT files of the version that serves
bundle/router/            router.safetensors + router.json
```

Served names are `<stable>-<adapter>@v<N>`, N the adapter's lineage version: an adapter a round did not train
keeps its served name (replicas already have it loaded: nothing reloads), and a changed one gets a new name.
Lineage versions are unique across the whole registry, rejected candidates included (`version_floor`: training
continues numbering after the highest version any registered bundle used), so a rollback followed by a new round
never reuses a name for different weights.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_core.bank.manifest import MANIFEST_FILE, BankManifest, ManifestAdapter, served_name
from cl_core.errors import CheckpointError

BASE_MODEL_NAME = "base"


@dataclass(frozen=True)
class BankCandidate:
    """What a bank round trained: each adapter's lineage version (in the checkpoint) and which ones changed."""

    checkpoint_dir: Path
    base_model: str
    router: str
    lineage_versions: dict[str, int]
    statuses: dict[str, str]
    changed: tuple[str, ...]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def router_dir(self) -> Path:
        return self.checkpoint_dir / "bank" / "router"

    def adapter_path(self, name: str) -> Path:
        return self.checkpoint_dir / "adapters" / name / f"v{self.lineage_versions[name]}"


def lineage_versions(checkpoint_dir: Path) -> tuple[dict[str, int], dict[str, str], str]:
    """(adapter -> current lineage version, adapter -> status, router name) recorded in a bank checkpoint."""
    try:
        manifest = json.loads((Path(checkpoint_dir) / "manifest.json").read_text())
        bank = manifest["bank"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{checkpoint_dir} is not a bank checkpoint ({exc})") from exc
    versions = {e["name"]: int(e["current_version"]) for e in bank["lineages"] if e["current_version"] is not None}
    statuses = {e["name"]: str(e["status"]) for e in bank["lineages"]}
    return versions, statuses, str(bank["router"])


def bank_candidate(checkpoint_dir: Path, base_model: str, champion_checkpoint: Path | None) -> BankCandidate:
    """The candidate of a bank round, compared with the champion's checkpoint to find what changed."""
    versions, statuses, router = lineage_versions(checkpoint_dir)
    before = lineage_versions(champion_checkpoint)[0] if champion_checkpoint is not None else {}
    changed = tuple(name for name, v in versions.items() if before.get(name) != v)
    return BankCandidate(Path(checkpoint_dir), base_model, router, versions, statuses, changed)


def write_bundle(candidate: BankCandidate, dst: Path, metadata: dict[str, Any] | None = None) -> BankManifest:
    """Write the servable bundle of `candidate` to `dst` (replacing it, atomically) and return its manifest."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    entries = []
    for name, lineage_version in candidate.lineage_versions.items():
        shutil.copytree(candidate.adapter_path(name), tmp / name)
        entries.append(ManifestAdapter(name=name, version=lineage_version, path=name,
                                       status=candidate.statuses.get(name, "active")))
    shutil.copytree(candidate.router_dir, tmp / "router")
    manifest = BankManifest(base_model=candidate.base_model, router=candidate.router, router_dir="router",
                            adapters=tuple(entries),
                            metadata={"changed": list(candidate.changed), **(metadata or {})})
    manifest.save(tmp / MANIFEST_FILE)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return manifest


def load_bundle(bundle_dir: Path) -> BankManifest:
    """A bundle's manifest with absolute paths (adapters and router inside the bundle directory)."""
    bundle_dir = Path(bundle_dir).absolute()
    manifest = BankManifest.load(bundle_dir / MANIFEST_FILE)
    adapters = tuple(ManifestAdapter(a.name, a.version, str(_inside(bundle_dir, a.path)), a.status)
                     for a in manifest.adapters)
    router_dir = str(_inside(bundle_dir, manifest.router_dir)) if manifest.router_dir else None
    return BankManifest(manifest.base_model, manifest.router, router_dir, adapters, dict(manifest.metadata))


def _inside(root: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


def version_floor(bundles: Sequence[BankManifest]) -> dict[str, int]:
    """Adapter -> the highest lineage version any registered bundle used (new versions must go above it)."""
    floor: dict[str, int] = {}
    for manifest in bundles:
        for adapter in manifest.adapters:
            floor[adapter.name] = max(floor.get(adapter.name, 0), adapter.version)
    return floor


def is_bundle(path: Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def router_names(manifest: BankManifest, name_for: Callable[[ManifestAdapter], str],
                 model_path: str) -> Callable[[Sequence[str]], list[str]]:
    """Prompts -> the served name each is routed to (`name_for(adapter)`), or `base`: exactly the decision the
    gateway makes with the same manifest (same router state, same embedder)."""
    from cl_core.bank.embedder import shared_embedder
    from cl_core.bank.router import RouteRequest, load_router

    if manifest.router_dir is None:
        raise CheckpointError("the bank manifest names no router state (router_dir); it cannot route")
    router = load_router(manifest.router_dir)
    serving = {a.name: a for a in manifest.serving}

    def names(prompts: Sequence[str]) -> list[str]:
        vectors = shared_embedder(model_path).embed(list(prompts)) if router.needs_embeddings else None
        requests = [RouteRequest(p, None, None if vectors is None else vectors[i]) for i, p in enumerate(prompts)]
        out = []
        for route in router.route(requests):
            adapter = serving.get(route.adapter) if route.adapter else None
            out.append(name_for(adapter) if adapter is not None else BASE_MODEL_NAME)
        return out

    return names


def stable_names(manifest: BankManifest, stable_name: str) -> dict[str, str]:
    """Adapter -> the served name promotion loads it under."""
    return {a.name: served_name(stable_name, a.name, a.version) for a in manifest.serving}


__all__ = ["BankCandidate", "bank_candidate", "is_bundle", "load_bundle", "router_names", "stable_names",
           "version_floor", "write_bundle"]
