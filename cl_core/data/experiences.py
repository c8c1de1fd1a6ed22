"""Experience records in S3: the record schema, the object layout, a writer of whole objects and a reader.

Layout (documented for other readers in docs/experience-layout.md):

    {prefix}experiences/kind={kind}/date=YYYY-MM-DD/hour=HH/{YYYYMMDDTHHMMSS.ffffffZ}-{uuid8}.jsonl

One JSON record per line (UTF-8, "\\n"-terminated). `date`/`hour` are the UTC hour of the records' `created_at`
(the hour the data belongs to, what an analyst filters on); the file name is the flush time, so keys of one
partition sort by write time. An object is written with one `put_object`, which S3 makes visible whole or not at
all: a writer that crashes before or during a flush leaves no partial record behind.

The writer checks only what the layout needs (a known kind, a parseable `created_at`, JSON-representable values).
What training needs (non-empty text, reward range, lengths, ...) is checked by Great Expectations in
`validation.py`, so records a buggy client wrote still reach S3, are read back and are quarantined with a reason
instead of vanishing. The builder helpers (`interaction`, `rating`, `correction`, `label`) are stricter: a caller
that builds a record from arguments gets an immediate error for a bad argument.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from cl_core.data.s3 import S3Settings, S3Unavailable, error_code, reraise
from cl_core.errors import InvalidInputError

if TYPE_CHECKING:
    from cl_core.data.watermark import Watermark

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KINDS = ("interaction", "rating", "correction", "label")
EXPERIENCES_DIR = "experiences/"
CONTENT_TYPE = "application/x-ndjson"

REQUIRED_FIELDS = ("schema_version", "id", "kind", "created_at", "prompt", "response")
OPTIONAL_FIELDS = ("task", "reward", "chosen", "rejected", "source", "model", "metadata")
FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
_STR_FIELDS = ("id", "kind", "created_at", "task", "prompt", "response")
_OPTIONAL_STR_FIELDS = ("chosen", "rejected", "source", "model")

KEY_PATTERN = re.compile(
    r"experiences/kind=(?P<kind>[^/]+)/date=(?P<date>\d{4}-\d{2}-\d{2})/hour=(?P<hour>\d{2})/"
    r"(?P<flushed>\d{8}T\d{6}\.\d{6}Z)-(?P<uid>[0-9a-f]{8})\.jsonl$")


class RecordError(InvalidInputError):
    """A mapping cannot be an `ExperienceRecord`: a required field is missing, a field has the wrong type, or a
    field is unknown to this schema version."""


def utc_now_iso() -> str:
    """The current UTC time as ISO-8601 with microseconds and a "Z" suffix (the form `created_at` uses)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str) -> datetime:
    """An ISO-8601 timestamp as an aware UTC datetime; naive times are refused (their hour is ambiguous)."""
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"created_at {value!r} is not an ISO-8601 timestamp "
                                "(use e.g. 2025-01-31T12:00:00Z)") from exc
    if parsed.tzinfo is None:
        raise InvalidInputError(f"created_at {value!r} has no time zone: add 'Z' (UTC) or an offset")
    return parsed.astimezone(UTC)


class Origin(NamedTuple):
    """Where a record was read from: object key and 1-based line number."""

    key: str
    line: int


