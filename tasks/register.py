"""register: an MLflow run (params, metrics, GX result, adapter, checkpoint, lineage) and a model version."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact

from cl_core.pipeline.config import PipelineConfig
from tasks import clients


@task(name="register-candidate", retries=2, retry_delay_seconds=5)
def register_candidate(config: PipelineConfig, outcome: Any, evaluation: Any, decision: Any, validation: Any,
                       pulled: Any, run_id: str) -> Any:
    """Every candidate is registered, promoted or not: a rejected version keeps its metrics and the gate's
    reasons, and the alias `challenger` marks the latest one that passed. A retried task returns the version
    its first attempt registered (idempotency key = the flow run id)."""
    registry = clients.registry(config)
    c = config.training.continual
    params = {"lora_rank": c.lora_rank, "learning_rate": c.learning_rate, "batch_size": c.batch_size,
              "epochs": config.training.epochs, "max_steps": c.max_steps,
              "anti_forgetting": ",".join(c.anti_forgetting_methods), "ewc_lambda": c.ewc_lambda,
              "replay_ratio": c.replay_ratio, "train_precision": c.train_precision}
    lineage = {"base_model": outcome.base_model, "base_fingerprint": outcome.base_fingerprint,
               "parent_version": outcome.parent_version, "data_objects": len(pulled.objects),
               "data_watermark": watermark_summary(pulled.new_watermark), "prefect_flow_run": run_id,
               "quarantine": validation.quarantine_key or ""}
    training = {f"train.{k}": float(v) for k, v in outcome.stats.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
    adapter_dir, tags = outcome.adapter_dir, {"tasks": ",".join(outcome.tasks)}
    if outcome.bank is not None:  # one registered version = the whole bank: every adapter's version + the router
        import json
        from pathlib import Path

        from cl_core.pipeline.bank import write_bundle

        adapter_dir = Path(config.state_dir) / "runs" / run_id / "bundle"
        write_bundle(outcome.bank, adapter_dir, metadata={"model_name": config.model_name})
        tags |= {"bank": outcome.bank.router, "bank_versions": json.dumps(outcome.bank.lineage_versions),
                 "bank_changed": ",".join(outcome.bank.changed)}
        params |= {"num_adapters": c.num_adapters, "adapter_routing": c.adapter_routing}
    version = registry.log_candidate(
        params=params, metrics={"candidate": evaluation.candidate, "champion": evaluation.champion, **training},
        adapter_dir=adapter_dir, checkpoint_dir=outcome.checkpoint_dir, gx_result=validation.gx_result,
        data_docs_dir=validation.data_docs, decision=decision, lineage=lineage,
        tags=tags, run_name=f"round-{run_id[:8]}", idempotency_key=run_id)
    create_link_artifact(key="mlflow-version", link=version.version_url,
                         link_text=f"{config.model_name} v{version.version} in MLflow",
                         description=f"Registered adapter version ({decision.verdict})")
    return version


def watermark_summary(watermark: Any) -> str:
    """The newest object key per kind: enough to find exactly which data a version was trained on."""
    return ";".join(f"{kind}={mark.last_key.rsplit('/', 1)[-1]}" for kind, mark in sorted(watermark.kinds.items()))
