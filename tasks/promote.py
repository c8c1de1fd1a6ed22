"""promote: load a registered version into every vLLM replica and switch the stable name to it, or none."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from cl_core.errors import ContinualError
from cl_core.pipeline.config import PipelineConfig
from tasks import clients


class OutOfOrderPromotion(ContinualError):
    """The champion moved while this candidate trained; promoting it would undo the newer champion."""


@task(name="promote-version")
def promote_version(config: PipelineConfig, version: int, expected_champion: int | None = None,
                    check_order: bool = True, reason: str = "gate passed") -> Any:
    """Serve registered `version` under the stable name on all replicas, then move the `champion` alias.

    With `check_order`, refuses when the champion is no longer the version the candidate was trained from (two
    overlapping runs never promote out of order). On any replica failure the deployment switches back and the
    previous champion keeps serving; the alias moves only after every replica serves the new version.
    """
    registry = clients.registry(config)
    current = registry.version_for("champion")
    if check_order and current != expected_champion:
        raise OutOfOrderPromotion(
            f"champion is v{current} now, but this candidate was trained from "
            f"{'v' + str(expected_champion) if expected_champion else 'the base model'}: promoting it would drop "
            "what the newer champion learned. Nothing was changed; the next scheduled run trains from the new "
            "champion.")
    path = Path(config.endpoints.adapter_dir) / config.model_name / f"v{version}"
    if not (path / "adapter_config.json").exists():
        registry.download_adapter(version, path)
    deployment = clients.deployment(config)
    name = f"{config.stable_name}@v{version}"
    result = (deployment.promote(name, str(path)) if check_order else deployment.rollback(str(path), name))
    registry.set_alias(version, "champion")
    registry.mark(version, {"promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "promotion": reason, "promoted_from": str(current or "base")})
    _retire_old(config, deployment, keep={version, current})
    create_markdown_artifact(
        key="promotion", description="Promotion to the vLLM deployment",
        markdown=(f"## `{config.stable_name}` now serves v{version} on {len(config.endpoints.vllm_urls)} "
                  f"replica(s)\n\nPrevious champion: {'v' + str(current) if current else 'base model'}; "
                  f"reason: {reason}\n\n| | seconds |\n|---|---|\n| stage on all replicas | {result.stage_s:.3f} |\n"
                  f"| switch the stable name | {result.switch_s:.3f} |\n| call -> first response | "
                  f"{result.latency_s:.3f} |\n"))
    return result


def _retire_old(config: PipelineConfig, deployment: Any, keep: set[int | None]) -> None:
    """Unload versioned names beyond the newest `keep_versions` (older ones reload from MLflow on rollback)."""
    prefix = f"{config.stable_name}@v"
    loaded = sorted(int(name[len(prefix):]) for name in deployment.servers[0].models() if name.startswith(prefix)
                    and name[len(prefix):].isdigit())
    for number in loaded[:-config.keep_versions] if len(loaded) > config.keep_versions else []:
        if number not in keep:
            deployment.retire(f"{prefix}{number}")
