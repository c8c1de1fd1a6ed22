"""The gateway: an OpenAI-compatible HTTP front of the vLLM replicas that routes each request through the bank.

- `settings`: `GatewaySettings` (upstreams, stable name, manifest path, limits; `from_env()`).
- `routing`: the bank manifest + router held in memory, a request -> the served vLLM model name.
- `app`: `create_app(settings)` (FastAPI), the `InteractionSink` capture hook.

`python -m cl_core.gateway --port 8080 --upstream http://127.0.0.1:8000` runs it (uvicorn). Importing this package
imports nothing heavy: `create_app` is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cl_core.gateway.settings import GatewaySettings

if TYPE_CHECKING:
    from cl_core.gateway.app import Interaction, InteractionSink, NoopSink, create_app

_LAZY = {"create_app", "Interaction", "InteractionSink", "NoopSink"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from cl_core.gateway import app

        return getattr(app, name)
    raise AttributeError(f"module 'cl_core.gateway' has no attribute {name!r}")


__all__ = ["GatewaySettings", "Interaction", "InteractionSink", "NoopSink", "create_app"]
