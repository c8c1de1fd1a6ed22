"""Which vLLM model name answers a request: the bank manifest + its router, held in memory, reloaded on change.

The request path reads nothing from disk: `BankRouting` keeps one immutable `BankState` (manifest, router,
embedder, served-name maps) and swaps it whole when the manifest changes (`reload`, called by `POST
/admin/reload` and by the gateway's watcher when the file's mtime/size/inode change). A manifest that fails to
load leaves the previous state serving and is reported (`/v1/bank`, `/health`, the reload answer).

Routing rules (`route` for the stable name, `describe` for any other name):
- a manifest: the router picks an adapter (or none); a serving adapter maps to its versioned name
  (`continual-facts@v3`), anything else (none, retired, unknown to the manifest) to the base;
- no manifest: the stable name as the replicas serve it (a `Deployment`'s `continual`), else the base;
- any other model name passes through unchanged, labelled with what the gateway knows about it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_core.bank.manifest import MANIFEST_FILE, BankManifest, ManifestAdapter, served_name
from cl_core.bank.router import Route, Router, RouteRequest, load_router, make_router
from cl_core.errors import CheckpointError, ContinualError
from cl_core.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

KIND_ADAPTER = "adapter"
KIND_BASE = "base"
KIND_OTHER = "other"


@dataclass(frozen=True)
class Decision:
    """Where one request goes and why: what the response headers and its `cl` object report.

    `kind`: `adapter` (a bank adapter version), `base` (the bare base model) or `other` (a name the bank does not
    know: the replicas' stable name without a manifest, or an adapter loaded by hand). `adapter_path` is set for
    bank adapters, so a replica that lost the name can load it again.
    """

    served_model: str
    kind: str
    adapter: str | None = None
    version: int | None = None
    score: float | None = None
    router: str = ""
    reason: str = ""
    routed: bool = False
    adapter_path: str | None = None

    @property
    def label(self) -> str:
        """`x-cl-adapter`: the adapter's name, `base`, or the served name when the bank does not know it."""
        if self.kind == KIND_ADAPTER:
            return self.adapter or ""
        return "base" if self.kind == KIND_BASE else self.served_model

    def headers(self) -> dict[str, str]:
        return {"x-cl-adapter": self.label,
                "x-cl-adapter-version": "none" if self.version is None else str(self.version),
                "x-cl-served-model": self.served_model,
                "x-cl-route-score": "none" if self.score is None else f"{self.score:.6g}",
                "x-cl-router": self.router or "none"}

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.label, "version": self.version, "served_model": self.served_model,
                "route_score": self.score, "router": self.router or None, "reason": self.reason,
                "routed": self.routed}

    def as_base(self, base_name: str, reason: str) -> Decision:
        """The same request sent to the base instead (a stable name the replicas turned out not to serve)."""
        return Decision(base_name, KIND_BASE, None, None, None, self.router, reason, self.routed)


@dataclass(frozen=True)
class BankState:
    """One loaded manifest and everything derived from it; never mutated (a reload builds a new one)."""

    manifest: BankManifest | None = None
    router: Router | None = None
    embedder: Any = None
    served: dict[str, str] = field(default_factory=dict)
    """Serving adapter -> its versioned served name."""
    by_served: dict[str, ManifestAdapter] = field(default_factory=dict)
    """Versioned served name -> the adapter (its `path` resolved against the manifest's directory)."""
    stamp: tuple[int, int, int] | None = None
    loaded_at: float = 0.0
    embed_key: tuple[str, int | None] | None = None
    """(model, layer) `embedder` was built for (reused by the next load while it is the same)."""