@dataclass(kw_only=True)
class ExperienceRecord:
    """One experience: a served interaction, a rating of an answer, a correction (preference pair) or a label.

    - `response`: the answer served (interaction, rating, correction) or the gold answer (label).
    - `reward`: in [-1, 1]; required for "rating".
    - `chosen` / `rejected`: required for "correction": the corrected answer and the bad one.
    - `model`: the served version that produced `response` (e.g. "adapter@v7"), for lineage.
    - `origin`: where the record was read from (not serialised).

    The constructor checks types only (a str is a str, `reward` a finite number or None): content rules are
    validation's job, see the module docstring.
    """

    kind: str
    prompt: str
    response: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: str = field(default_factory=utc_now_iso)
    schema_version: int = SCHEMA_VERSION
    task: str = "default"
    reward: float | None = None
    chosen: str | None = None
    rejected: str | None = None
    source: str | None = None
    model: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    origin: Origin | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        problems = type_problems(self.to_dict())
        if problems:
            raise RecordError(f"experience record {self.id!r}: " + "; ".join(problems.values()))
        if self.reward is not None:
            self.reward = float(self.reward)

    def to_dict(self) -> dict[str, Any]:
        """The record as stored: every schema field (None where unset), no `origin`."""
        return {name: getattr(self, name) for name in FIELDS}

    def to_json(self) -> str:
        """One JSONL line (without the newline). Non-ASCII text stays readable UTF-8; a string holding lone
        surrogates (bytes that were not UTF-8 when read) is written \\u-escaped, so the object is always valid
        UTF-8 and the bad text still reaches validation's UTF-8 check. NaN is refused."""
        line = json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            line = json.dumps(self.to_dict(), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
        return line

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: Origin | None = None) -> ExperienceRecord:
        """A record from its stored form. Raises `RecordError` naming every missing, unknown or mistyped field
        (the reader turns that into a `RawRecord` so validation can quarantine it)."""
        if not isinstance(data, Mapping):
            raise RecordError(f"an experience record is a JSON object, got {type(data).__name__}")
        missing = [name for name in REQUIRED_FIELDS if name not in data]
        unknown = sorted(str(name) for name in data if name not in FIELDS)
        problems = [f"missing field {name!r}" for name in missing]
        problems += [f"unknown field {name!r} (schema v{SCHEMA_VERSION} has {', '.join(FIELDS)})"
                     for name in unknown]
        problems += type_problems(data).values()
        if problems:
            raise RecordError("; ".join(problems))
        values = {name: data[name] for name in FIELDS if name in data}
        if values.get("metadata") is None:
            values["metadata"] = {}
        if values.get("task") is None:
            values["task"] = "default"
        return cls(**values, origin=origin)


def type_problems(data: Mapping[str, Any]) -> dict[str, str]:
    """Type errors of the fields present in `data`, by field (missing fields are not reported here)."""
    problems: dict[str, str] = {}
    for name in _STR_FIELDS:
        if name in data and not isinstance(data[name], str):
            problems[name] = f"{name} must be a string, got {type(data[name]).__name__}"
    for name in _OPTIONAL_STR_FIELDS:
        if data.get(name) is not None and not isinstance(data[name], str):
            problems[name] = f"{name} must be a string or null, got {type(data[name]).__name__}"
    version = data.get("schema_version")
    if "schema_version" in data and (not isinstance(version, int) or isinstance(version, bool)):
        problems["schema_version"] = f"schema_version must be an integer, got {type(version).__name__}"
    reward = data.get("reward")
    if reward is not None:
        if not isinstance(reward, int | float) or isinstance(reward, bool):
            problems["reward"] = f"reward must be a number or null, got {type(reward).__name__}"
        elif not math.isfinite(reward):
            problems["reward"] = f"reward must be finite, got {reward}"
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        problems["metadata"] = f"metadata must be a JSON object, got {type(metadata).__name__}"
    return problems


# ----------------------------------------------------------------------------------------------- record builders


def _text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _common(task: str, source: str | None, model: str | None, metadata: Mapping[str, Any] | None,
            created_at: str | None) -> dict[str, Any]:
    if created_at is not None:
        parse_time(created_at)
    return {"task": _text("task", task), "source": source, "model": model, "metadata": dict(metadata or {}),
            "created_at": created_at or utc_now_iso()}


def interaction(prompt: str, response: str, *, reward: float | None = None, task: str = "default",
                source: str | None = None, model: str | None = None, metadata: Mapping[str, Any] | None = None,
                created_at: str | None = None) -> ExperienceRecord:
    """A served prompt/response pair (optionally with an implicit reward)."""
    if reward is not None:
        _check_reward(reward)
    return ExperienceRecord(kind="interaction", prompt=_text("prompt", prompt), response=_text("response", response),
                            reward=reward, **_common(task, source, model, metadata, created_at))


