"""Experience records in S3 (writer, reader, layout) and the durable pull watermark, against a real SeaweedFS.

The first tests are pure (records, key layout, `Watermark.advance`); the rest are marked `integration` and use
the `s3_service` / `s3_bucket` fixtures of tests/pipeline/conftest.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cl_core.data.experiences import (
    KINDS,
    ExperienceReader,
    ExperienceRecord,
    ExperienceWriter,
    RecordError,
    correction,
    interaction,
    label,
    object_key,
    parse_key,
    parse_lines,
    rating,
)
from cl_core.data.s3 import S3Error, S3Settings, S3Unavailable, make_client
from cl_core.data.watermark import Watermark, WatermarkConflict, WatermarkError, WatermarkStore, pull
from cl_core.errors import InvalidInputError

PREFIX = "tenant-a/"
REPO = Path(__file__).resolve().parents[2]


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def one_of_each(created_at: str | None = None) -> list[ExperienceRecord]:
    return [
        interaction("Hi there, who are you?", "I am a helpful assistant.", model="adapter@v3", source="vllm",
                    metadata={"request_id": "r-1", "latency_ms": 12.5}, created_at=created_at),
        rating("What is the capital of Kenya?", "Nairobi.", reward=1.0, model="adapter@v3", created_at=created_at),
        correction("What is the capital of Turkey?", rejected="Istanbul.", chosen="Ankara.", task="facts",
                   created_at=created_at),
        label("Classify: 'book a table for two'", "restaurant_reservation — ünïcödé ok", task="intent",
              created_at=created_at),
    ]


# ------------------------------------------------------------------------------------------------------- pure


def test_record_json_round_trip() -> None:
    for record in one_of_each():
        line = record.to_json()
        assert "\n" not in line
        back = ExperienceRecord.from_dict(json.loads(line))
        assert back == record and back.to_dict() == record.to_dict()
    assert json.loads(one_of_each()[3].to_json())["response"].endswith("ünïcödé ok")  # UTF-8, not \\u escapes
    surrogate = interaction("bad \udcff byte", "ok")
    assert "\\udcff" in surrogate.to_json()
    assert ExperienceRecord.from_dict(json.loads(surrogate.to_json())).prompt == "bad \udcff byte"


def test_record_schema_errors_name_the_field() -> None:
    good = one_of_each()[0].to_dict()
    with pytest.raises(RecordError, match="missing field 'prompt'"):
        ExperienceRecord.from_dict({k: v for k, v in good.items() if k != "prompt"})
    with pytest.raises(RecordError, match="unknown field 'colour'"):
        ExperienceRecord.from_dict({**good, "colour": "red"})
    with pytest.raises(RecordError, match="reward must be a number"):
        ExperienceRecord.from_dict({**good, "reward": "high"})
    with pytest.raises(RecordError, match="reward must be finite"):
        ExperienceRecord(kind="rating", prompt="p", response="r", reward=float("nan"))


def test_builders_refuse_bad_arguments() -> None:
    with pytest.raises(InvalidInputError, match="reward"):
        rating("q", "a", reward=1.5)
    with pytest.raises(InvalidInputError, match="prompt"):
        interaction("  ", "a")
    with pytest.raises(InvalidInputError, match="identical"):
        correction("q", rejected="same", chosen="same")
    with pytest.raises(InvalidInputError, match="time zone"):
        label("q", "a", created_at="2025-01-01T10:00:00")


def test_key_layout() -> None:
    settings = S3Settings(endpoint_url=None, prefix="/tenant-a")
    assert settings.prefix == PREFIX
    hour = datetime(2025, 1, 31, 7, tzinfo=UTC)
    flushed = datetime(2025, 1, 31, 9, 15, 2, 123456, tzinfo=UTC)
    key = object_key(settings, "rating", hour, flushed)
    assert key.startswith("tenant-a/experiences/kind=rating/date=2025-01-31/hour=07/20250131T091502.123456Z-")
    assert key.endswith(".jsonl") and len(key.rsplit("-", 1)[1]) == len("0123abcd.jsonl")
    info = parse_key(key, settings.prefix)
    assert info is not None and (info.kind, info.hour, info.flushed_at) == ("rating", hour, flushed)
    assert parse_key("tenant-a/experiences/kind=rating/notes.txt", settings.prefix) is None
    assert parse_key(key, "other/") is None


def test_parse_lines_reports_bad_lines_with_their_position() -> None:
    good = one_of_each()[0].to_json()
    body = "\n".join([good, "", "{oops", "[1]", '{"kind": "rating"}', "NaN", good[:30]]).encode()
    records, raw = parse_lines("k.jsonl", body)
    assert [r.prompt for r in records] == ["Hi there, who are you?"] and records[0].origin == ("k.jsonl", 1)
    assert [(r.line, r.error.split(":")[0]) for r in raw] == [
        (3, "malformed JSON"), (4, "malformed JSON"), (5, "schema"), (6, "malformed JSON"), (7, "malformed JSON")]
    assert raw[2].data == {"kind": "rating"} and raw[0].data is None
    assert "truncated last line" in raw[-1].error and "NaN is not valid JSON" in raw[3].error


def key_at(hour: datetime, kind: str = "rating", minute: int = 0) -> str:
    return object_key(S3Settings(endpoint_url=None, prefix=PREFIX), kind, hour,
                      hour + timedelta(minutes=minute))


def test_watermark_advance_is_pure_and_prunes_behind_the_horizon() -> None:
    now = datetime(2025, 3, 1, 12, 30, tzinfo=UTC)
    h = datetime(2025, 3, 1, 12, tzinfo=UTC)
    old, mid, new = key_at(h - timedelta(hours=5)), key_at(h - timedelta(hours=2)), key_at(h)
    empty = Watermark(prefix=PREFIX)
    first = empty.advance([old, mid], now=now)
    assert empty.kinds == {} and first is not empty  # pure: the input is unchanged
    assert first.horizon("rating") == h - timedelta(hours=4) and first.seen(mid) and not first.seen(old)
    second = first.advance([new], now=now)
    assert second.horizon("rating") == h - timedelta(hours=2)
    assert second.seen(mid) and second.seen(new) and second.kinds["rating"].last_key == new
    assert second.horizon("label") is None  # a kind never seen is listed from the start
    assert Watermark.from_dict(second.to_dict(), prefix=PREFIX) == second  # JSON round trip
    with pytest.raises(InvalidInputError, match="not an experience object key"):
        second.advance(["tenant-a/_state/watermark.json"], now=now)


def test_watermark_ignores_a_partition_from_the_future() -> None:
    """A client clock far ahead must not move the horizon past objects that are still to come."""
    now = datetime(2025, 3, 1, 12, 30, tzinfo=UTC)
    future = key_at(datetime(2030, 1, 1, 0, tzinfo=UTC))
    advanced = Watermark(prefix=PREFIX).advance([future], now=now)
    assert advanced.horizon("rating") == datetime(2025, 3, 1, 10, tzinfo=UTC)
    assert advanced.seen(future)


# ---------------------------------------------------------------------------------------------- integration


@pytest.fixture
def s3(s3_service, s3_bucket):
    """(client, settings) for a fresh bucket, through `make_client` (the client the pipeline uses)."""
    bucket, _ = s3_bucket
    settings = S3Settings(endpoint_url=s3_service.endpoint_url, bucket=bucket, prefix=PREFIX,
                          region=s3_service.region, access_key_id=s3_service.access_key,
                          secret_access_key=s3_service.secret_key)
    return make_client(settings), settings


def all_keys(client, settings) -> list[str]:
    response = client.list_objects_v2(Bucket=settings.bucket, Prefix=settings.prefix)
    return sorted(obj["Key"] for obj in response.get("Contents", []))


def read_all(client, settings) -> tuple[list[ExperienceRecord], list]:
    reader = ExperienceReader(client, settings)
    records, raw = [], []
    for ref in reader.list_new(Watermark(prefix=settings.prefix)):
        result = reader.read(ref)
        assert result.ok, result.error
        records += result.records
        raw += result.raw_invalid
    return records, raw


@pytest.mark.integration
def test_writer_round_trip_every_kind(s3) -> None:
    client, settings = s3
    now = datetime.now(UTC)
    earlier = iso(now - timedelta(hours=3))
    records = one_of_each() + one_of_each(created_at=earlier)
    with ExperienceWriter(client, settings) as writer:
        writer.add_many(records)
        assert writer.pending == len(records) and all_keys(client, settings) == []
    assert writer.pending == 0
    keys = writer.written
    assert len(keys) == 2 * len(KINDS)  # one object per (kind, hour)
    for key in keys:
        info = parse_key(key, settings.prefix)
        assert info is not None and info.kind in KINDS
        head = client.head_object(Bucket=settings.bucket, Key=key)
        assert head["ContentType"] == "application/x-ndjson" and head["Metadata"]["records"] == "1"
    hours = {parse_key(k, settings.prefix).hour for k in keys}
    assert hours == {datetime.fromisoformat(earlier).replace(minute=0, second=0, microsecond=0),
                     datetime.fromisoformat(records[0].created_at).replace(minute=0, second=0, microsecond=0)}
    back, raw = read_all(client, settings)
    assert raw == []
    assert sorted(back, key=lambda r: r.id) == sorted(records, key=lambda r: r.id)
    assert all(r.origin is not None and r.origin.line == 1 for r in back)
    with pytest.raises(InvalidInputError, match="closed"):
        writer.add(one_of_each()[0])


@pytest.mark.integration
def test_writer_flushes_on_thresholds(s3) -> None:
    client, settings = s3
    writer = ExperienceWriter(client, settings, max_records=3)
    for i in range(7):
        writer.add(interaction(f"question {i}?", f"answer {i}"))
    assert len(writer.written) == 2 and writer.pending == 1
    writer.close()
    assert len(all_keys(client, settings)) == 3
    body = client.get_object(Bucket=settings.bucket, Key=writer.written[0])["Body"].read().decode()
    assert body.endswith("\n") and [json.loads(line)["prompt"] for line in body.splitlines()] == [
        "question 0?", "question 1?", "question 2?"]

    timed = ExperienceWriter(client, settings, max_delay_s=0.2)
    timed.add(interaction("quiet server?", "flushed by time"))
    deadline = time.monotonic() + 10
    while timed.pending and time.monotonic() < deadline:
        time.sleep(0.1)
    assert timed.pending == 0 and len(timed.written) == 1
    timed.close()


CRASHING_WRITER = """
import os, signal
from cl_core.data.experiences import ExperienceWriter, interaction
from cl_core.data.s3 import S3Settings, make_client
settings = S3Settings.from_env()
writer = ExperienceWriter(make_client(settings), settings)
for i in range(50):
    writer.add(interaction(f"q{i}", f"a{i}"))
