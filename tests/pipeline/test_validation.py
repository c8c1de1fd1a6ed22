"""Validation as the pipeline runs it: pull from S3 → validate (with the model's tokenizer) → quarantine to S3 →
threshold, against a real SeaweedFS; and the cost of validating 1,000 records."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

from cl_core.data.experiences import (
    ExperienceReader,
    ExperienceRecord,
    ExperienceWriter,
    interaction,
    label,
    object_key,
    parse_key,
    rating,
)
from cl_core.data.s3 import S3Settings, make_client
from cl_core.data.validation import (
    MALFORMED,
    ValidationFailed,
    check_threshold,
    quarantine,
    validate,
    write_data_docs,
)
from cl_core.data.watermark import WatermarkStore, pull


@pytest.fixture(scope="module")
def tiny_token_count(tiny_model_dir):
    """Tokens as the trainer counts them: the chat-formatted prompt plus the answer and EOS."""
    from transformers import AutoTokenizer

    from cl_core.prompting import encode_pair

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return lambda prompt, answer: len(encode_pair(tokenizer, prompt, answer).input_ids)


@pytest.fixture
def s3(s3_service, s3_bucket):
    bucket, _ = s3_bucket
    settings = S3Settings(endpoint_url=s3_service.endpoint_url, bucket=bucket, prefix="v/",
                          region=s3_service.region, access_key_id=s3_service.access_key,
                          secret_access_key=s3_service.secret_key)
    return make_client(settings), settings


@pytest.mark.integration
def test_pull_validate_quarantine(s3, tiny_token_count, tmp_path) -> None:
    client, settings = s3
    good = [interaction(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(6)]
    good.append(label("Classify: play some jazz", "play_music", task="intent"))
    bad = {
        "reward_in_range": ExperienceRecord(kind="rating", prompt="Capital of Chile?", response="Santiago.",
                                            reward=5.0),
        "prompt_not_blank": ExperienceRecord(kind="interaction", prompt="   ", response="Hello!"),
        "tokens_within_context": rating("Tell me everything " * 60, "No.", reward=-1.0),
    }
    with ExperienceWriter(client, settings) as writer:  # the writer stores what a buggy client sends
        writer.add_many([*good, *bad.values()])
    info = parse_key(writer.written[0], settings.prefix)
    broken_key = object_key(settings, info.kind, info.hour, datetime.now(UTC))  # what a crashed non-S3 copy leaves
    client.put_object(Bucket=settings.bucket, Key=broken_key,
                      Body=(good[0].to_json() + "\n" + '{"schema_version": 1, "id": "cut').encode())

    pulled = pull(ExperienceReader(client, settings), WatermarkStore(client, settings).load())
    assert pulled.duplicates == 1  # good[0] again, in the broken object
    report = validate(pulled.records, pulled.raw_invalid, token_count=tiny_token_count, max_tokens=128,
                      max_invalid_fraction=0.2)
    assert sorted(r.id for r in report.valid) == sorted(r.id for r in good)
    by_rule = {tuple(b.failed): b for b in report.invalid}
    assert set(by_rule) == {(rule,) for rule in bad} | {(MALFORMED,)}
    assert report.statistics["tokens"]["max"] > 128 and not report.passed  # 4 of 11 invalid > 20%

    key = quarantine(client, settings, "run-7", report)
    assert key == "v/quarantine/run=run-7/invalid.jsonl" and report.quarantine_key == key
    lines = [json.loads(line) for line in
             client.get_object(Bucket=settings.bucket, Key=key)["Body"].read().decode().splitlines()]
    assert len(lines) == 4
    for line in lines:
        assert line["object_key"] in pulled.objects and line["line"] >= 1 and line["failed"]
        assert set(line["details"]) == set(line["failed"])
    malformed = next(line for line in lines if line["failed"] == [MALFORMED])
    assert malformed["object_key"] == broken_key and malformed["line"] == 2 and malformed["record"] is None
    assert malformed["raw"] == '{"schema_version": 1, "id": "cut' and "truncated" in malformed["error"]
    reward = next(line for line in lines if line["failed"] == ["reward_in_range"])
    assert reward["record"]["id"] == bad["reward_in_range"].id and reward["details"]["reward_in_range"] == "5.0"

    with pytest.raises(ValidationFailed) as caught:
        check_threshold(report)
    assert key in str(caught.value) and "36.4%" in str(caught.value) and "20.0%" in str(caught.value)

    page = write_data_docs(report, tmp_path / "docs", run_name="run-7")
    assert bad["reward_in_range"].id in page.read_text()


def test_validating_1000_records_is_fast(tiny_token_count) -> None:
    """Times `validate` on 1,000 realistic records (tokenizer included) after a warm-up, and keeps it bounded."""
    records = []
    for i in range(1000):
        if i % 4 == 0:
            records.append(rating(f"Question {i}: what is {i} times 3?", f"{i} times 3 is {3 * i}.", reward=1.0))
        elif i % 4 == 1:
            parity = "even" if i % 2 == 0 else "odd"
            records.append(interaction(f"Tell me a fact about the number {i}.", f"{i} is {parity}."))
        else:
            records.append(label(f"Classify request {i}: book a flight to city {i}", "book_flight", task="intent"))
    validate(records[:10], token_count=tiny_token_count, max_tokens=256)  # GX import and first-use costs
    started = time.perf_counter()
    report = validate(records, token_count=tiny_token_count, max_tokens=256)
    elapsed = time.perf_counter() - started
    seconds = report.statistics["seconds"]
    print(f"\nvalidate(1000 records): {elapsed:.2f} s (prepare incl. tokenizer {seconds['prepare']:.2f} s, "
          f"GX {seconds['gx']:.2f} s, {report.statistics['expectations']['evaluated']} expectations)")
    assert len(report.valid) == 1000
    assert elapsed < 30
