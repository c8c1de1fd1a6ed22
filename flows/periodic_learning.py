"""The periodic-learning flow: pull → validate → train → evaluate → gate → register → promote.

Deployed with a schedule by `flows/deploy.py` (its runs appear in the Prefect UI); runnable once from the command
line: `python -m flows.periodic_learning [--config infra/pipeline.yaml]`.

Failure semantics (each ends in a recorded, explained state; the served model is never left worse):
- nothing new in S3: the run completes with "no new experiences", nothing else happens;
- too many invalid records: quarantined with reasons, the run fails before training, watermark not moved;
- S3 / MLflow outage: the task retries, then fails; nothing was promoted and the watermark did not move, so the next
  run retries the same objects (records already learned are never trained twice);
- the server refuses the candidate, or a replica fails during promotion: the previous champion keeps serving
  everywhere, the run fails with the server's reason;
- the gate rejects: the version is registered with the reasons (tag gate=rejected), not promoted, and the batch is
  marked done (its records stay in S3 and in the rejected version's checkpoint).
Two runs never overlap: the flow holds the global concurrency slot `cl-learning` (limit 1), and promotion also
refuses a candidate whose parent is no longer the champion.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run

from cl_core.errors import NothingToLearnError
from cl_core.pipeline.config import PipelineConfig
from tasks.evaluate import evaluate_candidate, unload_candidate
from tasks.gate import gate_candidate
from tasks.promote import promote_version
from tasks.pull import commit_watermark, pull_experiences
from tasks.register import register_candidate
from tasks.train import train_candidate
from tasks.validate import validate_experiences

CONCURRENCY_LIMIT = "cl-learning"


@dataclass
class RunSummary:
    """What a run did, for people (the last artifact) and for callers (the flow's return value)."""

    outcome: str
    records: int = 0
    valid: int = 0
    invalid: int = 0
    version: int | None = None
    parent_version: int | None = None
    promoted: bool = False
    gate: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    version_url: str | None = None
    run_url: str | None = None
    flow_run_url: str | None = None
    promotion_seconds: float | None = None
    """Gate decision -> first response from the promoted version under the stable name (registration included)."""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    answers: list[dict[str, Any]] = field(default_factory=list)
    """Per evaluated correction and retention probe: the question, the reference, the champion's and the
    candidate's greedy answers through vLLM (what the gate judged)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@flow(name="periodic-learning", log_prints=True)
def periodic_learning(config_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """One learning round over the experiences that arrived since the last one."""
    config = PipelineConfig.load(config_path, **(overrides or {}))
    ensure_concurrency_limit(CONCURRENCY_LIMIT)
    with concurrency(CONCURRENCY_LIMIT, occupy=1, strict=True):
        summary = _round(config)
    summary.flow_run_url = flow_run.get_flow_run_ui_url()
    create_markdown_artifact(key="run-summary", description="What this learning round did",
                             markdown="## " + summary.outcome + "\n\n```json\n" +
                             json.dumps(summary.to_dict(), indent=2, default=str) + "\n```")
    return summary.to_dict()


def _round(config: PipelineConfig) -> RunSummary:
    log = get_run_logger()
    run_id = flow_run.get_id() or uuid.uuid4().hex
    timings: dict[str, float] = {}

    def timed(stage: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timings[stage] = round(time.perf_counter() - start, 3)

    pulled = timed("pull", pull_experiences, config)
    n = len(pulled.records) + len(pulled.raw_invalid)
    if n == 0:
        log.info("no new experiences since the last run")
        return RunSummary("no new experiences", stage_seconds=timings)
    validation = timed("validate", validate_experiences, config, pulled, run_id)
    summary = RunSummary("", records=n, valid=len(validation.valid), invalid=len(validation.invalid),
                         stage_seconds=timings)
    try:
        outcome = timed("train", train_candidate, config, validation.valid, run_id)
    except NothingToLearnError as exc:
        commit_watermark(config, pulled)
        summary.outcome = f"nothing to train on: {exc}"
        return summary
    summary.parent_version, summary.training = outcome.parent_version, outcome.stats
    try:
        evaluation = timed("evaluate", evaluate_candidate, config, outcome, run_id)
        decision = timed("gate", gate_candidate, config, evaluation)
        decided = time.perf_counter()
        version = timed("register", register_candidate, config, outcome, evaluation, decision, validation, pulled,
                        run_id)
        summary.version, summary.version_url, summary.run_url = version.version, version.version_url, version.run_url
        summary.gate, summary.metrics = decision.to_dict(), dict(evaluation.metrics)
        summary.answers = [{"group": c.item.kind, "prompt": c.item.prompt, "reference": c.item.answer,
                            "fact": c.item.fact, "champion": h.output, "candidate": c.output,
                            "candidate_ok": c.contains, "champion_ok": h.contains}
                           for c, h in zip(evaluation.candidate_results, evaluation.champion_results, strict=True)
                           if c.item.kind in ("corrections", "probe")]
        if decision.passed:
            timed("promote", promote_version, config, version.version, expected_champion=outcome.parent_version)
            summary.promoted = True
            summary.promotion_seconds = round(time.perf_counter() - decided, 3)
            summary.outcome = f"promoted v{version.version}"
        else:
            summary.outcome = f"v{version.version} rejected by the gate: " + "; ".join(decision.reasons)
    finally:
        timed("unload", unload_candidate, config, run_id)
    timed("commit", commit_watermark, config, pulled)
    log.info(summary.outcome)
    return summary


def ensure_concurrency_limit(name: str, limit: int = 1) -> None:
    """Create the global concurrency limit once (idempotent), so `strict=True` can rely on it existing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run created it first
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.periodic_learning", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="pipeline YAML (default: infra/pipeline.yaml or $CL_PIPELINE_CONFIG)")
    args = parser.parse_args(argv)
    result = periodic_learning(config_path=args.config)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
