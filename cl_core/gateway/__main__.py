"""`python -m cl_core.gateway [--host H] [--port P] [--upstream URL[,URL...]] ...` — run the gateway with uvicorn.

Every flag has an environment variable (`GatewaySettings.ENV`); flags win. Exit code 2 for bad settings.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cl_core.errors import ConfigError
from cl_core.gateway.settings import BALANCE_POLICIES, GatewaySettings


def _parser() -> argparse.ArgumentParser:
    env = GatewaySettings.ENV
    parser = argparse.ArgumentParser(prog="python -m cl_core.gateway",
                                     description="OpenAI-compatible gateway that routes the stable model name "
                                                 "through the adapter bank to the vLLM replicas.")
    parser.add_argument("--host", default=None, help=f"bind address (default 127.0.0.1; env {env['host']})")
    parser.add_argument("--port", type=int, default=None, help=f"port (default 8080; env {env['port']})")
    parser.add_argument("--upstream", action="append", default=None, metavar="URL",
                        help=f"vLLM server root URL; repeat or comma-separate for replicas (env {env['upstreams']})")
    parser.add_argument("--balance", choices=BALANCE_POLICIES, default=None, help=f"env {env['balance']}")
    parser.add_argument("--stable-name", default=None, help=f"routed model name (default continual; env "
                                                            f"{env['stable_name']})")
    parser.add_argument("--base-name", default=None, help=f"the replicas' base model name (default base; env "
                                                          f"{env['base_name']})")
    parser.add_argument("--manifest", type=Path, default=None,
                        help=f"bank manifest (env {env['manifest_path']}, else $CL_ADAPTER_DIR/bank.json)")
    parser.add_argument("--max-body-bytes", type=int, default=None, help=f"env {env['max_body_bytes']}")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--access-log", action="store_true", help="log every request (off: it costs latency)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    upstreams = None
    if args.upstream:
        upstreams = tuple(u for item in args.upstream for u in item.split(","))
    try:
        settings = GatewaySettings.from_env(upstreams=upstreams, host=args.host, port=args.port,
                                            balance=args.balance, stable_name=args.stable_name,
                                            base_name=args.base_name, manifest_path=args.manifest,
                                            max_body_bytes=args.max_body_bytes)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from cl_core.gateway.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"cl_core gateway on http://{settings.host}:{settings.port}/v1 -> {', '.join(settings.upstreams)} "
          f"(manifest {settings.manifest_path or 'none'})", flush=True)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level,
                access_log=args.access_log, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
