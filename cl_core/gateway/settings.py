"""What the gateway needs to know: its upstream vLLM replicas, the bank manifest, where it listens, its limits.

Every field has an environment variable (`GatewaySettings.ENV`), so the stack and a shell configure it the same
way as every other client of the environment contract (`CL_VLLM_URLS`, `CL_ADAPTER_DIR`); `python -m
cl_core.gateway` flags win over them. Bound to loopback unless told otherwise: the gateway has no API keys yet.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from cl_core.bank.manifest import MANIFEST_FILE
from cl_core.errors import ConfigError
from cl_core.serving.client import BASE_MODEL_NAME, STABLE_NAME

BALANCE_POLICIES = ("least_busy", "round_robin")
DEFAULT_PORT = 8080
DEFAULT_UPSTREAM = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class GatewaySettings:
    """Settings of one gateway process (validated on construction; `from_env` reads the environment)."""

    upstreams: tuple[str, ...] = (DEFAULT_UPSTREAM,)
    """Root URLs of the vLLM OpenAI servers (a trailing `/v1` is dropped), env `CL_VLLM_URLS`, comma-separated."""
    balance: str = "least_busy"
    """`least_busy` (fewest requests in flight, ties in turn) or `round_robin`; an unreachable replica is skipped."""
    stable_name: str = STABLE_NAME
    """The model name clients ask for to be routed through the bank (`continual`)."""
    base_name: str = BASE_MODEL_NAME
    """The name the replicas serve the bare base model under (`vllm serve --served-model-name base`)."""
    manifest_path: Path | None = None
    """The bank manifest (`bank.json`): env `CL_BANK_MANIFEST`, else `$CL_ADAPTER_DIR/bank.json`; None: no bank."""
    embed_model: str | None = None
    """Model the embedding routers embed prompts with (default: the manifest's `base_model`)."""
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    connect_timeout_s: float = 5.0
    """Connecting to a replica; a replica that does not accept in time is treated as down (next one is tried)."""
    request_timeout_s: float = 600.0
    """Waiting for a replica's answer (or the next chunk of a stream): long generations are legitimate."""
    max_body_bytes: int = 4 * 2**20
    """Largest request body accepted (413 above it): a guard for the JSON parser, far above any chat request."""
    reload_interval_s: float = 1.0
    """How often the manifest file's mtime is checked (a changed file is reloaded in the background)."""
    models_refresh_s: float = 10.0
    """How often the replicas' model lists are refreshed (what `continual` falls back to without a manifest)."""
    max_connections: int = 256
    """Pooled connections per gateway to all replicas together (kept alive: no handshake per request)."""

    ENV: ClassVar[dict[str, str]] = {
        "upstreams": "CL_VLLM_URLS", "balance": "CL_GATEWAY_BALANCE", "stable_name": "CL_GATEWAY_STABLE_NAME",
        "base_name": "CL_GATEWAY_BASE_NAME", "manifest_path": "CL_BANK_MANIFEST",
        "embed_model": "CL_GATEWAY_EMBED_MODEL", "host": "CL_GATEWAY_HOST", "port": "CL_GATEWAY_PORT",
        "connect_timeout_s": "CL_GATEWAY_CONNECT_TIMEOUT", "request_timeout_s": "CL_GATEWAY_REQUEST_TIMEOUT",
        "max_body_bytes": "CL_GATEWAY_MAX_BODY_BYTES", "reload_interval_s": "CL_GATEWAY_RELOAD_INTERVAL",
        "models_refresh_s": "CL_GATEWAY_MODELS_REFRESH", "max_connections": "CL_GATEWAY_MAX_CONNECTIONS",
    }

    def __post_init__(self) -> None:
        ups = self.upstreams
        if isinstance(ups, str):
            ups = tuple(u for u in ups.split(","))
        ups = tuple(u.strip().rstrip("/").removesuffix("/v1") for u in ups if u and u.strip())
        if not ups:
            raise ConfigError(f"the gateway needs at least one vLLM upstream URL ({self.ENV['upstreams']}, "
                              "comma-separated, e.g. http://127.0.0.1:8000)")
        for url in ups:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"upstream {url!r} is not an http(s) URL of a vLLM server root "
                                  f"({self.ENV['upstreams']}, e.g. http://127.0.0.1:8000)")
        if len(set(ups)) != len(ups):
            raise ConfigError(f"upstreams are listed twice: {list(ups)}")
        object.__setattr__(self, "upstreams", ups)
        if self.balance not in BALANCE_POLICIES:
            raise ConfigError(f"balance {self.balance!r} is not one of {', '.join(BALANCE_POLICIES)} "
                              f"({self.ENV['balance']})")
        for name in ("stable_name", "base_name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip() or "/" in value:
                raise ConfigError(f"{name} must be a non-empty model name without '/', got {value!r}")
        if self.stable_name == self.base_name:
            raise ConfigError(f"the stable name and the base model's name are both {self.stable_name!r}: clients "
                              "could not ask for the base model directly; choose another stable name")
        if self.manifest_path is not None:
            object.__setattr__(self, "manifest_path", Path(self.manifest_path).expanduser())
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0-65535, got {self.port!r} ({self.ENV['port']})")
        for name in ("connect_timeout_s", "request_timeout_s", "reload_interval_s", "models_refresh_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r} ({self.ENV[name]})")
        for name in ("max_body_bytes", "max_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r} ({self.ENV[name]})")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> GatewaySettings:
        """Defaults, then environment variables, then `overrides` (None values are ignored: unset flags)."""
        env = os.environ if env is None else env
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, var in cls.ENV.items():
            raw = env.get(var)
            if raw in (None, ""):
                continue
            kind = types[name]
            if name == "upstreams":
                values[name] = tuple(raw.split(","))
            elif kind == "int":
                values[name] = _parse(var, raw, int)
            elif kind == "float":
                values[name] = _parse(var, raw, float)
            elif name == "manifest_path":
                values[name] = Path(raw)
            else:
                values[name] = raw
        if "manifest_path" not in values and env.get("CL_ADAPTER_DIR"):
            values["manifest_path"] = Path(env["CL_ADAPTER_DIR"]) / MANIFEST_FILE
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_changes(self, **changes: Any) -> GatewaySettings:
        return replace(self, **changes)


def _parse(var: str, raw: str, kind: type) -> Any:
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{var}={raw!r} is not a valid {kind.__name__}") from None


__all__ = ["BALANCE_POLICIES", "DEFAULT_PORT", "GatewaySettings"]