def rating(prompt: str, response: str, reward: float, *, task: str = "default", source: str | None = None,
           model: str | None = None, metadata: Mapping[str, Any] | None = None,
           created_at: str | None = None) -> ExperienceRecord:
    """A user's rating of a served answer, `reward` in [-1, 1] (1 = good, -1 = bad)."""
    _check_reward(reward)
    return ExperienceRecord(kind="rating", prompt=_text("prompt", prompt), response=_text("response", response),
                            reward=float(reward), **_common(task, source, model, metadata, created_at))


def correction(prompt: str, *, rejected: str, chosen: str, task: str = "default", source: str | None = None,
               model: str | None = None, metadata: Mapping[str, Any] | None = None,
               created_at: str | None = None) -> ExperienceRecord:
    """A correction: the answer served (`rejected`, also stored as `response`) and the corrected one (`chosen`),
    a preference pair."""
    chosen, rejected = _text("chosen", chosen), _text("rejected", rejected)
    if chosen == rejected:
        raise InvalidInputError("a correction's chosen and rejected answers are identical: nothing to learn")
    return ExperienceRecord(kind="correction", prompt=_text("prompt", prompt), response=rejected, chosen=chosen,
                            rejected=rejected, **_common(task, source, model, metadata, created_at))


def label(prompt: str, answer: str, *, task: str = "default", source: str | None = None,
          metadata: Mapping[str, Any] | None = None, created_at: str | None = None) -> ExperienceRecord:
    """Labelled data: a prompt and its gold answer (stored as `response`)."""
    return ExperienceRecord(kind="label", prompt=_text("prompt", prompt), response=_text("answer", answer),
                            **_common(task, source, None, metadata, created_at))


def _check_reward(reward: object) -> None:
    if (not isinstance(reward, int | float) or isinstance(reward, bool) or not math.isfinite(reward)
            or not -1.0 <= reward <= 1.0):
        raise InvalidInputError(f"reward must be a finite number in [-1, 1], got {reward!r}")


# ------------------------------------------------------------------------------------------------------ layout


class KeyInfo(NamedTuple):
    """What an object key says: the kind, the UTC hour of its records, and when it was flushed."""

    kind: str
    hour: datetime
    flushed_at: datetime


def kind_prefix(settings: S3Settings, kind: str) -> str:
    return f"{settings.prefix}{EXPERIENCES_DIR}kind={kind}/"


def hour_prefix(settings: S3Settings, kind: str, hour: datetime) -> str:
    """The partition prefix of `hour` (UTC), e.g. `experiences/kind=rating/date=2025-01-31/hour=07/`."""
    hour = hour.astimezone(UTC)
    return f"{kind_prefix(settings, kind)}date={hour:%Y-%m-%d}/hour={hour:%H}/"


def object_key(settings: S3Settings, kind: str, hour: datetime, flushed_at: datetime) -> str:
    flushed = flushed_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{hour_prefix(settings, kind, hour)}{flushed}-{uuid.uuid4().hex[:8]}.jsonl"


