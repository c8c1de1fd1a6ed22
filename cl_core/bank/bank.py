"""`AdapterBank`: the adapters of one model, which experience trains which adapter, and which adapter answers.

Why: one adapter that learns everything breaks what it never meant to touch (a correction of a fictional capital
turned real capitals into nonsense: locality 0.08 after 16 corrections). A bank keeps new knowledge in the adapter
that the requests it fits reach, and sends everything else to the base model it had (WISE, arXiv 2405.14768:
locality 1.00 with its router, 0.72 without).

Two policies live here and nowhere else:
- **assignment** (`assign`): an experience whose task tag names an adapter trains that adapter; otherwise the
  router's choice; otherwise a new adapter while the bank has room (named after the task tag); otherwise the
  adapter the router finds nearest, ignoring its "none fits" threshold. Frozen and retired adapters never train.
- **routing** (`route`): each request goes to the adapter the router picks, served at its current version, or to
  the base model when the router says none fits (or picks an adapter with nothing published yet).

A model with one adapter (`num_adapters=1`) is a bank of one lineage that answers every request, exactly the
single-adapter behaviour the library always had.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cl_core.bank.lineage import AdapterLineage
from cl_core.bank.manifest import BankManifest, check_adapter_name
from cl_core.bank.router import Route, Router, RouteRequest
from cl_core.engine import AdapterHandle, EngineBase
from cl_core.errors import InvalidInputError, NothingToLearnError

log = logging.getLogger(__name__)
DEFAULT_ADAPTER = "default"


class AdapterBank:
    """The lineages of one model plus its router (`router` is None for a single-adapter model)."""

    def __init__(self, *, engine: EngineBase, adapters_dir: Path, capacity: int, router: Router | None,
                 make_methods: Callable[[], Any], embed: Callable[[Sequence[str]], np.ndarray] | None = None,
                 out_of_scope: Callable[[], np.ndarray | None] | None = None) -> None:
        self.engine = engine
        self.adapters_dir = Path(adapters_dir)
        self.capacity = capacity
        self.router = router
        self._make_methods = make_methods
        self._embed = embed
        self._out_of_scope = out_of_scope
        self.lineages: dict[str, AdapterLineage] = {}
        self.calibration: dict[str, float] = {}
        self.version_floor: dict[str, int] = {}
        """Adapter -> highest version used elsewhere (e.g. by registered candidates): new versions go above it,
        so a served name never stands for two different sets of weights."""
        if router is None:  # one adapter: its files stay where a single-adapter model always kept them
            self.lineages[DEFAULT_ADAPTER] = AdapterLineage(
                DEFAULT_ADAPTER, engine.claim_namespace("adapter"), self.adapters_dir, make_methods())

    @property
    def is_bank(self) -> bool:
        return self.router is not None

    # --- lifecycle of adapters ------------------------------------------------------------------------------
    def add(self, name: str, status: str = "active") -> AdapterLineage:
        """Open a new, empty adapter (it serves nothing until its first version is published)."""
        if not self.is_bank:
            raise InvalidInputError("this model has one adapter (num_adapters=1); build it with num_adapters > 1 "
                                    "to hold a bank of adapters")
        check_adapter_name(name)
        if name in self.lineages:
            raise InvalidInputError(f"the bank already has an adapter {name!r}")
        if len(self.lineages) >= self.capacity:
            raise InvalidInputError(f"the bank is full ({self.capacity} adapters, num_adapters); retire one or "
                                    "raise num_adapters")
        lineage = AdapterLineage(name, self.engine.claim_namespace(name), self.adapters_dir / name,
                                 self._make_methods(), status=status)
        lineage.next_version = self.version_floor.get(name, 0) + 1
        self.lineages[name] = lineage
        self.router.add_adapter(name)
        return lineage

    def raise_version_floor(self, floor: dict[str, int]) -> None:
        """Number every adapter's next versions above `floor` (existing lineages and ones opened later)."""
        for name, version in floor.items():
            self.version_floor[name] = max(self.version_floor.get(name, 0), int(version))
            if name in self.lineages:
                lineage = self.lineages[name]
                lineage.next_version = max(lineage.next_version, int(version) + 1)

    def get(self, name: str) -> AdapterLineage:
        if not isinstance(name, str) or name not in self.lineages:
            raise InvalidInputError(f"the bank has no adapter {name!r}; it has: {', '.join(self.lineages) or 'none'}")
        return self.lineages[name]

    def set_status(self, name: str, status: str) -> None:
        """`frozen`: serves, never trains again. `retired`: never routed to (its versions stay on disk).
        `active`: trains and serves (restores a frozen or retired adapter)."""
        lineage = self.get(name)
        lineage.status = status
        if self.router is None:
            return
        if status == "retired":
            self.router.remove_adapter(name)
            if lineage.current is not None:
                self.engine.retire(lineage.current)
        elif name not in self.router.adapters:
            self.router.add_adapter(name)
            if lineage.current is not None:
                self.engine.publish(lineage.current)
            self.refit(restore=name)

    # --- which adapter learns what ------------------------------------------------------------------------
    def check_trainable(self, task: str) -> None:
        """Refuse, before anything is stored, a correction tagged for an adapter that never trains."""
        lineage = self.lineages.get(task) if self.is_bank else None
        if lineage is not None and lineage.status != "active":
            raise InvalidInputError(f"task {task!r} names a {lineage.status} adapter, which never trains again; "
                                    f"restore it (set_adapter_status({task!r}, 'active')) or use another task")

    def assign(self, prompts: Sequence[str], tasks: Sequence[str]) -> list[str | None]:
        """The adapter that learns each (prompt, task tag), see the module docstring for the rule; None for an
        experience tagged for a frozen or retired adapter (it stays stored and untrained)."""
        if not self.is_bank:
            return [DEFAULT_ADAPTER] * len(prompts)
        out: list[str | None] = [None] * len(prompts)
        pending: list[int] = []
        for i, task in enumerate(tasks):
            lineage = self.lineages.get(task)
            if lineage is not None and lineage.status == "active":
                out[i] = task
            elif lineage is None:
                pending.append(i)
        if pending and self._trained():
            routes = self._raw_routes([prompts[i] for i in pending], [tasks[i] for i in pending])
            rest = []
            for i, route in zip(pending, routes, strict=True):
                if route.adapter is not None and self.lineages[route.adapter].status == "active":
                    out[i] = route.adapter
                else:
                    rest.append(i)
            pending = rest
        for i in pending:  # growth: one new adapter per unknown task tag while the bank has room
            task = tasks[i]
            if task in self.lineages and self.lineages[task].status == "active":
                out[i] = task
            elif len(self.lineages) < self.capacity:
                out[i] = self.add(self._new_name(task)).name
            else:
                out[i] = self._nearest_active(prompts[i])
        return out

    def _new_name(self, task: str) -> str:
        try:
            name = check_adapter_name(task)
        except InvalidInputError:
            name = "adapter"
        base, n = name, 1
        while name in self.lineages:
            n += 1
            name = f"{base}-{n}"
        return name

    def _nearest_active(self, prompt: str) -> str:
        active = [n for n, lineage in self.lineages.items() if lineage.status == "active"]
        if not active:
            raise NothingToLearnError("every adapter of the full bank is frozen or retired, so nothing can learn; "
                                      "restore one (set_adapter_status(name, 'active')) or raise num_adapters")
        scored = self._similarities(prompt, active)
        return max(scored, key=scored.get) if scored else active[-1]

    def _similarities(self, prompt: str, names: Sequence[str]) -> dict[str, float]:
        """Each adapter's score for `prompt` (routers that score every adapter, e.g. `embedding`)."""
        if self.router is None or self._embed is None or not hasattr(self.router, "scores"):
            return {}
        table, adapters = self.router.scores(self._embed([prompt]))
        return {n: float(table[0, j]) for j, n in enumerate(adapters) if n in names}

    def _trained(self) -> bool:
        return any(lineage.versions for lineage in self.lineages.values())

    # --- routing ----------------------------------------------------------------------------------------------
    def requests(self, prompts: Sequence[str], tasks: Sequence[str | None]) -> list[RouteRequest]:
        needs = self.router is not None and self.router.needs_embeddings
        vectors = self._embed(list(prompts)) if needs and self._embed is not None else None
        return [RouteRequest(p, t, None if vectors is None else vectors[i])
                for i, (p, t) in enumerate(zip(prompts, tasks, strict=True))]

    def _raw_routes(self, prompts: Sequence[str], tasks: Sequence[str | None]) -> list[Route]:
        assert self.router is not None
        return self.router.route(self.requests(prompts, tasks))

    def route(self, prompts: Sequence[str], tasks: Sequence[str | None] | None = None
              ) -> list[tuple[AdapterHandle | None, Route]]:
        """Which served version answers each prompt (None: the base model), with the router's decision."""
        tasks = list(tasks) if tasks is not None else [None] * len(prompts)
        if self.router is None:
            lineage = self.lineages[DEFAULT_ADAPTER]
            route = Route(DEFAULT_ADAPTER if lineage.current else None, math.nan, "single",
                          "the model's one adapter" if lineage.current else "nothing published yet: base model")
            return [(lineage.current, route)] * len(prompts)
        out = []
        for route in self._raw_routes(prompts, tasks):
            lineage = self.lineages.get(route.adapter) if route.adapter else None
            if lineage is None or not lineage.servable:
                if lineage is not None:
                    route = Route(None, route.score, route.router, f"{route.reason}; {lineage.name} has no served "
                                  "version: base model")
                out.append((None, route))
            else:
                out.append((lineage.current, route))
        return out

    # --- the router learns what each adapter knows ------------------------------------------------------------
    def observe(self, adapter: str, prompts: Sequence[str]) -> None:
        """`prompts` were learned by `adapter`: the router will send requests like them there."""
        if self.router is None or not prompts:
            return
        vectors = self._embed(list(prompts)) if self.router.needs_embeddings and self._embed else None
        self.router.observe(adapter, list(prompts), vectors)

    def refit(self, restore: str | None = None) -> dict[str, float]:
        """Recalibrate the router (its "none fits" threshold) on everything observed plus the out-of-scope set."""
        if self.router is None:
            return {}
        out_of_scope = self._out_of_scope() if self._out_of_scope and self.router.needs_embeddings else None
        self.calibration = dict(self.router.fit(out_of_scope))
        log.info("router %s refitted: %s", self.router.name, self.calibration)
        return self.calibration

    # --- what serves, as one manifest ------------------------------------------------------------------------
    def manifest(self, base_model: str, router_dir: str | None = None, metadata: dict[str, Any] | None = None
                 ) -> BankManifest:
        entries = tuple(e for lineage in self.lineages.values() if (e := lineage.manifest_entry()) is not None)
        return BankManifest(base_model=base_model, router=self.router.name if self.router else "single",
                            router_dir=router_dir, adapters=entries, metadata=dict(metadata or {}))

    def summary(self) -> list[dict[str, Any]]:
        return [lineage.summary() for lineage in self.lineages.values()]


__all__ = ["DEFAULT_ADAPTER", "AdapterBank"]
