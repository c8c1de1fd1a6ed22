"""validate: Great Expectations over the pulled records; invalid ones quarantined in S3 with their reasons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from cl_core.pipeline.config import PipelineConfig
from tasks import clients


@task(name="validate-experiences")
def validate_experiences(config: PipelineConfig, pulled: Any, run_id: str) -> Any:
    """Valid records for training. Raises `ValidationFailed` (after quarantining and writing the data docs) when
    the invalid share passes `validation.max_invalid_fraction`: a feed that broken needs a person, not a model."""
    from cl_core.data.validation import check_threshold, quarantine, validate, write_data_docs
    from cl_core.prompting import encode_pair

    tok = clients.tokenizer(config)
    report = validate(pulled.records, pulled.raw_invalid,
                      token_count=lambda prompt, answer: len(encode_pair(tok, prompt, answer).input_ids),
                      max_tokens=config.max_tokens, max_invalid_fraction=config.validation.max_invalid_fraction)
    docs_dir = Path(config.state_dir) / "runs" / run_id / "data_docs"
    page = write_data_docs(report, docs_dir, run_name=run_id)
    quarantined = None
    if report.invalid:
        client, settings = clients.s3(config)
        quarantined = quarantine(client, settings, run_id, report)
    failures: dict[str, int] = {}
    for bad in report.invalid:
        for name in bad.failed:
            failures[name] = failures.get(name, 0) + 1
    rows = "\n".join(f"| {name} | {n} |" for name, n in sorted(failures.items(), key=lambda kv: -kv[1]))
    create_markdown_artifact(
        key="validation", description="Great Expectations validation of the pulled records",
        markdown=(f"## Validation: {len(report.valid)} valid, {len(report.invalid)} invalid "
                  f"(threshold {config.validation.max_invalid_fraction:.0%})\n\n"
                  + (f"Quarantined to `{quarantined}`\n\n| failed expectation | records |\n|---|---|\n{rows}\n"
                     if report.invalid else "Every record passed.\n")))
    create_link_artifact(key="data-docs", link=Path(page).resolve().as_uri(), link_text="Validation data docs",
                         description="Great Expectations data docs of this run's validation")
    report.data_docs = docs_dir  # the whole site goes to MLflow with the version
    report.quarantine_key = quarantined
    check_threshold(report, config.validation.max_invalid_fraction)
    return report
