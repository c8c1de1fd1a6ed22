"""The gateway (`python -m cl_core.gateway`): the OpenAI-compatible front that routes `continual` through the bank.

It runs as its own process like every other service, on loopback, in front of the stack's vLLM server(s), and
reads the bank manifest the pipeline promotes (`$CL_ADAPTER_DIR/bank.json` by default; it reloads it when the file
changes, so a promotion needs no restart). Healthy when GET /health answers 200 (the gateway is up and at least
one replica answers).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from cl_core.stack.service import Service, http_ok

DEFAULT_GATEWAY_PORT = 8080


class GatewayServer(Service):
    """`python -m cl_core.gateway --host 127.0.0.1 --port P --upstream URL ...`."""

    name = "gateway"
    port_env = "CL_GATEWAY_PORT"
    start_timeout = 60.0
    stop_grace = 10.0

    def __init__(self, state_dir: Path, port: int, upstreams: Sequence[str], manifest_path: Path | None = None,
                 stable_name: str | None = None, extra_args: tuple[str, ...] = ()) -> None:
        super().__init__(state_dir, port)
        if isinstance(upstreams, str) or not upstreams:
            raise ValueError(f"the gateway needs a list of vLLM server URLs, got {upstreams!r}")
        self.upstreams = tuple(upstreams)
        self.manifest_path = Path(manifest_path) if manifest_path is not None else None
        self.stable_name = stable_name
        self.extra_args = extra_args

    def environment(self) -> dict[str, str]:
        env = {"PYTHONUNBUFFERED": "1", "CL_VLLM_URLS": ",".join(self.upstreams)}
        if self.manifest_path is not None:
            env["CL_BANK_MANIFEST"] = str(self.manifest_path)
        return env

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "cl_core.gateway", "--host", "127.0.0.1", "--port", str(self.port),
               "--upstream", ",".join(self.upstreams)]
        if self.manifest_path is not None:
            cmd += ["--manifest", str(self.manifest_path)]
        if self.stable_name:
            cmd += ["--stable-name", self.stable_name]
        return [*cmd, *self.extra_args]

    @property
    def openai_url(self) -> str:
        """The OpenAI base URL clients use (`.../v1`); `url` is the root (what `CL_GATEWAY_URL` holds)."""
        return f"{self.url}/v1"

    def healthy(self) -> bool:
        return http_ok(f"{self.url}/health")


__all__ = ["DEFAULT_GATEWAY_PORT", "GatewayServer"]
