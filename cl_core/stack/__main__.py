"""`python -m cl_core.stack up|down|status [--only s3,mlflow,...]` — the local stack's command line.

Exit codes: 0 success; 1 a service failed to start (named, with its log), or `status` found a selected service not
healthy; 2 bad usage or settings.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from cl_core.stack.service import StackError
from cl_core.stack.stack import REPO_ROOT, SERVICES, Stack, StackConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cl_core.stack",
        description="The local stack on loopback: SeaweedFS (S3), MLflow, Prefect server + worker, vLLM. "
                    "Every flag has an environment variable; flags win.")
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(SERVICES)} (default: all)")
    opts = [("--state-dir", "state_dir", Path), ("--s3-port", "s3_port", int), ("--mlflow-port", "mlflow_port", int),
            ("--prefect-port", "prefect_port", int), ("--worker-port", "worker_port", int),
            ("--vllm-port", "vllm_port", int), ("--gateway-port", "gateway_port", int),
            ("--vllm-model", "vllm_model", str),
            ("--vllm-dtype", "vllm_dtype", str), ("--vllm-max-model-len", "vllm_max_model_len", int),
            ("--adapter-dir", "adapter_dir", Path)]
    for flag, dest, kind in opts:
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=f"env {StackConfig.ENV[dest]}")
    parser.add_argument("--no-deploy", action="store_true",
                        help="up: do not register the pipeline's Prefect deployments (python -m flows.deploy) once "
                             "the worker is up (env CL_STACK_DEPLOY=0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "only", "no_deploy")}
    deploy = not args.no_deploy and os.environ.get("CL_STACK_DEPLOY", "1") != "0"
    try:
        stack = Stack(StackConfig.from_env(**overrides))
        names = stack.select(only)
        if args.command == "up":
            return _up(stack, names, deploy)
        if args.command == "down":
            for name, was_running in stack.down(names):
                print(f"  {name:8s} {'stopped' if was_running else 'not running'}")
            return 0
        rows = stack.status(names)
        for name, state, pid, url in rows:
            print(f"  {name:8s} {state:9s} {'pid ' + str(pid) if pid else '':10s} {url}")
        return 0 if all(state == "healthy" for _, state, _, _ in rows) else 1
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _up(stack: Stack, names: list[str], deploy: bool) -> int:
    print(f"bringing up {', '.join(names)} (state: {stack.config.state_dir})", flush=True)
    result = stack.up(names)
    for failure in result.failures():
        print(f"\n{failure.service}: {failure.state}: {failure.detail}", file=sys.stderr)
    if not result.ok:
        print(f"\nstack not fully up ({len(result.failures())} service(s) not up); logs in "
              f"{stack.config.state_dir / 'logs'}", file=sys.stderr)
        return 1
    urls = result.urls
    print("\nthe stack is up:")
    labels = {"s3": "S3 endpoint", "mlflow": "MLflow UI", "prefect": "Prefect UI", "worker": "Prefect worker",
              "vllm": "vLLM OpenAI API", "gateway": "Gateway (OpenAI)"}
    for name in names:
        print(f"  {labels[name]:16s} {urls[name]}")
    print(f"\nclient environment: source {stack.config.env_path}")
    if deploy and "worker" in names and (REPO_ROOT / "flows" / "deploy.py").is_file():
        return _register_deployments(stack)
    return 0


def _register_deployments(stack: Stack) -> int:
    """Register the pipeline's deployments (idempotent) so the worker has the scheduled runs to execute."""
    print("registering the pipeline's Prefect deployments (python -m flows.deploy) ...", flush=True)
    env = {**os.environ, **stack.config.client_env()}
    out = subprocess.run([sys.executable, "-m", "flows.deploy", "--work-pool", stack.config.work_pool], env=env,
                         cwd=REPO_ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-20:])
        print(f"error: the stack is up, but registering the deployments failed (python -m flows.deploy, exit "
              f"{out.returncode}):\n{tail}", file=sys.stderr)
        return 1
    print(f"  deployments registered on work pool {stack.config.work_pool}: {stack.urls()['prefect']}/deployments")
    return 0


if __name__ == "__main__":
    sys.exit(main())
