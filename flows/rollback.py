"""Rollback: serve an earlier registered adapter version again, on every replica, in one command.

`python -m flows.rollback [--version N]` (default: the champion before the current one). The version's adapter
comes from the MLflow registry (versioned names still loaded on the servers switch instantly), the stable name
switches on all replicas or none, and the `champion` alias moves to it with a tag saying why.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from prefect import flow

from cl_core.errors import ContinualError
from cl_core.pipeline.config import PipelineConfig
from tasks import clients
from tasks.promote import promote_version


class NothingToRollBackTo(ContinualError):
    """No earlier promoted version exists (or the asked one is not registered)."""


@flow(name="rollback", log_prints=True)
def rollback(version: int | None = None, config_path: str | None = None, reason: str = "rollback",
             overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    config = PipelineConfig.load(config_path, **(overrides or {}))
    registry = clients.registry(config)
    current = registry.version_for("champion")
    target = version if version is not None else previous_champion(registry, current)
    from cl_core.pipeline.registry import VersionNotFound

    try:
        registry.get(target)
    except VersionNotFound as exc:
        raise NothingToRollBackTo(f"version {target} is not registered under {config.model_name}; see the MLflow "
                                  "registry for the versions there are") from exc
    if target == current:
        print(f"v{target} is already the champion; nothing to do")
        return {"champion": target, "changed": False}
    promote_version(config, target, check_order=False, reason=f"{reason} from v{current}")
    print(f"rolled back: {config.stable_name} serves v{target} (was v{current})")
    return {"champion": target, "previous": current, "changed": True}


def previous_champion(registry: Any, current: int | None) -> int:
    """The newest version promoted before the current champion."""
    promoted = [v.version for v in registry.versions() if v.tags.get("promoted_at") and v.version != current]
    if not promoted:
        raise NothingToRollBackTo("no earlier promoted version to roll back to; give --version N explicitly")
    return max(promoted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.rollback", description=__doc__.split("\n")[0])
    parser.add_argument("--version", type=int, help="registered version to serve (default: the previous champion)")
    parser.add_argument("--config", help="pipeline YAML (default: infra/pipeline.yaml)")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(rollback(version=args.version, config_path=args.config), indent=2))
    except ContinualError as exc:
        print(f"rollback failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
