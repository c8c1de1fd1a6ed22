"""One adapter's lineage: its published versions, the one being served, and its training state between rounds.

Why a class of its own: a bank is several adapters that learn and serve independently, so everything that used to
be "the" adapter of `ContinualLLM` (the served handle, the version log, the next version number, the learner's
weights and optimizer state, the anti-forgetting methods' state) belongs to one lineage. `ContinualLLM` with one
adapter has one lineage; a bank has one per adapter, and training one never touches another's files or state.

The learner (one float32 PyTorch copy of the base) is shared: a lineage that trains *checks out* its LoRA weights
and optimizer state into it and *checks in* afterwards, so N adapters cost N small LoRA states, not N base copies.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from cl_core.bank.manifest import ADAPTER_STATUSES, ManifestAdapter
from cl_core.engine import AdapterHandle, EngineBase
from cl_core.errors import InvalidInputError
from cl_core.reports import AdapterVersion

log = logging.getLogger(__name__)
VERSIONS_FILE = "versions.json"


class AdapterLineage:
    """The versions of one adapter of the bank, the handle vLLM serves now, and its saved training state.

    `name`: the adapter's bank name (`default` for a model with one adapter). `namespace`: its engine-unique
    prefix of served names (`<namespace>@v3`). `directory`: where its versions live (`v1/`, `v2/`, ...,
    `versions.json`).
    """

    def __init__(self, name: str, namespace: str, directory: Path, methods: Any, status: str = "active") -> None:
        if status not in ADAPTER_STATUSES:
            raise InvalidInputError(f"adapter {name!r}: status {status!r} is not one of {', '.join(ADAPTER_STATUSES)}")
        self.name = name
        self.namespace = namespace
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.methods = methods
        """This adapter's anti-forgetting methods (`MethodSet`): their memories and penalties cover its data only."""
        self.status = status
        self.current: AdapterHandle | None = None
        self.versions: list[AdapterVersion] = []
        self.next_version = 1
        self.learner_state: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]] | None = None
        """(LoRA weights, optimizer tensors, optimizer meta) between rounds; None: the learner's fresh init."""
        self.created_at = time.time()

    # --- what serves ----------------------------------------------------------------------------------------
    @property
    def current_version(self) -> AdapterVersion | None:
        if self.current is None:
            return None
        return next(v for v in self.versions if v.version == self.current.version)

    @property
    def servable(self) -> bool:
        """Requests may be routed here: it has a published version and is not retired."""
        return self.current is not None and self.status != "retired"

    def serve(self, engine: EngineBase, number: int, path: Path, reason: str, parent: int | None,
              created_at: float | None = None) -> AdapterVersion:
        """Publish version `number` from `path` into the engine; the previous version keeps serving until then."""
        handle = engine.new_handle(self.namespace, number, str(path))
        engine.publish(handle)  # raises PublishError; the previous version keeps serving
        previous, self.current = self.current, handle
        if previous is not None:
            engine.retire(previous)
        version = AdapterVersion(version=number, name=handle.name, path=str(path),
                                 created_at=created_at or time.time(), parent=parent, reason=reason,
                                 adapter=self.name)
        self.versions.append(version)
        self.versions.sort(key=lambda v: v.version)
        self.next_version = max(self.next_version, number + 1)
        self.write_log()
        log.info("published %s (%s)", handle.name, reason)
        return version

    def write_log(self) -> None:
        (self.directory / VERSIONS_FILE).write_text(json.dumps([v.to_dict() for v in self.versions], indent=2))

    def version_path(self, number: int) -> Path:
        return self.directory / f"v{number}"

    def manifest_entry(self) -> ManifestAdapter | None:
        """This adapter as the bank manifest names it (None before its first version)."""
        if self.current is None:
            return None
        return ManifestAdapter(name=self.name, version=self.current.version, path=self.current.path,
                               status=self.status)

    # --- training state -------------------------------------------------------------------------------------
    def check_out(self, learner: Any, fresh: dict[str, torch.Tensor]) -> None:
        """Put this adapter's LoRA weights and optimizer state into the shared learner (`fresh`: the learner's
        initial LoRA weights, for an adapter that never trained)."""
        if self.learner_state is None:
            learner.assign({k: v.clone() for k, v in fresh.items()})
            learner.optimizer.state.clear()
            return
        weights, tensors, meta = self.learner_state
        learner.assign(weights)
        learner.load_state_dict(tensors, meta)

    def check_in(self, learner: Any) -> None:
        """Keep the learner's LoRA weights and optimizer state as this adapter's (after training it)."""
        tensors, meta = learner.state_dict()
        self.learner_state = (learner.lora_state(), {k: v.clone() for k, v in tensors.items()}, meta)

    def summary(self) -> dict[str, Any]:
        current = self.current_version
        return {"name": self.name, "status": self.status, "version": current.version if current else None,
                "served_name": self.current.name if self.current else None, "versions": len(self.versions)}


__all__ = ["AdapterLineage"]
