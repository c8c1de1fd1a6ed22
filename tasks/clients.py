"""The service clients every task builds from one `PipelineConfig` (one place that knows the wiring)."""

from __future__ import annotations

from typing import Any

from cl_core.pipeline.config import PipelineConfig


def s3(config: PipelineConfig) -> tuple[Any, Any]:
    """(boto3 client, S3Settings) for the experience bucket named by `config.endpoints`.

    Where the bucket is comes from the config (so an override there is what every task uses); credentials and
    region stay with the environment / boto3's credential chain.
    """
    from cl_core.data.s3 import S3Settings, make_client

    endpoints = config.endpoints
    settings = S3Settings.from_env(endpoint_url=endpoints.s3_endpoint, bucket=endpoints.s3_bucket,
                                   prefix=endpoints.s3_prefix)
    return make_client(settings), settings


def registry(config: PipelineConfig) -> Any:
    from cl_core.pipeline.registry import AdapterRegistry

    return AdapterRegistry(config.endpoints.mlflow_uri, model_name=config.model_name, experiment=config.experiment)


def deployment(config: PipelineConfig) -> Any:
    from cl_core.serving.deployment import Deployment

    return Deployment(list(config.endpoints.vllm_urls), stable_name=config.stable_name)


def tokenizer(config: PipelineConfig) -> Any:
    from transformers import AutoTokenizer

    from cl_core.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(config.training.continual.model))


def champion_bank(config: PipelineConfig) -> Any:
    """The bank manifest the gateways serve now (`$CL_ADAPTER_DIR/bank.json`, written by promotion), or None
    before the first bank promotion of this registered model."""
    from pathlib import Path

    from cl_core.bank.manifest import MANIFEST_FILE, BankManifest

    path = Path(config.endpoints.adapter_dir) / MANIFEST_FILE
    if not path.exists():
        return None
    manifest = BankManifest.load(path)
    return manifest if manifest.metadata.get("model_name") == config.model_name else None
