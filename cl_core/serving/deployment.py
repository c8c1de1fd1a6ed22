"""Several vLLM replicas under one stable adapter name: staged versions, all-or-none switches, rollback.

See `cl_core.serving.client` for what vLLM 0.32 does and why the switch is built this way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from cl_core.bank.manifest import BankManifest, served_name
from cl_core.errors import InvalidInputError
from cl_core.serving.client import (
    BASE_MODEL_NAME,
    DEFAULT_TIMEOUT_S,
    STABLE_NAME,
    InconsistentDeployment,
    PromotionFailed,
    ServingError,
    StageFailed,
    VLLMServer,
    _check_name,
)

log = logging.getLogger(__name__)

# --- several replicas under one stable name ---------------------------------------------------------------------
@dataclass(frozen=True)
class PromotionResult:
    """What a promotion (or rollback) did, with timings in seconds.

    `latency_s` runs from the `promote` call to the first response served under the stable name by the new
    version; `first_response_s` is each replica's verification request alone.
    """

    version_name: str
    path: str
    stable_name: str
    replicas: tuple[str, ...]
    previous: dict[str, str | None]
    stage_s: float
    switch_s: float
    latency_s: float
    first_response_s: dict[str, float] = field(default_factory=dict)
    kind: str = "promotion"

    def as_metrics(self) -> dict[str, float]:
        return {"promotion_stage_s": self.stage_s, "promotion_switch_s": self.switch_s,
                "promotion_latency_s": self.latency_s}


class Deployment:
    """The replicas clients reach under one stable adapter name, switched together.

    Guarantees. Operations of one `Deployment` object are serialized (a lock); two processes must not promote at
    the same time, which the flow enforces with a Prefect concurrency limit, since vLLM has no compare-and-swap.
    - `stage`: the versioned name is loaded on every replica or on none.
    - `switch`: replicas are switched one after another, in the order given. Before touching any replica, all are
      asked what they serve (an unreachable one stops the switch there, nothing changed). If a replica fails, the
      replicas already switched are switched back to what they served before (or the stable name is unloaded
      again if it was not loaded), so the deployment is never left half-promoted; `PromotionFailed` says what
      happened on each replica, including a restore that itself failed (then run a rollback).
    - `promote` / `rollback`: stage, switch, then one request under the stable name per replica; if that fails,
      every replica is switched back. The versioned name stays loaded (a retry reuses it; `retire` frees it).

    What clients of the stable name see during a switch: on one replica, requests that start after its reload
    returns get the new version, and the name is never missing (the reload is in place: no 404 window). Requests
    in flight at that moment may finish on a mix of the two versions (vLLM swaps the weights between scheduler
    steps). Across replicas, between the first and the last reload (one adapter load and a cache reset each, tens
    of ms for small adapters) a client may reach either version depending on which replica serves it. After a
    failed switch everyone is back on the previous version.
    """

    def __init__(self, replicas: Sequence[str | VLLMServer], stable_name: str = STABLE_NAME,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if isinstance(replicas, str) or not replicas:
            raise InvalidInputError("replicas must be a non-empty list of server URLs (CL_VLLM_URLS, "
                                    f"comma-separated), got {replicas!r}")
        _check_name(stable_name)
        if stable_name == BASE_MODEL_NAME:
            raise InvalidInputError(f"the stable name cannot be the base model's name '{BASE_MODEL_NAME}'")
        self.servers = [r if isinstance(r, VLLMServer) else VLLMServer(r, timeout=timeout) for r in replicas]
        urls = [s.base_url for s in self.servers]
        if len(set(urls)) != len(urls):
            raise InvalidInputError(f"replicas are listed twice: {urls}")
        self.stable_name = stable_name
        self._lock = threading.RLock()

    @property
    def replicas(self) -> tuple[str, ...]:
        return tuple(s.base_url for s in self.servers)

    def close(self) -> None:
        for server in self.servers:
            server.close()

    # --- state ----------------------------------------------------------------------------------------------------
    def current(self) -> dict[str, str | None]:
        """Replica -> the path the stable name serves there (None: not loaded). Raises if one is unreachable."""
        return {s.base_url: s.models().get(self.stable_name) for s in self.servers}

    def check_consistent(self) -> str | None:
        """The path every replica serves under the stable name (None: none has it); raises
        `InconsistentDeployment` when they differ."""
        current = self.current()
        paths = set(current.values())
        if len(paths) != 1:
            raise InconsistentDeployment(self.stable_name, current)
        return paths.pop()

    def _survey(self, name: str) -> tuple[dict[str, str | None], dict[str, str]]:
        """What `name` serves on each replica, and the replicas that could not say (before touching any)."""
        serving: dict[str, str | None] = {}
        failures: dict[str, str] = {}
        for server in self.servers:
            try:
                serving[server.base_url] = server.models().get(name)
            except ServingError as exc:
                failures[server.base_url] = str(exc)
        return serving, failures

    # --- operations ---------------------------------------------------------------------------------------------
    def stage(self, version_name: str, path: str) -> None:
        """Load `path` under `version_name` on every replica, or on none (those that took it unload it again).

        A replica that already serves `version_name` from the same path counts as done (a retried stage); the
        same name with another path is refused: version names must be unique per version.
        """
        self._check_version_name(version_name)
        with self._lock:
            before, unreachable = self._survey(version_name)
            if unreachable:
                raise StageFailed("stage", f"{version_name} ({path})", unreachable, {})
            taken: list[VLLMServer] = []
            failures: dict[str, str] = {}
            for server in self.servers:
                try:
                    served = before[server.base_url]
                    if served == path:
                        continue
                    if served is not None:
                        raise ServingError(f"'{version_name}' already serves {served}; version names must be "
                                           f"unique per version (unload it or pick a new name)")
                    server.load_adapter(version_name, path)
                    taken.append(server)
                except ServingError as exc:
                    failures[server.base_url] = str(exc)
                    break
            if failures:
                restored = {}
                for server in taken:
                    restored[server.base_url] = _attempt(lambda s=server: s.unload_adapter(version_name))
                raise StageFailed("stage", f"{version_name} ({path})", failures, restored)

    def switch(self, path: str) -> dict[str, str | None]:
        """Make the stable name serve `path` on every replica, or on none; returns what each served before.

        First time on a replica: a plain load. Afterwards: an in-place reload. Either way, then a prefix-cache
        reset (KV blocks of a reloaded path may have been computed with its previous files).
        """
        if not isinstance(path, str) or not path:
            raise InvalidInputError(f"adapter path must be a non-empty str, got {path!r}")
        with self._lock:
            return self._switch(path)

    def _switch(self, path: str) -> dict[str, str | None]:
        previous, unreachable = self._survey(self.stable_name)
        if unreachable:
            raise PromotionFailed("switch", path, unreachable, {})
        done: list[VLLMServer] = []
        failures: dict[str, str] = {}
        for server in self.servers:
            try:
                server.load_adapter(self.stable_name, path, inplace=previous[server.base_url] is not None)
            except ServingError as exc:
                failures[server.base_url] = str(exc)
                # A load that timed out may still have happened: ask, and put the replica back if it did.
                if _serving(server, self.stable_name) not in (previous[server.base_url], _UNKNOWN):
                    done.append(server)
                break
            done.append(server)
            try:
                server.reset_prefix_cache()
            except ServingError as exc:
                failures[server.base_url] = str(exc)
                break
        if failures:
            restored = {s.base_url: self._restore(s, previous[s.base_url]) for s in done}
            raise PromotionFailed("switch", path, failures, restored)
        return previous

    def _point(self, server: VLLMServer, path: str, loaded: bool) -> None:
        server.load_adapter(self.stable_name, path, inplace=loaded)
        server.reset_prefix_cache()

    def _restore(self, server: VLLMServer, previous: str | None) -> str:
        if previous is None:
            return _attempt(lambda: server.unload_adapter(self.stable_name))
        return _attempt(lambda: self._point(server, previous, loaded=True))

    def retire(self, name: str) -> None:
        """Unload a version name from every replica (where it is loaded). Refuses the stable name and the version
        whose path the stable name serves now (that one is the rollback target of the running deployment)."""
        _check_name(name)
        if name == self.stable_name:
            raise InvalidInputError(f"'{name}' is the stable name clients use; it is never retired")
        with self._lock:
            states = [(s, s.models()) for s in self.servers]
            for server, models in states:
                if name in models and models[name] == models.get(self.stable_name):
                    raise InvalidInputError(f"'{name}' ({models[name]}) is what '{self.stable_name}' serves on "
                                            f"{server.base_url}; promote another version before retiring it")
            for server, models in states:
                if name in models:
                    server.unload_adapter(name)

    def promote(self, version_name: str, path: str) -> PromotionResult:
        """Stage `path` as `version_name` everywhere, switch the stable name to it everywhere, and verify with a
        first request under the stable name on each replica. Any failure leaves the previous version serving."""
        return self._promote(version_name, path, "promotion")

    def rollback(self, path: str, version_name: str) -> PromotionResult:
        """Serve an older registered version again: the same stage + switch + verify as a promotion."""
        return self._promote(version_name, path, "rollback")

    def _promote(self, version_name: str, path: str, kind: str) -> PromotionResult:
        with self._lock:
            return self._promote_locked(version_name, path, kind)

    def _promote_locked(self, version_name: str, path: str, kind: str) -> PromotionResult:
        start = time.perf_counter()
        self.stage(version_name, path)
        staged = time.perf_counter()
        previous = self._switch(path)
        switched = time.perf_counter()
        first: dict[str, float] = {}
        latency = 0.0
        failures: dict[str, str] = {}
        for server in self.servers:
            t0 = time.perf_counter()
            try:
                server.chat(self.stable_name, ["Hello"], max_tokens=1)
                serving = server.models().get(self.stable_name)
                if serving != path:
                    raise ServingError(f"'{self.stable_name}' serves {serving} after the switch, not {path}")
            except ServingError as exc:
                failures[server.base_url] = str(exc)
                continue
            now = time.perf_counter()
            first[server.base_url] = now - t0
            latency = latency or now - start
        if failures:
            restored = {s.base_url: self._restore(s, previous[s.base_url]) for s in self.servers}
            raise PromotionFailed("verification", f"{version_name} ({path})", failures, restored)
        log.info("%s of %s (%s) on %d replica(s): %.3f s to first response", kind, version_name, path,
                 len(self.servers), latency)
        return PromotionResult(version_name=version_name, path=path, stable_name=self.stable_name,
                               replicas=self.replicas, previous=previous, stage_s=staged - start,
                               switch_s=switched - staged, latency_s=latency, first_response_s=first, kind=kind)

    def promote_bank(self, manifest: BankManifest, manifest_path: str | Path) -> PromotionResult:
        """Serve a whole bank: every adapter version it names is loaded under its served name on every replica
        (or the ones this call loaded are unloaded again), each answers one request on each replica, and only
        then is `manifest_path` (what the gateways route by) replaced, atomically. Clients of the gateway switch
        from one manifest to the next between two requests; no replica ever serves half a bank."""
        with self._lock:
            start = time.perf_counter()
            names = {a.name: served_name(self.stable_name, a.name, a.version) for a in manifest.serving}
            loaded = {s.base_url: s.models() for s in self.servers}
            before = {url: set(models) for url, models in loaded.items()}
            staged: list[str] = []
            kept: dict[str, str] = {}
            try:
                for adapter in manifest.serving:
                    name = names[adapter.name]
                    where = {models.get(name) for models in loaded.values()}
                    if None not in where and len(where) == 1:
                        # Served names are unique per lineage version: loaded everywhere means these weights
                        # (an adapter this round did not change), already serving; nothing reloads.
                        kept[adapter.name] = str(where.pop())
                        continue
                    self.stage(name, adapter.path)
                    staged.append(name)
                staged_at = time.perf_counter()
                failures: dict[str, str] = {}
                first: dict[str, float] = {}
                for server in self.servers:
                    t0 = time.perf_counter()
                    try:
                        for name in names.values():
                            server.chat(name, ["Hello"], max_tokens=1)
                    except ServingError as exc:
                        failures[server.base_url] = str(exc)
                    first[server.base_url] = time.perf_counter() - t0
                if failures:
                    raise PromotionFailed("verification", f"bank ({', '.join(names.values())})", failures, {})
            except ServingError:
                for server in self.servers:  # unload what this promotion loaded; what served before stays
                    for name in staged:
                        if name not in before[server.base_url]:
                            _attempt(lambda s=server, n=name: s.unload_adapter(n))
                raise
            if kept:
                manifest = BankManifest(manifest.base_model, manifest.router, manifest.router_dir,
                                        tuple(replace(a, path=kept.get(a.name, a.path)) for a in manifest.adapters),
                                        dict(manifest.metadata))
            path = Path(manifest_path)
            previous = BankManifest.load(path) if path.exists() else None
            manifest.save(path)
            done = time.perf_counter()
        log.info("bank promoted on %d replica(s): %s", len(self.servers), ", ".join(names.values()))
        return PromotionResult(version_name=",".join(names.values()), path=str(path), stable_name=self.stable_name,
                               replicas=self.replicas,
                               previous={s.base_url: (",".join(previous.served_names(self.stable_name).values())
                                                      if previous else None) for s in self.servers},
                               stage_s=staged_at - start, switch_s=done - staged_at, latency_s=done - start,
                               first_response_s=first, kind="bank promotion")

    def _check_version_name(self, name: str) -> None:
        _check_name(name)
        if name in (self.stable_name, BASE_MODEL_NAME):
            raise InvalidInputError(f"a version needs its own name (e.g. {self.stable_name}@v7), not '{name}'")


_UNKNOWN = "<unknown>"


def _serving(server: VLLMServer, name: str) -> str | None:
    """What `name` serves on `server`, or `_UNKNOWN` when the server cannot say."""
    try:
        return server.models().get(name)
    except ServingError:
        return _UNKNOWN


def _attempt(action: Callable[[], None]) -> str:
    try:
        action()
        return "restored"
    except ServingError as exc:
        return f"restore failed: {exc}"
