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
    shutil.copytree(outcome.adapter_dir, served)
    server = VLLMServer(config.endpoints.vllm_urls[0])
    name = candidate_name(run_id)
    if name in server.models():
        server.unload_adapter(name)
    server.load_adapter(name, str(served))
    champion = config.stable_name if config.stable_name in server.models() else "base"
    report = compare(server, clients.tokenizer(config), candidate=name, champion=champion,
                     heldout=outcome.heldout, corrections=outcome.corrections, probes=load_probes(),
                     replayed=outcome.replayed, max_tokens=config.evaluation.max_tokens)
    create_markdown_artifact(key="evaluation", description="Candidate vs champion through vLLM",
                             markdown=f"## Candidate `{name}` vs `{champion}`\n\n{report.to_markdown()}")
    return report


@task(name="unload-candidate")
def unload_candidate(config: PipelineConfig, run_id: str) -> None:
    """Free the candidate name on the server (the registered version is what gets promoted)."""
    from cl_core.serving.client import VLLMServer

    server = VLLMServer(config.endpoints.vllm_urls[0])
    if candidate_name(run_id) in server.models():
        server.unload_adapter(candidate_name(run_id))
    shutil.rmtree(Path(config.endpoints.adapter_dir) / "candidates" / run_id, ignore_errors=True)