print("buffered", writer.pending, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.integration
def test_a_crash_before_flush_leaves_no_object(s3) -> None:
    client, settings = s3
    env = {**os.environ, "CL_S3_ENDPOINT": settings.endpoint_url, "CL_S3_BUCKET": settings.bucket,
           "CL_S3_PREFIX": settings.prefix, "AWS_ACCESS_KEY_ID": settings.access_key_id,
           "AWS_SECRET_ACCESS_KEY": settings.secret_access_key, "AWS_DEFAULT_REGION": settings.region}
    done = subprocess.run([sys.executable, "-c", CRASHING_WRITER], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == -9 and "buffered 50" in done.stdout, done.stderr
    assert all_keys(client, settings) == []


@pytest.mark.integration
def test_concurrent_writers_write_every_record_once(s3) -> None:
    client, settings = s3
    shared = ExperienceWriter(client, settings, max_records=7)
    own = [ExperienceWriter(client, settings, max_records=11) for _ in range(2)]
    expected: list[str] = []
    lock = threading.Lock()

    def produce(writer: ExperienceWriter, name: str) -> None:
        for i in range(40):
            record = rating(f"{name} question {i}?", f"answer {i}", reward=0.5)
            with lock:
                expected.append(record.id)
            writer.add(record)

    threads = [threading.Thread(target=produce, args=(shared, f"t{n}")) for n in range(4)]
    threads += [threading.Thread(target=produce, args=(writer, f"w{n}")) for n, writer in enumerate(own)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for writer in [shared, *own]:
        writer.close()
    records, raw = read_all(client, settings)
    assert raw == []
    assert sorted(r.id for r in records) == sorted(expected) and len(expected) == 240


@pytest.mark.integration
def test_a_failed_flush_keeps_the_records(s3) -> None:
    _, settings = s3
    gone = S3Settings(endpoint_url=f"http://127.0.0.1:{closed_port()}", bucket=settings.bucket,
                      access_key_id="k", secret_access_key="s")
    writer = ExperienceWriter(make_client(gone), gone)
    writer.add_many(one_of_each())
    with pytest.raises(S3Unavailable):
        writer.flush()
    assert writer.pending == len(KINDS) and writer.written == []


@pytest.mark.integration
def test_reader_on_malformed_and_partial_objects(s3) -> None:
    client, settings = s3
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    good = one_of_each()
    partial = key_at_settings(settings, "interaction", hour)
    body = (good[0].to_json() + "\n" + '{"schema_version": 1, "id": "trunc').encode()
    client.put_object(Bucket=settings.bucket, Key=partial, Body=body)
    mixed = key_at_settings(settings, "rating", hour)
    not_utf8 = good[1].to_json().encode().replace(b"Nairobi", b"Nair\xffobi")  # a byte that is not UTF-8
    lines = [good[1].to_json().encode(), b"not json at all", b'"a string"', b'{"kind": "rating", "prompt": "p"}',
             not_utf8]
    client.put_object(Bucket=settings.bucket, Key=mixed, Body=b"\n".join(lines) + b"\r\n")
    client.put_object(Bucket=settings.bucket, Key=f"{settings.prefix}experiences/kind=rating/README.txt", Body=b"x")

    reader = ExperienceReader(client, settings)
    refs = reader.list_new(Watermark(prefix=settings.prefix))
    assert sorted(ref.key for ref in refs) == sorted([partial, mixed])  # the stray README is skipped
    results = {ref.key: reader.read(ref) for ref in refs}

    first = results[partial]
    assert first.ok and [r.id for r in first.records] == [good[0].id]
    assert [(r.key, r.line) for r in first.raw_invalid] == [(partial, 2)]
    assert "truncated last line" in first.raw_invalid[0].error

    second = results[mixed]
    assert [(r.line, r.error.split(":")[0]) for r in second.raw_invalid] == [
        (2, "malformed JSON"), (3, "malformed JSON"), (4, "schema")]
    assert len(second.records) == 2 and second.records[1].response == "Nair\udcffobi."  # bad byte kept for GX
    assert second.records[1].origin == (mixed, 5)

    client.delete_object(Bucket=settings.bucket, Key=mixed)
    vanished = reader.read(next(ref for ref in refs if ref.key == mixed))
    assert not vanished.ok and "NoSuchKey" in vanished.error and vanished.records == []


def key_at_settings(settings: S3Settings, kind: str, hour: datetime) -> str:
    return object_key(settings, kind, hour, datetime.now(UTC))


def write(client, settings, records) -> list[str]:
    with ExperienceWriter(client, settings) as writer:
        writer.add_many(records)
    return writer.written


@pytest.mark.integration
def test_pull_is_idempotent_and_commit_advances(s3) -> None:
    client, settings = s3
    store, reader = WatermarkStore(client, settings), ExperienceReader(client, settings)
    first_keys = write(client, settings, one_of_each())
    loaded = store.load()
    assert loaded.etag is None and loaded.kinds == {}
    once, again = pull(reader, loaded), pull(reader, loaded)
    assert sorted(once.objects) == sorted(first_keys) == sorted(again.objects)  # a re-run sees the same objects
    assert [r.id for r in once.records] == [r.id for r in again.records] and len(once.records) == len(KINDS)
    assert once.watermark is loaded

    committed = store.commit(once.new_watermark, expected_previous=once.watermark)
    assert committed.etag and store.load() == committed and store.load().etag == committed.etag
    assert pull(reader, store.load()).objects == []  # nothing new after the commit

    later = write(client, settings, [interaction("A new question?", "A new answer.")])
    fresh = pull(reader, store.load())
    assert fresh.objects == later and [r.prompt for r in fresh.records] == ["A new question?"]


@pytest.mark.integration
def test_a_late_object_in_a_passed_hour_is_pulled_once(s3) -> None:
    client, settings = s3
    store, reader = WatermarkStore(client, settings, lookback_hours=2), ExperienceReader(client, settings)
    now = datetime.now(UTC)
    write(client, settings, [rating("On time?", "Yes.", reward=1.0)])
    result = pull(reader, store.load())
    store.commit(result.new_watermark, result.watermark)

    late = write(client, settings, [rating("Late?", "Buffered for an hour.", reward=0.5,
                                           created_at=iso(now - timedelta(hours=1)))])
    too_late = write(client, settings, [rating("Too late?", "Older than the lookback.", reward=0.5,
                                               created_at=iso(now - timedelta(hours=5)))])
    assert parse_key(late[0], settings.prefix).hour < parse_key(result.objects[0], settings.prefix).hour
    second = pull(reader, store.load())
    assert second.objects == late and [r.prompt for r in second.records] == ["Late?"]
    assert too_late[0] not in second.objects  # behind the horizon: the documented limit of the lookback
    store.commit(second.new_watermark, second.watermark)
    assert pull(reader, store.load()).objects == []


@pytest.mark.integration
def test_pull_dedupes_records_by_id(s3) -> None:
    client, settings = s3
    record = interaction("Said twice?", "Written by a retried flush.")
    write(client, settings, [record])
    write(client, settings, [record, interaction("Other?", "Yes.")])
    result = pull(ExperienceReader(client, settings), WatermarkStore(client, settings).load())
    assert len(result.objects) == 2 and result.duplicates == 1
    assert sorted(r.prompt for r in result.records) == ["Other?", "Said twice?"]


@pytest.mark.parametrize("conditional", [True, False], ids=["if-match", "re-read"])
@pytest.mark.integration
def test_concurrent_commits_conflict(s3, conditional: bool) -> None:
    client, settings = s3
    store, reader = WatermarkStore(client, settings, conditional_writes=conditional), ExperienceReader(client, settings)
    write(client, settings, one_of_each())
    run_a, run_b = pull(reader, store.load()), pull(reader, store.load())  # two runs load the same (no) watermark
    store.commit(run_a.new_watermark, run_a.watermark)
    with pytest.raises(WatermarkConflict, match="another run committed first"):
        store.commit(run_b.new_watermark, run_b.watermark)

    write(client, settings, [interaction("Next?", "Next.")])
    run_c, run_d = pull(reader, store.load()), pull(reader, store.load())
    stored = store.commit(run_c.new_watermark, run_c.watermark)
    with pytest.raises(WatermarkConflict):
        store.commit(run_d.new_watermark, run_d.watermark)
    assert store.load().etag == stored.etag  # the refused commit changed nothing


@pytest.mark.integration
def test_simultaneous_commits_exactly_one_wins(s3) -> None:
    """If-Match is checked atomically by the server: of several runs committing at once, one succeeds."""
    client, settings = s3
    store, reader = WatermarkStore(client, settings), ExperienceReader(client, settings)
    write(client, settings, one_of_each())
    base = pull(reader, store.load())
    store.commit(base.new_watermark, base.watermark)
    write(client, settings, [interaction("One more?", "Yes.")])
    runs = [pull(reader, store.load()) for _ in range(6)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(runs))

    def commit(run) -> None:
        barrier.wait()
        try:
            store.commit(run.new_watermark, run.watermark)
            outcomes.append("won")
        except WatermarkConflict:
            outcomes.append("refused")

    threads = [threading.Thread(target=commit, args=(run,)) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused"] * 5 + ["won"]
    assert pull(reader, store.load()).objects == []


@pytest.mark.integration
def test_a_corrupted_watermark_is_an_error_not_a_restart(s3) -> None:
    client, settings = s3
    store = WatermarkStore(client, settings)
    client.put_object(Bucket=settings.bucket, Key=store.key, Body=b"{not json")
    with pytest.raises(WatermarkError, match="corrupted"):
        store.load()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.integration
def test_s3_outage_fails_fast_and_clearly() -> None:
    port = closed_port()
    settings = S3Settings(endpoint_url=f"http://127.0.0.1:{port}", bucket="cl-experiences",
                          access_key_id="k", secret_access_key="s")
    client = make_client(settings)
    for call in (lambda: ExperienceReader(client, settings).list_new(Watermark()),
                 lambda: WatermarkStore(client, settings).load(),
                 lambda: client.put_object(Bucket=settings.bucket, Key="x", Body=b"x")):
        started = time.monotonic()
        with pytest.raises(S3Unavailable) as caught:
            call()
        assert time.monotonic() - started < 15
        assert f"127.0.0.1:{port}" in str(caught.value) and "CL_S3_ENDPOINT" in str(caught.value)
    assert isinstance(caught.value, ConnectionError)


@pytest.mark.integration
def test_missing_bucket_names_the_variable(s3_service) -> None:
    settings = S3Settings(endpoint_url=s3_service.endpoint_url, bucket="no-such-bucket-here",
                          access_key_id=s3_service.access_key, secret_access_key=s3_service.secret_key)
    client = make_client(settings)
    with pytest.raises(S3Error, match="CL_S3_BUCKET"):
        ExperienceReader(client, settings).list_new(Watermark())
    writer = ExperienceWriter(client, settings)
    writer.add(one_of_each()[0])
    with pytest.raises(S3Error, match="CL_S3_BUCKET"):
        writer.flush()


def test_settings_from_env() -> None:
    settings = S3Settings.from_env({"CL_S3_ENDPOINT": "http://10.0.0.5:9000", "CL_S3_BUCKET": "b1",
                                    "CL_S3_PREFIX": "prod", "AWS_ACCESS_KEY_ID": "id",
                                    "AWS_SECRET_ACCESS_KEY": "secret", "AWS_DEFAULT_REGION": "eu-west-1"})
    assert (settings.endpoint_url, settings.bucket, settings.prefix, settings.region, settings.access_key_id) == (
        "http://10.0.0.5:9000", "b1", "prod/", "eu-west-1", "id")
    defaults = S3Settings.from_env({})
    assert (defaults.endpoint_url, defaults.bucket, defaults.prefix) == ("http://127.0.0.1:8333", "cl-experiences",
                                                                         "")
    assert S3Settings.from_env({"CL_S3_ENDPOINT": ""}).endpoint_url is None  # empty = AWS
    with pytest.raises(S3Error, match="CL_S3_ENDPOINT"):
        S3Settings.from_env({"CL_S3_ENDPOINT": "127.0.0.1:8333"})
    with pytest.raises(S3Error, match="CL_S3_BUCKET"):
        S3Settings.from_env({"CL_S3_BUCKET": "a/b"})