def parse_key(key: str, prefix: str = "") -> KeyInfo | None:
    """The layout fields of an experience object key under `prefix` (`S3Settings.prefix`); None for a key
    outside the layout."""
    if not key.startswith(prefix):
        return None
    match = KEY_PATTERN.fullmatch(key[len(prefix):])
    if match is None:
        return None
    try:
        hour = datetime.strptime(f"{match['date']}T{match['hour']}", "%Y-%m-%dT%H").replace(tzinfo=UTC)
        flushed = datetime.strptime(match["flushed"], "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return KeyInfo(match["kind"], hour, flushed)


# ------------------------------------------------------------------------------------------------------ writer


class ExperienceWriter:
    """Buffers records and writes each (kind, hour) group as one whole object with a single `put_object`.

    Thread-safe. `add` flushes when the buffer reaches `max_records` records or `max_bytes` bytes; `flush()`,
    `close()` and leaving a `with` block flush the rest; with `max_delay_s` a background thread also flushes
    buffered records after that many seconds, so a quiet server does not hold records for long. A record is
    durable once the `flush()` that wrote it has returned. When a put fails, the records of the groups not written
    go back into the buffer (none lost, none written twice) and the error (e.g. `S3Unavailable`) is raised.
    """

    def __init__(self, client: Any, settings: S3Settings, *, max_records: int = 1000,
                 max_bytes: int = 8 * 1024 * 1024, max_delay_s: float | None = None) -> None:
        if max_records < 1 or max_bytes < 1:
            raise InvalidInputError(f"max_records and max_bytes must be >= 1, got {max_records}, {max_bytes}")
        if max_delay_s is not None and not max_delay_s > 0:
            raise InvalidInputError(f"max_delay_s must be > 0 or None, got {max_delay_s}")
        self.client, self.settings = client, settings
        self.max_records, self.max_bytes, self.max_delay_s = max_records, max_bytes, max_delay_s
        self._lock = threading.Lock()
        self._buffer: list[tuple[ExperienceRecord, str, datetime]] = []  # (record, json line, partition hour)
        self._bytes = 0
        self._in_flight = 0  # records taken by a flush that has not returned yet
        self._oldest: float | None = None
        self._closed = False
        self.written: list[str] = []  # keys written by this writer, in order
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        if max_delay_s is not None:
            self._timer = threading.Thread(target=self._flush_periodically, name="experience-writer-flush",
                                           daemon=True)
            self._timer.start()

    @property
    def pending(self) -> int:
        """Records not yet durable: buffered, or in a flush that has not returned."""
        with self._lock:
            return len(self._buffer) + self._in_flight

    def add(self, record: ExperienceRecord) -> None:
        """Buffer one record (flushing when a threshold is reached)."""
        if not isinstance(record, ExperienceRecord):
            raise InvalidInputError(f"add() takes an ExperienceRecord, got {type(record).__name__}; build one with "
                                    "interaction(), rating(), correction() or label()")
        if record.kind not in KINDS:
            raise InvalidInputError(f"unknown kind {record.kind!r}: the layout has {', '.join(KINDS)}")
        hour = parse_time(record.created_at).replace(minute=0, second=0, microsecond=0)
        try:
            line = record.to_json()
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"record {record.id} is not JSON-serialisable: {exc}") from exc
        with self._lock:
            if self._closed:
                raise InvalidInputError("this ExperienceWriter is closed; make a new one")
            self._buffer.append((record, line, hour))
            self._bytes += len(line.encode("utf-8")) + 1
            if self._oldest is None:
                self._oldest = time.monotonic()
            full = len(self._buffer) >= self.max_records or self._bytes >= self.max_bytes
        if full:
            self.flush()

    def add_many(self, records: Iterable[ExperienceRecord]) -> None:
        for record in records:
            self.add(record)

    def flush(self) -> list[str]:
        """Write everything buffered; returns the keys written by this call."""
        with self._lock:
            batch, self._buffer, self._bytes, self._oldest = self._buffer, [], 0, None
            self._in_flight += len(batch)
        if not batch:
            return []
        groups: dict[tuple[str, datetime], list[tuple[ExperienceRecord, str, datetime]]] = {}
        for item in batch:
            groups.setdefault((item[0].kind, item[2]), []).append(item)
        written: list[str] = []
        items = list(groups.items())
        try:
            for index, ((kind, hour), group) in enumerate(items):
                key = object_key(self.settings, kind, hour, datetime.now(UTC))
                body = "".join(line + "\n" for _, line, _ in group).encode("utf-8")
                try:
                    self.client.put_object(Bucket=self.settings.bucket, Key=key, Body=body,
                                           ContentType=CONTENT_TYPE,
                                           Metadata={"records": str(len(group)),
                                                     "schema-version": str(SCHEMA_VERSION)})
                except Exception as exc:
                    self._requeue([item for _, rest in items[index:] for item in rest])
                    reraise(exc, self.settings, self.client)
                written.append(key)
        finally:
            with self._lock:
                self._in_flight -= len(batch)
                self.written.extend(written)
        return written

    def _requeue(self, items: list[tuple[ExperienceRecord, str, datetime]]) -> None:
        with self._lock:
            self._buffer[:0] = items
            self._bytes += sum(len(line.encode("utf-8")) + 1 for _, line, _ in items)
            self._oldest = time.monotonic()  # the background flush retries after max_delay_s, not every tick

    def _flush_periodically(self) -> None:
        assert self.max_delay_s is not None
        while not self._stop.wait(min(self.max_delay_s, 1.0)):
            with self._lock:
                due = self._oldest is not None and time.monotonic() - self._oldest >= self.max_delay_s
            if due:
                try:
                    self.flush()
                except Exception:  # the records stay buffered; the next tick or close() retries
                    log.exception("background flush of experience records failed; will retry")

    def close(self) -> None:
        """Refuse further records and flush what is buffered (raises if the final flush fails; the records then
        stay in `pending` and a later `flush()` may retry)."""
        with self._lock:
            self._closed = True
        self._stop.set()
        if self._timer is not None:
            self._timer.join(timeout=5)
        self.flush()

    def __enter__(self) -> ExperienceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------------ reader


