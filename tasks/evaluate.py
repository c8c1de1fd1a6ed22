"""evaluate: the candidate against the champion, through vLLM (what is measured is what would be served)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from cl_core.pipeline.config import PipelineConfig
from tasks import clients


def candidate_name(run_id: str) -> str:
    return f"candidate-{run_id[:8]}"


@task(name="evaluate-candidate", retries=1, retry_delay_seconds=5)
def evaluate_candidate(config: PipelineConfig, outcome: Any, run_id: str) -> Any:
    """Load the candidate under a candidate name on the first replica and compare it with what the stable name
    serves now (the champion; the bare base model before the first promotion) on held-out records, the batch's
    corrections, retention probes and earlier learned experiences."""
    from cl_core.pipeline.evaluation import compare, load_probes
    from cl_core.serving.client import VLLMServer

    served = Path(config.endpoints.adapter_dir) / "candidates" / run_id
    if served.exists():
        shutil.rmtree(served)
    server = VLLMServer(config.endpoints.vllm_urls[0])
    if outcome.bank is not None:
        candidate, champion = _bank_models(config, outcome, run_id, server, served)
    else:
        shutil.copytree(outcome.adapter_dir, served)
        candidate = candidate_name(run_id)
        _load(server, candidate, served)
        champion = config.stable_name if config.stable_name in server.models() else "base"
    report = compare(server, clients.tokenizer(config), candidate=candidate, champion=champion,
                     heldout=outcome.heldout, corrections=outcome.corrections, probes=load_probes(),
                     replayed=outcome.replayed, max_tokens=config.evaluation.max_tokens)
    create_markdown_artifact(key="evaluation", description="Candidate vs champion through vLLM",
                             markdown=f"## Candidate `{report.candidate_name}` vs `{report.champion_name}`\n\n"
                                      f"{report.to_markdown()}")
    return report


def _load(server: Any, name: str, path: Path) -> None:
    if name in server.models():
        server.unload_adapter(name)
    server.load_adapter(name, str(path))


def _bank_models(config: PipelineConfig, outcome: Any, run_id: str, server: Any, served: Path) -> tuple[Any, Any]:
    """The candidate bank (each adapter under a candidate name, routed by the candidate's router) and the
    champion (the bank manifest the gateway serves, routed by its router; the base model before the first
    promotion), both asked each item the way the gateway would route it."""
    from cl_core.models import resolve_model
    from cl_core.pipeline.bank import load_bundle, router_names, stable_names, write_bundle
    from cl_core.pipeline.evaluation import RoutedModel

    model_path = resolve_model(config.training.continual.model)
    write_bundle(outcome.bank, served)
    bundle = load_bundle(served)
    prefix = candidate_name(run_id)
    for adapter in bundle.serving:
        _load(server, f"{prefix}-{adapter.name}", Path(adapter.path))
    candidate = RoutedModel(prefix, router_names(bundle, lambda a: f"{prefix}-{a.name}", model_path))
    champion_bundle = clients.champion_bank(config)
    if champion_bundle is None:
        return candidate, "base"
    names = stable_names(champion_bundle, config.stable_name)
    loaded = server.models()
    for adapter in champion_bundle.serving:
        if names[adapter.name] not in loaded:
            server.load_adapter(names[adapter.name], adapter.path)
    champion = RoutedModel(f"{config.stable_name} (bank v{champion_bundle.metadata.get('registry_version')})",
                           router_names(champion_bundle, lambda a: names[a.name], model_path))
    return candidate, champion


@task(name="unload-candidate")
def unload_candidate(config: PipelineConfig, run_id: str) -> None:
    """Free the candidate name on the server (the registered version is what gets promoted)."""
    from cl_core.serving.client import VLLMServer

    server = VLLMServer(config.endpoints.vllm_urls[0])
    prefix = candidate_name(run_id)
    for name in server.models():
        if name == prefix or name.startswith(prefix + "-"):
            server.unload_adapter(name)
    shutil.rmtree(Path(config.endpoints.adapter_dir) / "candidates" / run_id, ignore_errors=True)
