"""gate: promotion rules from the configuration; the decision and its reasons are recorded."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from cl_core.pipeline.config import PipelineConfig


@task(name="gate-candidate")
def gate_candidate(config: PipelineConfig, evaluation: Any) -> Any:
    from cl_core.pipeline.gate import GateRules, decide

    decision = decide(evaluation.candidate, evaluation.champion, GateRules.from_mapping(config.gate))
    create_markdown_artifact(key="gate-decision", description="Promotion gate",
                             markdown=f"## Gate: {decision.verdict}\n\n{decision.to_markdown()}")
    return decision