@dataclass(frozen=True)
class ObjectRef:
    """An experience object found by listing."""

    key: str
    size: int
    etag: str
    kind: str
    hour: datetime
    last_modified: datetime | None = None


@dataclass(frozen=True)
class RawRecord:
    """A line that is not a usable record: bad JSON, not an object, a truncated last line, or a JSON object that
    does not fit the schema (then `data` holds it, so validation can name the failed expectations)."""

    key: str
    line: int
    text: str
    error: str
    data: dict[str, Any] | None = None

    @property
    def origin(self) -> Origin:
        return Origin(self.key, self.line)


@dataclass
class ReadResult:
    """What one object held. `error` is set (and nothing else) when the object could not be read at all."""

    ref: ObjectRef
    records: list[ExperienceRecord] = field(default_factory=list)
    raw_invalid: list[RawRecord] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_lines(key: str, body: bytes) -> tuple[list[ExperienceRecord], list[RawRecord]]:
    """Records and malformed lines of one JSONL body. Bytes that are not UTF-8 are kept as lone surrogates
    (`surrogateescape`), so a record with a bad byte in a string reaches validation's UTF-8 check instead of
    being lost; blank lines are skipped."""
    records: list[ExperienceRecord] = []
    raw: list[RawRecord] = []
    lines = body.split(b"\n")
    complete = body.endswith(b"\n")
    for number, chunk in enumerate(lines, start=1):
        if not chunk.strip():
            continue
        text = chunk.decode("utf-8", "surrogateescape").rstrip("\r")
        last_unterminated = number == len(lines) and not complete
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except ValueError as exc:
            what = "truncated last line (no newline; the object was cut short)" if last_unterminated else "bad JSON"
            raw.append(RawRecord(key, number, text, f"malformed JSON: {what}: {exc}"))
            continue
        if not isinstance(data, dict):
            raw.append(RawRecord(key, number, text, f"malformed JSON: the line is a {type(data).__name__}, "
                                                    "not an object"))
            continue
        try:
            records.append(ExperienceRecord.from_dict(data, origin=Origin(key, number)))
        except RecordError as exc:
            raw.append(RawRecord(key, number, text, f"schema: {exc}", data=data))
    return records, raw


