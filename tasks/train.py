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
    from cl_core.serving.client import check_lora_rank

    # Before any training: a rank the servers cannot load would otherwise be found only at evaluation.
    continual = config.training.continual
    check_lora_rank(config.endpoints.vllm_urls, continual.adapter_rank,
                    how=f"lora_rank {continual.lora_rank} x {continual.rank_blocks} rank block(s)")
    work = Path(config.state_dir) / "runs" / run_id / "train"
    registry = clients.registry(config)
    parent = registry.version_for("champion")
    checkpoint = (registry.download_checkpoint(parent, work.parent / "champion", overwrite=True)
                  if parent is not None else None)
    anchors: list[tuple[str, str]] = []
    bank = config.training.continual.num_adapters > 1  # a bank routes what it did not learn to the base: no anchors
    prompts = load_anchor_prompts(config.training.anchors) if parent is None and not bank else []
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
    outcome = train(config, records, work, checkpoint, parent, anchors=anchors, version_floor=floor,
                    on_progress=prefect_progress())
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


def prefect_progress() -> Any:
    """A training-progress callback that keeps one Prefect progress artifact up to date (the step, the loss and
    the ETA of the adapter and task being trained, visible in the UI while the task runs)."""
    import contextvars

    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    state: dict[str, Any] = {"id": None, "last": 0.0}
    context = contextvars.copy_context()  # training steps run on the learner's thread: keep the task's run context

    def update(info: dict[str, Any]) -> None:
        context.copy().run(_update, info)

    def _update(info: dict[str, Any]) -> None:
        import time

        now = time.monotonic()
        if state["id"] is not None and info["step"] != info["steps"] and now - state["last"] < 2.0:
            return  # at most one update every 2 s
        state["last"] = now
        percent = 100.0 * info["step"] / max(1, info["steps"])
        text = (f"training {info['adapter']} / {info['task']}: step {info['step']}/{info['steps']}, "
                f"loss {info['loss']:.4f}, ETA {info['eta_s']:.0f} s")
        if state["id"] is None:
            state["id"] = create_progress_artifact(progress=percent, key="training-progress", description=text)
        else:
            update_progress_artifact(state["id"], progress=percent, description=text)

    return update
