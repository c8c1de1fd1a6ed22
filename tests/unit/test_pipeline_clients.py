"""The tasks' service clients are wired from the run's `PipelineConfig`, not from whatever the process env says."""

from __future__ import annotations

import dataclasses

import pytest

from cl_core.pipeline.config import PipelineConfig
from tasks import clients


def test_s3_client_uses_the_configs_endpoint_bucket_and_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CL_S3_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("CL_S3_BUCKET", "from-env")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-env")
    config = PipelineConfig.load()
    endpoints = dataclasses.replace(config.endpoints, s3_endpoint="http://127.0.0.1:9", s3_bucket="runs",
                                    s3_prefix="team-a")
    client, settings = clients.s3(dataclasses.replace(config, endpoints=endpoints))
    assert (settings.endpoint_url, settings.bucket, settings.prefix) == ("http://127.0.0.1:9", "runs", "team-a/")
    assert client.meta.endpoint_url == "http://127.0.0.1:9"
    # credentials stay with the environment / boto3's chain
    assert settings.access_key_id == "key-from-env"


def test_s3_client_follows_the_environment_contract_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CL_S3_ENDPOINT", "http://127.0.0.1:7")
    monkeypatch.setenv("CL_S3_BUCKET", "experiences-x")
    monkeypatch.setenv("CL_S3_PREFIX", "")
    _, settings = clients.s3(PipelineConfig.load())
    assert (settings.endpoint_url, settings.bucket, settings.prefix) == ("http://127.0.0.1:7", "experiences-x", "")