class ExperienceReader:
    """Lists and reads experience objects. `list_new(watermark)` gives the objects a watermark has not seen;
    `read(ref)` never raises for one bad object (it is reported in the result), only for an S3 outage
    (`S3Unavailable`), so a pull fails whole and is retried rather than skipping data."""

    def __init__(self, client: Any, settings: S3Settings, *, max_object_bytes: int = 256 * 1024 * 1024) -> None:
        self.client, self.settings, self.max_object_bytes = client, settings, max_object_bytes

    def kinds(self) -> list[str]:
        """The kind partitions present in the bucket (unknown kinds too: their records fail validation loudly
        instead of being ignored)."""
        prefix = f"{self.settings.prefix}{EXPERIENCES_DIR}"
        found: set[str] = set()
        for page in self._pages(Prefix=prefix, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                part = common["Prefix"][len(prefix):].rstrip("/")
                if part.startswith("kind="):
                    found.add(part[len("kind="):])
        return sorted(found)

    def list_objects(self, kind: str, start_hour: datetime | None = None) -> Iterator[ObjectRef]:
        """Objects of `kind` in key order, from the partition of `start_hour` on (all when None). Keys that do
        not follow the layout are logged and skipped."""
        params: dict[str, Any] = {"Prefix": kind_prefix(self.settings, kind)}
        if start_hour is not None:
            params["StartAfter"] = hour_prefix(self.settings, kind, start_hour).rstrip("/")
        for page in self._pages(**params):
            for obj in page.get("Contents", []):
                info = parse_key(obj["Key"], self.settings.prefix)
                if info is None or info.kind != kind:
                    log.warning("s3://%s/%s is not an experience object of the documented layout; skipped",
                                self.settings.bucket, obj["Key"])
                    continue
                yield ObjectRef(key=obj["Key"], size=int(obj.get("Size", 0)), etag=str(obj.get("ETag", "")),
                                kind=kind, hour=info.hour, last_modified=obj.get("LastModified"))

    def list_new(self, watermark: Watermark, limit: int | None = None) -> list[ObjectRef]:
        """Objects not yet processed according to `watermark`, oldest partition first.

        Per kind, listing starts at the watermark's horizon (its newest processed hour minus the lookback) and
        skips keys the watermark has processed, so a late object in an already-passed hour is still found and
        nothing is returned twice. Deterministic: the same watermark over the same bucket gives the same list.
        `limit` caps the number of objects (the rest come in the next pull)."""
        refs: list[ObjectRef] = []
        for kind in self.kinds():
            start = watermark.horizon(kind)
            refs.extend(ref for ref in self.list_objects(kind, start) if not watermark.seen(ref.key))
        refs.sort(key=lambda ref: (ref.hour, ref.key))
        return refs[:limit] if limit is not None else refs

    def read(self, ref: ObjectRef) -> ReadResult:
        """Records and malformed lines of one object; an object that cannot be read is reported in `error`."""
        from botocore.exceptions import ClientError

        if ref.size > self.max_object_bytes:
            return ReadResult(ref, error=f"object is {ref.size} bytes, over the reader's limit of "
                                         f"{self.max_object_bytes}")
        try:
            response = self.client.get_object(Bucket=self.settings.bucket, Key=ref.key)
            body = response["Body"].read()
        except S3Unavailable:
            raise
        except ClientError as exc:
            return ReadResult(ref, error=f"cannot read s3://{self.settings.bucket}/{ref.key}: "
                                         f"{error_code(exc) or exc}")
        except Exception as exc:  # a body cut short mid-stream, a decoding error in botocore, ...
            from cl_core.data.s3 import translate_error

            clear = translate_error(exc, self.settings)
            if isinstance(clear, S3Unavailable):
                raise clear from exc
            return ReadResult(ref, error=f"cannot read s3://{self.settings.bucket}/{ref.key}: {exc}")
        records, raw = parse_lines(ref.key, body)
        return ReadResult(ref, records=records, raw_invalid=raw)

    def _pages(self, **params: Any) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            yield from paginator.paginate(Bucket=self.settings.bucket, **params)
        except Exception as exc:
            reraise(exc, self.settings, self.client)
