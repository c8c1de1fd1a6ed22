"""promote: load a registered version into every vLLM replica and switch the stable name to it, or none."""

from __future__ import annotations

import json
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
    if not (path / "adapter_config.json").exists() and not (path / "bank.json").exists():
        registry.download_adapter(version, path)
    deployment = clients.deployment(config)
    if (path / "bank.json").exists():
        result = _promote_bank(config, deployment, path, version)
        registry.set_alias(version, "champion")
        registry.mark(version, {"promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "promotion": reason, "promoted_from": str(current or "base")})
        create_markdown_artifact(
            key="promotion", description="Bank promotion to the vLLM deployment",
            markdown=(f"## The gateway now routes `{config.stable_name}` to bank v{version} on "
                      f"{len(config.endpoints.vllm_urls)} replica(s)\n\nServed: `{result.version_name}`; previous "
                      f"champion: {'v' + str(current) if current else 'base model'}; reason: {reason}\n\n"
                      f"| | seconds |\n|---|---|\n| stage + verify on all replicas | {result.stage_s:.3f} |\n"
                      f"| switch the manifest | {result.switch_s:.3f} |\n"))
        return result
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


def _promote_bank(config: PipelineConfig, deployment: Any, bundle: Path, version: int) -> Any:
    """Stage every adapter of the registered bundle on every replica, then point the gateways at its manifest
    (`$CL_ADAPTER_DIR/bank.json`); served names of the previous manifest stay loaded (the rollback target)."""
    from cl_core.bank.manifest import MANIFEST_FILE, BankManifest
    from cl_core.pipeline.bank import load_bundle

    manifest = load_bundle(bundle)
    manifest = BankManifest(manifest.base_model, manifest.router, manifest.router_dir, manifest.adapters,
                            manifest.metadata | {"model_name": config.model_name, "registry_version": version})
    target = Path(config.endpoints.adapter_dir) / MANIFEST_FILE
    previous = BankManifest.load(target) if target.exists() else None
    result = deployment.promote_bank(manifest, target)
    _reload_gateways(config, manifest)
    keep = set(manifest.served_names(config.stable_name).values())
    keep |= set(previous.served_names(config.stable_name).values()) if previous else set()
    prefix = f"{config.stable_name}-"
    for name in deployment.servers[0].models():
        if name.startswith(prefix) and "@v" in name and name not in keep:
            deployment.retire(name)
    return result


def _reload_gateways(config: PipelineConfig, manifest: Any) -> None:
    """Make the gateway route by the new manifest before promotion returns (its file watcher would pick it up
    within a second, but only after loading the router and embedder; a client asking right after promotion must
    already get the new bank). Verified by the served names the gateway reports."""
    import httpx

    url = config.endpoints.gateway_url
    if not url:
        return
    expected = set(manifest.served_names(config.stable_name).values())
    try:
        reply = httpx.post(f"{url}/admin/reload", timeout=300)
        reply.raise_for_status()
        info = httpx.get(f"{url}/v1/bank", timeout=30).json()
    except httpx.HTTPError as exc:
        raise GatewayNotReloaded(f"the gateway {url} did not reload the promoted bank manifest ({exc}); the replicas "
                                 "serve the new adapters, and the gateway picks the manifest up when it can: check "
                                 "its log and GET /v1/bank") from exc
    described = json.dumps(info)  # the gateway's own description of the bank it routes by names its adapters
    missing = sorted(name for name in expected if name not in described)
    if missing:
        raise GatewayNotReloaded(f"the gateway {url} reloaded but does not route to {missing}: {info}")


class GatewayNotReloaded(ContinualError):
    """The replicas serve the promoted bank but the gateway does not route by it yet."""
