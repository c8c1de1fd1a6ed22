"""The router contract: one request in, the adapter of the bank that should answer it (or none: the base model).

Shaped like vLLM's `LoRAResolver.resolve_lora(base_model_name, lora_name) -> LoRARequest | None`: a router
resolves a request to an adapter handle or to nothing, and is registered by name (`ROUTERS`). A router never
holds adapter weights or versions; it names an adapter of the bank (`Route.adapter`), and the bank maps that
name to the version it serves now. So the same router state routes in the library (`ContinualLLM.generate`), in
the pipeline's evaluation and in the gateway.

Every router follows one recipe (one file in `cl_core/bank/routers/`, registered with `@ROUTERS.register(name)`):
- `route(requests)` answers a batch (one `Route` per request, in order);
- `observe(adapter, prompts, embeddings)` tells it what an adapter has learned (prompts assigned to it);
- `fit(out_of_scope)` recalibrates from what it observed plus prompts that belong to no adapter;
- `state_dict()` / `load_state_dict()` hold everything it knows (tensors + JSON, saved as safetensors + JSON by
  `save_router` / `load_router`, atomically).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cl_core.errors import CheckpointError, InvalidInputError
from cl_core.registry import Registry

ROUTER_STATE_TENSORS = "router.safetensors"
ROUTER_STATE_META = "router.json"


@dataclass(frozen=True)
class RouteRequest:
    """What a router sees of one request.

    `task`: a task id the caller named (the `task_id` router's input; None when the caller named none).
    `embedding`: the prompt in the frozen base model's embedding space (`cl_core.bank.embedder`), filled in by the
    caller when the router `needs_embeddings`; a 1-D float32 array, L2-normalised.
    """

    prompt: str
    task: str | None = None
    embedding: np.ndarray | None = None


@dataclass(frozen=True)
class Route:
    """Where one request goes: `adapter` is a bank adapter name, or None for the bare base model.

    `score` is the router's own confidence in that choice (cosine similarity, class probability, 1.0 for an
    explicit task id; NaN when it has none); `reason` says why in words (for logs and answers).
    """

    adapter: str | None
    score: float = math.nan
    router: str = ""
    reason: str = ""

    @property
    def is_base(self) -> bool:
        return self.adapter is None

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "score": None if math.isnan(self.score) else float(self.score),
                "router": self.router, "reason": self.reason}


class Router(ABC):
    """Base class of every router (see the module docstring for the recipe)."""

    name: ClassVar[str] = ""
    needs_embeddings: ClassVar[bool] = False
    """True when `route`/`observe` need `RouteRequest.embedding` (the bank computes embeddings only then)."""

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.option_names()))
        if unknown:
            raise InvalidInputError(f"router {self.name!r} has no option {', '.join(unknown)}; its options: "
                                    f"{', '.join(self.option_names()) or 'none'}")
        self.options = dict(options)
        self.adapters: list[str] = []

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Keyword options the constructor accepts (saved with the state)."""
        return ()

    # --- the bank tells the router what exists --------------------------------------------------------------
    def add_adapter(self, adapter: str) -> None:
        """A new adapter joined the bank (it receives no traffic until the router has a reason to send it)."""
        if adapter not in self.adapters:
            self.adapters.append(adapter)

    def remove_adapter(self, adapter: str) -> None:
        """An adapter was retired: never route to it again (restoring it calls `add_adapter` + `observe`)."""
        if adapter in self.adapters:
            self.adapters.remove(adapter)

    def observe(self, adapter: str, prompts: Sequence[str], embeddings: np.ndarray | None = None) -> None:
        """`prompts` (with their embeddings when `needs_embeddings`) were learned by `adapter`."""
        self.add_adapter(adapter)

    def fit(self, out_of_scope: np.ndarray | None = None) -> dict[str, float]:
        """Recalibrate from everything observed; `out_of_scope` holds embeddings of prompts no adapter should
        take (they must reach the base). Returns calibration statistics (e.g. threshold, recall, rejection)."""
        return {}

    # --- routing ----------------------------------------------------------------------------------------------
    @abstractmethod
    def route(self, requests: Sequence[RouteRequest]) -> list[Route]:
        """One `Route` per request, in order."""

    def resolve(self, request: RouteRequest) -> Route:
        """One request (the `LoRAResolver`-shaped call)."""
        return self.route([request])[0]

    # --- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays (saved as safetensors) and JSON-able metadata that restore this router exactly."""
        return {}, {"adapters": list(self.adapters)}

    def load_state_dict(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned."""
        self.adapters = list(meta.get("adapters", []))


def _load_builtin_routers() -> None:
    import cl_core.bank.routers  # noqa: F401 - importing the package registers the built-in routers


ROUTERS: Registry[type[Router]] = Registry("router", loader=_load_builtin_routers)


def make_router(name: str, **options: Any) -> Router:
    """The router registered as `name` (unknown names list the known ones)."""
    return ROUTERS.get(name)(**options)


def check_requests(requests: Sequence[RouteRequest], needs_embeddings: bool) -> None:
    """Clear errors for malformed batches (a router must never crash on its input)."""
    if isinstance(requests, RouteRequest) or not isinstance(requests, (list, tuple)):
        raise InvalidInputError(f"route() takes a list of RouteRequest, got {type(requests).__name__}")
    for i, request in enumerate(requests):
        if not isinstance(request, RouteRequest):
            raise InvalidInputError(f"requests[{i}] must be a RouteRequest, got {type(request).__name__}")
        if needs_embeddings and request.embedding is None:
            raise InvalidInputError(f"requests[{i}] has no embedding, and this router routes by embedding; embed "
                                    "the prompt with cl_core.bank.embedder.BaseEmbedder first")


def save_router(router: Router, directory: str | os.PathLike[str]) -> Path:
    """Write `router.safetensors` + `router.json` into `directory`, atomically (a temporary sibling renamed)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    tensors, meta = router.state_dict()
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / ROUTER_STATE_TENSORS))
        (tmp / ROUTER_STATE_META).write_text(json.dumps(
            {"router": router.name, "options": router.options, "state": meta}, indent=1))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_router(directory: str | os.PathLike[str]) -> Router:
    """Rebuild a router saved by `save_router` (same name, options and state)."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    try:
        meta = json.loads((directory / ROUTER_STATE_META).read_text())
        tensors = load_file(str(directory / ROUTER_STATE_TENSORS))
        router = make_router(meta["router"], **meta.get("options", {}))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"no readable router state in {directory}: {exc}") from exc
    router.load_state_dict(tensors, meta.get("state", {}))
    return router


__all__ = ["ROUTERS", "Route", "RouteRequest", "Router", "check_requests", "load_router", "make_router",
           "save_router"]
