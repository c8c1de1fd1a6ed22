"""The durable pull watermark: which experience objects a successful run has already consumed.

Stored as one S3 object, `{prefix}_state/watermark.json`, replaced whole on every commit. Per kind it holds the
newest key processed, the newest partition hour, and the set of keys processed within a lookback window (default
2 h) before that hour. A pull lists each kind from the window's start (the *horizon*) and skips the keys in the
set, so:

- an object that lands late in an hour already passed (a writer that buffered, a retried upload, clock skew) is
  still found, as long as its hour is within the lookback of the newest processed hour;
- nothing is returned twice: a key stays in the set until its hour falls behind the horizon, and from then on it
  is not listed at all;
- a pull is deterministic: the same watermark over the same bucket lists the same objects, so a failed run that
  never committed is simply pulled again.

An object older than the horizon when it lands is not picked up: choose `lookback_hours` longer than the worst
delay between a record's `created_at` and its flush.

A run commits after it has finished with the batch, with compare-and-swap against the watermark it loaded:
`PutObject` with `If-Match: <ETag loaded>` (or `If-None-Match: *` when there was none). SeaweedFS (4.x) and AWS S3
honour these conditions atomically; a concurrent run's commit is refused with `WatermarkConflict`. A server that
answers the conditional put with 501 NotImplemented gets a re-read-and-compare fallback instead, which is not
atomic (a commit landing between the read and the put can be lost): prefer a server with conditional writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cl_core.data.experiences import (
    ExperienceReader,
    ExperienceRecord,
    RawRecord,
    parse_key,
    utc_now_iso,
)
from cl_core.data.s3 import S3Settings, error_code, reraise
from cl_core.errors import ContinualError, InvalidInputError

log = logging.getLogger(__name__)

WATERMARK_KEY = "_state/watermark.json"
FORMAT = 1
DEFAULT_LOOKBACK_HOURS = 2.0


class WatermarkError(ContinualError):
    """The stored watermark cannot be used (unreadable, corrupted, or written by a newer format)."""


class WatermarkConflict(WatermarkError):
    """The stored watermark changed since this run loaded it: another run committed first."""


def _floor_hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class KindMark:
    """Progress of one kind: newest key and partition hour processed, and the keys processed in the window."""

    last_key: str
    newest_hour: datetime
    recent: frozenset[str]


@dataclass(frozen=True)
class Watermark:
    """An immutable watermark. `etag` is the ETag of the stored object it was loaded from (None: nothing stored
    yet, or not stored: `advance` returns an unstored watermark)."""

    kinds: Mapping[str, KindMark] = field(default_factory=dict)
    lookback_hours: float = DEFAULT_LOOKBACK_HOURS
    prefix: str = ""
    updated_at: str | None = None
    run_id: str | None = None
    etag: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.lookback_hours >= 0:
            raise InvalidInputError(f"lookback_hours must be >= 0, got {self.lookback_hours}")

    @property
    def processed(self) -> frozenset[str]:
        """Every key in the window of every kind."""
        return frozenset().union(*(mark.recent for mark in self.kinds.values()))

    def horizon(self, kind: str) -> datetime | None:
        """The first partition hour a pull lists for `kind` (None: list everything, the kind is new)."""
        mark = self.kinds.get(kind)
        if mark is None:
            return None
        return _floor_hour(mark.newest_hour - timedelta(hours=self.lookback_hours))

    def seen(self, key: str) -> bool:
        return any(key in mark.recent for mark in self.kinds.values())

    def advance(self, processed_keys: Iterable[str], *, now: datetime | None = None,
                run_id: str | None = None) -> Watermark:
        """A new watermark that also covers `processed_keys` (experience object keys); pure apart from `now`.

        A partition hour later than the current hour (`now`, default the clock) counts as the current hour: a
        client with a clock in the future cannot push the horizon past objects that have not been written yet.
        Keys whose hour falls behind the new horizon are dropped from the window (they are no longer listed).
        """
        cap = _floor_hour(now or datetime.now(UTC))
        by_kind: dict[str, list[tuple[str, datetime]]] = {}
        for key in processed_keys:
            info = parse_key(key, self.prefix)
            if info is None:
                raise InvalidInputError(f"{key!r} is not an experience object key under prefix {self.prefix!r}; "
                                        "only keys returned by ExperienceReader.list_new can advance a watermark")
            by_kind.setdefault(info.kind, []).append((key, info.hour))
        kinds = dict(self.kinds)
        for kind, entries in by_kind.items():
            old = kinds.get(kind)
            newest = max([min(hour, cap) for _, hour in entries] + ([old.newest_hour] if old else []))
            last_key = max([key for key, _ in entries] + ([old.last_key] if old else []))
            horizon = _floor_hour(newest - timedelta(hours=self.lookback_hours))
            keys = {key: hour for key, hour in entries}
            if old is not None:
                for key in old.recent:
                    info = parse_key(key, self.prefix)
                    keys[key] = info.hour if info else newest
            recent = frozenset(key for key, hour in keys.items() if hour >= horizon)
            kinds[kind] = KindMark(last_key=last_key, newest_hour=newest, recent=recent)
        return dataclasses.replace(self, kinds=kinds, updated_at=utc_now_iso(), run_id=run_id, etag=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "lookback_hours": self.lookback_hours,
            "updated_at": self.updated_at,
            "run_id": self.run_id,
            "kinds": {kind: {"last_key": mark.last_key, "newest_hour": _iso(mark.newest_hour),
                             "recent": sorted(mark.recent)}
                      for kind, mark in sorted(self.kinds.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, prefix: str = "", etag: str | None = None,
                  lookback_hours: float | None = None) -> Watermark:
        if data.get("format") != FORMAT:
            raise WatermarkError(f"watermark format {data.get('format')!r} is not supported (this code reads "
                                 f"format {FORMAT})")
        kinds = {kind: KindMark(last_key=str(mark["last_key"]),
                                newest_hour=datetime.fromisoformat(mark["newest_hour"]).astimezone(UTC),
                                recent=frozenset(str(key) for key in mark["recent"]))
                 for kind, mark in dict(data["kinds"]).items()}
        lookback = float(data["lookback_hours"]) if lookback_hours is None else lookback_hours
        return cls(kinds=kinds, lookback_hours=lookback, prefix=prefix, updated_at=data.get("updated_at"),
                   run_id=data.get("run_id"), etag=etag)


class WatermarkStore:
    """Loads and commits the watermark object. `lookback_hours` applies from the next `advance` on (a stored
    watermark keeps its keys; a shorter window drops the older ones at the next advance)."""

    def __init__(self, client: Any, settings: S3Settings, *, lookback_hours: float = DEFAULT_LOOKBACK_HOURS,
                 conditional_writes: bool = True) -> None:
        self.client, self.settings = client, settings
        self.lookback_hours = lookback_hours
        self.conditional_writes = conditional_writes
        self.key = f"{settings.prefix}{WATERMARK_KEY}"

    @property
    def url(self) -> str:
        return f"s3://{self.settings.bucket}/{self.key}"

    def load(self) -> Watermark:
        """The committed watermark, or an empty one (with `etag=None`) when none was ever committed. A stored
        object that cannot be parsed raises `WatermarkError`: starting over silently would count every object
        again."""
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.settings.bucket, Key=self.key)
            body = response["Body"].read()
        except ClientError as exc:
            if error_code(exc) in {"NoSuchKey", "404", "NotFound"}:
                return Watermark(lookback_hours=self.lookback_hours, prefix=self.settings.prefix)
            reraise(exc, self.settings, self.client)
        try:
            return Watermark.from_dict(json.loads(body), prefix=self.settings.prefix, etag=response["ETag"],
                                       lookback_hours=self.lookback_hours)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WatermarkError(
                f"the watermark at {self.url} is corrupted ({exc}). Restore it from a backup, or delete it to "
                "pull every experience object again (records will then be trained on twice).") from exc

    def commit(self, new: Watermark, expected_previous: Watermark) -> Watermark:
        """Store `new` if the stored watermark is still `expected_previous` (compare-and-swap on the ETag);
        returns `new` with its stored ETag. Raises `WatermarkConflict` when another run committed in between."""
        from botocore.exceptions import ClientError

        body = json.dumps(new.to_dict(), indent=1).encode("utf-8")
        params = {"Bucket": self.settings.bucket, "Key": self.key, "Body": body, "ContentType": "application/json"}
        if self.conditional_writes:
            condition = ({"IfMatch": expected_previous.etag} if expected_previous.etag is not None
                         else {"IfNoneMatch": "*"})
            try:
                response = self.client.put_object(**params, **condition)
                return dataclasses.replace(new, etag=response["ETag"])
            except ClientError as exc:
                code = error_code(exc)
                if code in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}:
                    raise self._conflict(expected_previous) from exc
                if code not in {"NotImplemented", "501"}:
                    reraise(exc, self.settings, self.client)
                log.warning("%s does not support conditional puts; falling back to re-read and compare "
                            "(not atomic)", self.settings.where)
        current = self.load()
        if current.etag != expected_previous.etag:
            raise self._conflict(expected_previous)
        response = self.client.put_object(**params)
        return dataclasses.replace(new, etag=response["ETag"])

    def _conflict(self, expected: Watermark) -> WatermarkConflict:
        was = f"ETag {expected.etag}" if expected.etag else "no watermark"
        return WatermarkConflict(
            f"the watermark at {self.url} changed since this run loaded it ({was}): another run committed first. "
            "This run's commit is refused so no object is counted twice; its objects stay pulled by that run's "
            "watermark or will be pulled again by the next run.")


@dataclass
class PullResult:
    """One pull. `new_watermark` covers `objects`; commit it (with `watermark` as the expected previous) once the
    run has finished with the records. Unreadable objects are left out of it, so the next pull tries them again."""

    records: list[ExperienceRecord]
    raw_invalid: list[RawRecord]
    objects: list[str]
    new_watermark: Watermark
    watermark: Watermark
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    duplicates: int = 0


def pull(reader: ExperienceReader, watermark: Watermark, *, max_objects: int | None = None,
         now: datetime | None = None) -> PullResult:
    """Read every object `watermark` has not seen: records (deduplicated by id, first kept), malformed lines,
    the keys read, and the advanced watermark. Nothing is committed here."""
    records: list[ExperienceRecord] = []
    raw: list[RawRecord] = []
    objects: list[str] = []
    unreadable: list[tuple[str, str]] = []
    ids: set[str] = set()
    duplicates = 0
    for ref in reader.list_new(watermark, limit=max_objects):
        result = reader.read(ref)
        if not result.ok:
            log.warning("skipping unreadable experience object: %s", result.error)
            unreadable.append((ref.key, result.error or ""))
            continue
        objects.append(ref.key)
        raw.extend(result.raw_invalid)
        for record in result.records:
            if record.id in ids:
                duplicates += 1
                continue
            ids.add(record.id)
            records.append(record)
    return PullResult(records=records, raw_invalid=raw, objects=objects,
                      new_watermark=watermark.advance(objects, now=now), watermark=watermark,
                      unreadable=unreadable, duplicates=duplicates)