def file_stamp(path: Path | None) -> tuple[int, int, int] | None:
    """(mtime_ns, size, inode): changes on every rewrite, including an atomic `os.replace` in the same tick."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _resolve(path: str, root: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (root / p).resolve())


def _finite(score: float) -> float | None:
    return None if score is None or (isinstance(score, float) and math.isnan(score)) else float(score)


class BankRouting:
    """The bank as the gateway sees it. `route` / `describe` are cheap and read memory only; `reload` does I/O.

    `embedder_factory(model, layer)` builds the prompt embedder for routers that `needs_embeddings` (default
    `cl_core.bank.embedder.BaseEmbedder`; `layer` is the one the router's state records, None for the default);
    one embedder is kept across reloads while model and layer stay the same.
    `upstream_models` is what the replicas serve (the app refreshes it), used when there is no manifest.
    """

    def __init__(self, settings: GatewaySettings,
                 embedder_factory: Callable[[str, int | None], Any] | None = None) -> None:
        self.settings = settings
        self.path = self._manifest_file(settings.manifest_path)
        self._embedder_factory = embedder_factory
        self._state = BankState()
        self._lock = threading.Lock()
        self.error: str | None = None
        self.error_at: float | None = None
        self.upstream_models: frozenset[str] = frozenset()
        self._versioned = re.compile(rf"^{re.escape(settings.stable_name)}-(?P<adapter>.+)@v(?P<version>\d+)$")

    @staticmethod
    def _manifest_file(path: Path | None) -> Path | None:
        if path is None:
            return None
        path = Path(path)
        return path / MANIFEST_FILE if path.is_dir() else path

    @property
    def state(self) -> BankState:
        return self._state

    @property
    def needs_embeddings(self) -> bool:
        router = self._state.router
        return bool(router is not None and router.needs_embeddings)

    # --- loading ----------------------------------------------------------------------------------------------
    def changed(self) -> bool:
        """True when the manifest file differs from the loaded one (one stat call)."""
        return file_stamp(self.path) != self._state.stamp

    def reload(self, force: bool = False) -> bool:
        """Load the manifest again if it changed (or `force`); True when a new state was installed.

        A missing file means no bank (the no-manifest rules). A file that cannot be used raises
        `CheckpointError`/`ConfigError` and leaves the previous state serving; the error stays visible in
        `info()` until a load succeeds.
        """
        with self._lock:
            stamp = file_stamp(self.path)
            if not force and stamp == self._state.stamp:
                return False
            try:
                state = self._load(stamp)
            except ContinualError as exc:
                self.error, self.error_at = str(exc), time.time()
                log.error("bank manifest %s not loaded, the previous state keeps serving: %s", self.path, exc)
                raise
            except Exception as exc:  # a router or embedder bug must not take the served path down
                self.error, self.error_at = f"{type(exc).__name__}: {exc}", time.time()
                log.exception("bank manifest %s not loaded, the previous state keeps serving", self.path)
                raise CheckpointError(f"the bank manifest {self.path} could not be loaded: {self.error}") from exc
            self._state, self.error, self.error_at = state, None, None
            if state.manifest is None:
                log.info("no bank manifest at %s: '%s' goes to the replicas' stable name or the base", self.path,
                         self.settings.stable_name)
            else:
                log.info("bank manifest %s loaded: router %s, adapters %s", self.path, state.manifest.router,
                         ", ".join(f"{a}->{s}" for a, s in state.served.items()) or "none")
            return True

    def _load(self, stamp: tuple[int, int, int] | None) -> BankState:
        if stamp is None or self.path is None:
            return BankState(stamp=stamp, loaded_at=time.time())
        manifest = BankManifest.load(self.path)
        root = self.path.parent
        if manifest.router_dir:
            router = load_router(_resolve(manifest.router_dir, root))
        else:  # no saved state: a fresh router that knows the serving adapters (task_id needs nothing else)
            router = make_router(manifest.router)
            for adapter in manifest.serving:
                router.add_adapter(adapter.name)
        embedder, embed_key = None, None
        if router.needs_embeddings:
            # Embed in the space the router was fitted in: its recorded layer, and its own identity check when
            # it has one (embedding routers refuse an embedder of another base model, layer or pooling).
            identity = getattr(router, "embedder_identity", None)
            layer = identity.get("layer") if isinstance(identity, dict) else None
            embed_key = (self.settings.embed_model or manifest.base_model, layer)
            embedder = self._embedder_for(*embed_key)
            check = getattr(router, "check_embedder", None)
            if callable(check):
                check(embedder)
        stable = self.settings.stable_name
        served = manifest.served_names(stable)
        by_served = {served_name(stable, a.name, a.version): ManifestAdapter(a.name, a.version,
                                                                             _resolve(a.path, root), a.status)
                     for a in manifest.serving}
        return BankState(manifest, router, embedder, served, by_served, stamp, time.time(), embed_key)

    def _embedder_for(self, model: str, layer: int | None) -> Any:
        if self._state.embedder is not None and self._state.embed_key == (model, layer):
            return self._state.embedder
        if self._embedder_factory is not None:
            return self._embedder_factory(model, layer)
        from cl_core.bank.embedder import BaseEmbedder

        return BaseEmbedder(model, layer=layer)

    def set_upstream_models(self, names: Iterable[str]) -> None:
        self.upstream_models = frozenset(names)

    # --- routing ----------------------------------------------------------------------------------------------
    def route(self, prompt: str, task: str | None, embedding: Any = None, state: BankState | None = None
              ) -> Decision:
        """The decision for a request that asked for the stable name (memory only; microseconds for `task_id`)."""
        state = state or self._state
        base, stable = self.settings.base_name, self.settings.stable_name
        if state.manifest is None or state.router is None:
            if stable in self.upstream_models:
                return Decision(stable, KIND_OTHER, None, None, None, "", "no bank manifest: the replicas' "
                                f"'{stable}'", True)
            return Decision(base, KIND_BASE, None, None, None, "", "no bank manifest and the replicas serve no "
                            f"'{stable}': base model", True)
        router = state.router
        try:
            route: Route = router.resolve(RouteRequest(prompt, task, embedding))
        except Exception as exc:  # a router that fails on one request must not fail the request
            log.warning("router %s failed on a request, answering with the base: %s", router.name, exc)
            return Decision(base, KIND_BASE, None, None, None, router.name, f"router error ({exc}): base model",
                            True)
        score = _finite(route.score)
        if route.adapter is None:
            return Decision(base, KIND_BASE, None, None, score, router.name, route.reason or "base model", True)
        served = state.served.get(route.adapter)
        if served is None:
            return Decision(base, KIND_BASE, None, None, score, router.name,
                            f"router chose '{route.adapter}', which the manifest does not serve: base model", True)
        adapter = state.by_served[served]
        return Decision(served, KIND_ADAPTER, adapter.name, adapter.version, score, router.name,
                        route.reason, True, adapter.path)

    async def aroute(self, prompt: str, task: str | None) -> Decision:
        """`route`, embedding the prompt first (in a worker thread) when the router needs embeddings."""
        state = self._state
        router = state.router
        if router is None or not router.needs_embeddings:
            return self.route(prompt, task, None, state)
        if not prompt.strip():
            return Decision(self.settings.base_name, KIND_BASE, None, None, None, router.name,
                            "no prompt text to embed: base model", True)
        try:
            vectors = await asyncio.to_thread(state.embedder.embed, [prompt])
        except Exception as exc:
            log.warning("embedding a prompt failed, answering with the base: %s", exc)
            return Decision(self.settings.base_name, KIND_BASE, None, None, None, router.name,
                            f"embedding failed ({exc}): base model", True)
        return self.route(prompt, task, vectors[0], state)

    def describe(self, model: str) -> Decision:
        """The decision for a request that named a model itself (passed through unchanged)."""
        state = self._state
        if model == self.settings.base_name:
            return Decision(model, KIND_BASE, reason="base model named by the client")
        adapter = state.by_served.get(model)
        if adapter is not None:
            return Decision(model, KIND_ADAPTER, adapter.name, adapter.version, None, "",
                            "adapter version named by the client", False, adapter.path)
        match = self._versioned.match(model)
        if match:
            return Decision(model, KIND_ADAPTER, match["adapter"], int(match["version"]), None, "",
                            "adapter version named by the client (not the manifest's)")
        return Decision(model, KIND_OTHER, reason="model named by the client")

    # --- reporting --------------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What `/v1/bank` answers: the manifest, its router, the served names, and any load error."""
        state = self._state
        return {"object": "bank", "manifest_path": str(self.path) if self.path else None,
                "manifest": state.manifest.to_dict() if state.manifest else None,
                "router": state.router.name if state.router else None,
                "needs_embeddings": self.needs_embeddings,
                "served_names": dict(state.served), "stable_name": self.settings.stable_name,
                "base_name": self.settings.base_name, "loaded_at": state.loaded_at or None,
                "error": self.error, "error_at": self.error_at}


__all__ = ["BankRouting", "BankState", "Decision", "file_stamp"]
