"""train: LoRA + EWC + replay from the champion's checkpoint (Fisher and experience store carried over)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from cl_core.pipeline.config import PipelineConfig
from tasks import clients


@task(name="train-candidate")
def train_candidate(config: PipelineConfig, records: list[Any], run_id: str) -> Any:
    """A candidate adapter trained on the valid records, continuing the champion (on GPU when there is one)."""
    from cl_core.pipeline.training import load_anchor_prompts
    from cl_core.pipeline.training import train_candidate as train

    work = Path(config.state_dir) / "runs" / run_id / "train"
    registry = clients.registry(config)
    parent = registry.version_for("champion")
    checkpoint = (registry.download_checkpoint(parent, work.parent / "champion", overwrite=True)
                  if parent is not None else None)
    anchors: list[tuple[str, str]] = []
    prompts = load_anchor_prompts(config.training.anchors) if parent is None else []
    if prompts:  # a new lineage: rehearse what the served model answers today
        from cl_core.serving.client import VLLMServer

        limit = 96
        tok = clients.tokenizer(config)
        with VLLMServer(config.endpoints.vllm_urls[0]) as server:
            served = config.stable_name if config.stable_name in server.models() else "base"
            answers = server.chat(served, prompts, max_tokens=limit)
        # Only answers the model finished: a cut-off answer would teach it to stop mid-sentence.
        anchors = [(p, a) for p, a in zip(prompts, answers, strict=True)
                   if a.strip() and len(tok(a, add_special_tokens=False)["input_ids"]) < limit - 1]
    floor = bank_version_floor(registry) if config.training.continual.num_adapters > 1 else {}
    outcome = train(config, records, work, checkpoint, parent, anchors=anchors, version_floor=floor)
    s = outcome.stats
    create_markdown_artifact(
        key="training", description="Candidate training",
        markdown=(f"## Trained from {'champion v' + str(parent) if parent else 'the base model'}\n\n"
                  "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in s.items())
                  + f"\n| methods | {', '.join(config.training.continual.anti_forgetting_methods)} |\n"))
    return outcome


def bank_version_floor(registry: Any) -> dict[str, int]:
    """Adapter -> the highest lineage version any registered bank candidate used (tag `bank_versions`)."""
    import json

    floor: dict[str, int] = {}
    for info in registry.versions():
        for name, version in json.loads(info.tags.get("bank_versions") or "{}").items():
            floor[name] = max(floor.get(name, 0), int(version))
    return floor
