"""gate: promotion rules from the configuration; the decision and its reasons are recorded."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from cl_core.pipeline.config import PipelineConfig


@task(name="gate-candidate", cache_policy=INPUTS + TASK_SOURCE)
def gate_candidate(config: PipelineConfig, evaluation: Any) -> Any:
    """A pure function of the metrics and the rules, so its result is cached on exactly those inputs: a retried
    run (or a re-evaluation that measured the same numbers) gets the recorded decision back."""
    from cl_core.pipeline.gate import decide

    # The rules were parsed (and checked) when the config was loaded, before training started.
    decision = decide(evaluation.candidate, evaluation.champion, config.gate)
    create_markdown_artifact(key="gate-decision", description="Promotion gate",
                             markdown=f"## Gate: {decision.verdict}\n\n{decision.to_markdown()}")
    return decision
