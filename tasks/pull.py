"""pull: the experience objects written since the last successful run (S3, durable watermark)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from cl_core.pipeline.config import PipelineConfig
from tasks import clients


@task(name="pull-experiences", retries=2, retry_delay_seconds=3)
def pull_experiences(config: PipelineConfig) -> Any:
    """New records since the committed watermark. Nothing is committed here: the flow commits the new watermark
    only when the run has finished with this batch, so a failed run pulls the same objects again (idempotent)."""
    from cl_core.data.experiences import ExperienceReader
    from cl_core.data.watermark import WatermarkStore, pull

    client, settings = clients.s3(config)
    watermark = WatermarkStore(client, settings).load()
    result = pull(ExperienceReader(client, settings), watermark)
    kinds = Counter(r.kind for r in result.records)
    rows = "\n".join(f"| {kind} | {n} |" for kind, n in sorted(kinds.items())) or "| (none) | 0 |"
    create_markdown_artifact(
        key="pulled-experiences", description="Experience records pulled from S3 in this run",
        markdown=(f"## Pulled {len(result.records)} records from {len(result.objects)} objects\n\n"
                  f"s3://{settings.bucket}/{settings.prefix}experiences/ since the last committed watermark\n\n"
                  f"| kind | records |\n|---|---|\n{rows}\n\n"
                  f"Unparseable lines: {len(result.raw_invalid)} (they go to quarantine with the invalid records)"))
    return result


@task(name="commit-watermark", retries=2, retry_delay_seconds=3)
def commit_watermark(config: PipelineConfig, pulled: Any) -> None:
    """Advance the watermark past this run's objects (compare-and-swap: a concurrent run's commit is refused)."""
    from cl_core.data.watermark import WatermarkStore

    client, settings = clients.s3(config)
    WatermarkStore(client, settings).commit(pulled.new_watermark, expected_previous=pulled.watermark)
