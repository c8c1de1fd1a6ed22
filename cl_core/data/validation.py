"""Great Expectations validation of pulled experience records, quarantine of the invalid ones, data docs.

One batch, one GX run: the records become a pandas DataFrame (plus a few columns computed here, in plain Python,
where GX has no expectation for the rule: token counts, duplicate occurrences, the share of readable characters),
an ephemeral GX context validates it against one `ExpectationSuite` with `result_format=COMPLETE` and
`unexpected_index_column_names=["id", "_row"]`, and every unexpected row is mapped back to its record through
`_row` (ids alone cannot: duplicate ids are one of the failures). Each expectation carries its rule name in
`meta["rule"]`; `InvalidRecord.failed` lists those names. Lines the reader could not parse never reach GX: they
are invalid with the rule `malformed_json`.

Rules (the names `failed` uses):

- schema: `schema_required_fields`, `schema_field_types`, `schema_known_fields`, `schema_version`, `kind_in_set`,
  `id_format`, `unique_id`, `created_at_iso8601`;
- content: `prompt_not_empty`, `response_not_empty`, `{prompt,response,chosen,rejected}_not_blank` (only
  whitespace), `..._has_words` (no letter or digit at all), `tokens_within_context`, `token_count_ok`,
  `reward_in_range`, `rating_has_reward`, `correction_has_chosen`, `correction_has_rejected`,
  `correction_chosen_differs`, `duplicate_prompt_answer` (an earlier record in the batch has the same kind, prompt
  and answer; the first one is kept);
- format, per text field: `..._no_control_chars` (NUL, C0/C1 controls other than tab/newline/CR),
  `..._no_replacement_char` (U+FFFD: text already damaged by a lossy decode), `..._valid_utf8` (lone surrogates:
  bytes that were not UTF-8), `..._no_mojibake` (UTF-8 read as Latin-1, e.g. "Ã©"), `..._mostly_text` (at least
  80% of the characters are letters, digits, punctuation, spaces or printable ASCII: not binary, emoji or
  box-drawing noise).

Cost: the GX import is ~4 s once per process; validating 1,000 records takes about a second on 2 shared CPU
cores, tokenizer included (measured in tests/pipeline/test_validation.py, reported in `statistics["seconds"]`).
Nothing here calls GX per record.
"""

from __future__ import annotations

import json
import math
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cl_core.data.experiences import (
    FIELDS,
    KINDS,
    REQUIRED_FIELDS,
    SCHEMA_VERSION,
    ExperienceRecord,
    RawRecord,
    type_problems,
)
from cl_core.data.s3 import S3Settings, reraise
from cl_core.errors import ContinualError, InvalidInputError

SUITE_NAME = "experience_records"
TEXT_FIELDS = ("prompt", "response", "chosen", "rejected")
MIN_TEXT_FRACTION = 0.8
TEXT_WINDOW = 10
MALFORMED = "malformed_json"

ID_REGEX = r"^[0-9a-f]{32}$"
ISO8601_REGEX = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:\d{2})$"
CONTROL_REGEX = r"[\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]"
REPLACEMENT_REGEX = r"\ufffd"
SURROGATES = re.compile(r"[\ud800-\udfff]")
FRAME_FIELDS = tuple(name for name in FIELDS if name != "metadata")  # free-form: not validated
MOJIBAKE_REGEX = r"[\u00c2\u00c3][\u0080-\u00bf]|\u00e2\u20ac"
NOT_BLANK_REGEX = r"^$|\S"  # empty text is `_not_empty`'s failure
HAS_WORDS_REGEX = r"^\s*$|[^\W_]"  # blank text is `_not_blank`'s failure, not this one's


class ValidationFailed(ContinualError):
    """Too large a share of a batch is invalid: the feed needs a person before anything trains on it."""

    def __init__(self, message: str, *, fraction: float, threshold: float, failures: dict[str, int],
                 quarantine_key: str | None) -> None:
        super().__init__(message)
        self.fraction, self.threshold, self.failures, self.quarantine_key = fraction, threshold, failures, \
            quarantine_key


@dataclass
class InvalidRecord:
    """A record (or unparseable line) with the rules it failed; `details[rule]` is the offending value."""

    record_or_raw: ExperienceRecord | RawRecord
    failed: list[str]
    details: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str | None:
        origin = self.record_or_raw.origin
        return origin.key if origin else None

    @property
    def line(self) -> int | None:
        origin = self.record_or_raw.origin
        return origin.line if origin else None

    def to_dict(self) -> dict[str, Any]:
        """The quarantine line: the record or the raw text, where it came from, and why it was rejected."""
        item = self.record_or_raw
        raw = isinstance(item, RawRecord)
        return {"object_key": self.key, "line": self.line, "failed": self.failed, "details": self.details,
                "record": item.data if raw else item.to_dict(), "raw": item.text if raw else None,
                "error": item.error if raw else None}


@dataclass
class ValidationReport:
    """The outcome of one validation. `passed` is False when the invalid share exceeds the threshold given to
    `validate`; `gx_result` is GX's JSON result (what data docs render and MLflow keeps)."""

    valid: list[ExperienceRecord]
    invalid: list[InvalidRecord]
    statistics: dict[str, Any]
    gx_result: dict[str, Any]
    passed: bool
    max_invalid_fraction: float = 1.0
    quarantine_key: str | None = None
    data_docs: Path | None = None

    @property
    def total(self) -> int:
        return len(self.valid) + len(self.invalid)

    @property
    def invalid_fraction(self) -> float:
        return len(self.invalid) / self.total if self.total else 0.0

    def failure_counts(self) -> Counter[str]:
        """How many records failed each rule, most common first."""
        return Counter(rule for bad in self.invalid for rule in bad.failed)


# ------------------------------------------------------------------------------------------- computed columns


def readable_fraction(text: str) -> float:
    """1 - the share of characters that are not letters, marks, digits, punctuation, separators or printable ASCII
    (symbols like + = < > are fine; emoji, box drawing, private-use, unassigned and control characters are not).
    The share is taken over at least `TEXT_WINDOW` characters, so a short answer may carry an emoji or two
    ("OK 👍") while a run of them fails."""
    odd = sum(1 for char in text if not (" " <= char <= "~" or char in "\t\n\r"
                                         or (char > "\x7f" and unicodedata.category(char)[0] in "LMNPZ")))
    return 1.0 - odd / max(len(text), TEXT_WINDOW)


def _encodable(text: str) -> str:
    """`text` with lone surrogates written as `\\udcXX` (pandas and pyarrow refuse them; the UTF-8 rule reads the
    `_invalid_utf8_*` columns, computed from the original text)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _frame(rows: Sequence[dict[str, Any]], token_count: Callable[[str, str], int]) -> Any:
    """The DataFrame GX validates: the schema fields (wrongly typed values blanked, the type rule reports them)
    plus computed columns, all columns present even when no record has the field."""
    import pandas as pd

    columns: dict[str, list[Any]] = {name: [] for name in (*FRAME_FIELDS, "_row", "_missing_fields", "_type_errors",
                                                           "_unknown_fields", "n_tokens", "_token_error",
                                                           "_pair_occurrence", "_chosen_equals_rejected")}
    for name in TEXT_FIELDS:
        columns[f"_text_fraction_{name}"] = []
        columns[f"_invalid_utf8_{name}"] = []
    seen_pairs: Counter[tuple[str, str, str]] = Counter()
    for index, data in enumerate(rows):
        present = {key: value for key, value in data.items() if value is not None}
        problems = type_problems(present)
        bad = set(problems)
        values = {name: (None if name in bad else data.get(name)) for name in FIELDS}
        columns["_row"].append(index)
        columns["_missing_fields"].append(",".join(n for n in REQUIRED_FIELDS if data.get(n) is None))
        columns["_type_errors"].append("; ".join(problems.values()))
        columns["_unknown_fields"].append(",".join(sorted(str(k) for k in data if k not in FIELDS)))
        for name in FRAME_FIELDS:
            value = values[name]
            columns[name].append(_encodable(value) if isinstance(value, str) else value)
        kind, prompt = values["kind"], values["prompt"]
        answers = ([values["chosen"], values["rejected"]] if kind == "correction" else [values["response"]])
        tokens: float = math.nan
        token_error = ""
        if isinstance(prompt, str) and all(isinstance(a, str) for a in answers):
            try:
                tokens = float(max(token_count(prompt, answer) for answer in answers))
            except Exception as exc:  # a tokenizer choking on one record must not sink the batch
                token_error = f"{type(exc).__name__}: {exc}"
        columns["n_tokens"].append(tokens)
        columns["_token_error"].append(token_error)
        answer = answers[0]
        occurrence: float = math.nan
        if isinstance(kind, str) and isinstance(prompt, str) and isinstance(answer, str):
            occurrence = float(seen_pairs[(kind, prompt, answer)])
            seen_pairs[(kind, prompt, answer)] += 1
        columns["_pair_occurrence"].append(occurrence)
        chosen, rejected = values["chosen"], values["rejected"]
        columns["_chosen_equals_rejected"].append(
            chosen == rejected if isinstance(chosen, str) and isinstance(rejected, str) else None)
        for name in TEXT_FIELDS:
            text = values[name]
            columns[f"_text_fraction_{name}"].append(readable_fraction(text) if isinstance(text, str) else math.nan)
            columns[f"_invalid_utf8_{name}"].append(
                " ".join(_encodable(c) for c in SURROGATES.findall(text)) if isinstance(text, str) else "")
    frame = pd.DataFrame({name: pd.Series(values, dtype=object) for name, values in columns.items()})
    for name in ("reward", "n_tokens", "_pair_occurrence", *(f"_text_fraction_{t}" for t in TEXT_FIELDS)):
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype(float)
    frame["_row"] = frame["_row"].astype(int)
    return frame


# ------------------------------------------------------------------------------------------------- the suite


def build_suite(max_tokens: int) -> Any:
    """The expectation suite for a context of `max_tokens` tokens (prompt + answer). Each expectation carries its
    rule name in `meta["rule"]` and a one-line description that data docs show in place of GX's generic text."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    def rule(name: str, says: str, expectation: Any) -> Any:
        expectation.meta = {"rule": name}
        expectation.description = f"{name}: {says}"
        return expectation

    correction = Column("kind") == "correction"
    kinds = ", ".join(KINDS)
    expectations = [
        rule("schema_required_fields", f"every record has {', '.join(REQUIRED_FIELDS)} (not null)",
             gxe.ExpectColumnValuesToBeInSet(column="_missing_fields", value_set=[""])),
        rule("schema_field_types", "text fields are strings, reward a number, metadata an object",
             gxe.ExpectColumnValuesToBeInSet(column="_type_errors", value_set=[""])),
        rule("schema_known_fields", f"no field outside schema v{SCHEMA_VERSION}",
             gxe.ExpectColumnValuesToBeInSet(column="_unknown_fields", value_set=[""])),
        rule("schema_version", f"schema_version is {SCHEMA_VERSION}",
             gxe.ExpectColumnValuesToBeInSet(column="schema_version", value_set=[SCHEMA_VERSION])),
        rule("kind_in_set", f"kind is one of {kinds}", gxe.ExpectColumnValuesToBeInSet(column="kind",
                                                                                      value_set=list(KINDS))),
        rule("id_format", "id is a uuid4 hex string", gxe.ExpectColumnValuesToMatchRegex(column="id", regex=ID_REGEX)),
        rule("unique_id", "no two records share an id (every copy is rejected: which one is right is unknown)",
             gxe.ExpectColumnValuesToBeUnique(column="id")),
        rule("created_at_iso8601", "created_at is an ISO-8601 timestamp with a time zone",
             gxe.ExpectColumnValuesToMatchRegex(column="created_at", regex=ISO8601_REGEX)),
        rule("prompt_not_empty", "the prompt is not empty",
             gxe.ExpectColumnValueLengthsToBeBetween(column="prompt", min_value=1)),
        rule("response_not_empty", "the answer is not empty",
             gxe.ExpectColumnValueLengthsToBeBetween(column="response", min_value=1)),
        rule("tokens_within_context", f"prompt + answer fit the training context of {max_tokens} tokens",
             gxe.ExpectColumnValuesToBeBetween(column="n_tokens", max_value=max_tokens)),
        rule("token_count_ok", "the tokenizer could count the record's tokens",
             gxe.ExpectColumnValuesToBeInSet(column="_token_error", value_set=[""])),
        rule("reward_in_range", "reward, where present, is in [-1, 1]",
             gxe.ExpectColumnValuesToBeBetween(column="reward", min_value=-1.0, max_value=1.0)),
        rule("rating_has_reward", "a rating has a reward",
             gxe.ExpectColumnValuesToNotBeNull(column="reward", row_condition=Column("kind") == "rating")),
        rule("correction_has_chosen", "a correction has the corrected answer (chosen)",
             gxe.ExpectColumnValuesToNotBeNull(column="chosen", row_condition=correction)),
        rule("correction_has_rejected", "a correction has the bad answer (rejected)",
             gxe.ExpectColumnValuesToNotBeNull(column="rejected", row_condition=correction)),
        rule("correction_chosen_differs", "a correction's chosen answer differs from the rejected one",
             gxe.ExpectColumnValuesToBeInSet(column="_chosen_equals_rejected", value_set=[False],
                                             row_condition=correction)),
        rule("duplicate_prompt_answer", "no earlier record in the batch has the same kind, prompt and answer",
             gxe.ExpectColumnValuesToBeBetween(column="_pair_occurrence", max_value=0)),
    ]
    for name in TEXT_FIELDS:
        expectations += [
            rule(f"{name}_not_blank", f"{name} is not only whitespace",
                 gxe.ExpectColumnValuesToMatchRegex(column=name, regex=NOT_BLANK_REGEX)),
            rule(f"{name}_has_words", f"{name} has at least one letter or digit",
                 gxe.ExpectColumnValuesToMatchRegex(column=name, regex=HAS_WORDS_REGEX)),
            rule(f"{name}_no_control_chars", f"{name} has no NUL or control characters (tab, newline, CR allowed)",
                 gxe.ExpectColumnValuesToNotMatchRegex(column=name, regex=CONTROL_REGEX)),
            rule(f"{name}_no_replacement_char", f"{name} has no U+FFFD (text damaged by a lossy decode)",
                 gxe.ExpectColumnValuesToNotMatchRegex(column=name, regex=REPLACEMENT_REGEX)),
            rule(f"{name}_valid_utf8", f"{name} was valid UTF-8 (no undecodable bytes)",
                 gxe.ExpectColumnValuesToBeInSet(column=f"_invalid_utf8_{name}", value_set=[""])),
            rule(f"{name}_no_mojibake", f"{name} has no UTF-8-read-as-Latin-1 sequences such as \u00c3\u00a9",
                 gxe.ExpectColumnValuesToNotMatchRegex(column=name, regex=MOJIBAKE_REGEX)),
            rule(f"{name}_mostly_text",
                 f"at least {MIN_TEXT_FRACTION:.0%} of {name} is letters, digits, punctuation or spaces",
                 gxe.ExpectColumnValuesToBeBetween(column=f"_text_fraction_{name}", min_value=MIN_TEXT_FRACTION)),
        ]
    return gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations)


def _context() -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


# --------------------------------------------------------------------------------------------------- validate


def validate(records: Iterable[ExperienceRecord], raw_invalid: Iterable[RawRecord] = (), *,
             token_count: Callable[[str, str], int], max_tokens: int,
             max_invalid_fraction: float = 0.2) -> ValidationReport:
    """Validate one batch. `token_count(prompt, answer)` is the number of tokens the trainer will see (for a
    correction the longer of chosen/rejected counts); `max_tokens` the model's context for training."""
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidInputError(f"max_tokens must be a positive integer (the training context), got {max_tokens!r}")
    if not 0.0 <= max_invalid_fraction <= 1.0:
        raise InvalidInputError(f"max_invalid_fraction must be in [0, 1], got {max_invalid_fraction!r}")
    started = time.perf_counter()
    records, raw_invalid = list(records), list(raw_invalid)
    items: list[ExperienceRecord | RawRecord] = [*records, *(raw for raw in raw_invalid if raw.data is not None)]
    rows = [item.data if isinstance(item, RawRecord) else item.to_dict() for item in items]  # type: ignore[misc]
    frame = _frame(rows, token_count)
    built = time.perf_counter()

    context = _context()
    batch_definition = (context.data_sources.add_pandas("experiences").add_dataframe_asset("records")
                        .add_batch_definition_whole_dataframe("pulled"))
    suite = context.suites.add(build_suite(max_tokens))
    result = batch_definition.get_batch(batch_parameters={"dataframe": frame}).validate(
        suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["id", "_row"]})
    gx_result = result.to_json_dict()
    validated = time.perf_counter()

    failures: dict[int, dict[str, str]] = {}
    for outcome in gx_result["results"]:
        rule_name = outcome["expectation_config"]["meta"]["rule"]
        if outcome.get("exception_info", {}).get("raised_exception"):
            raise RuntimeError(f"Great Expectations could not evaluate rule {rule_name}: "
                               f"{outcome['exception_info'].get('exception_message')}")
        if outcome["success"]:
            continue
        column = outcome["expectation_config"]["kwargs"].get("column")
        for entry in outcome["result"].get("unexpected_index_list") or []:
            failures.setdefault(int(entry["_row"]), {})[rule_name] = _detail(column, entry.get(column), max_tokens)

    valid: list[ExperienceRecord] = []
    invalid: list[InvalidRecord] = []
    for index, item in enumerate(items):
        failed = failures.get(index)
        if isinstance(item, RawRecord) and not failed:  # cannot happen with the rules above; never pass it on
            failed = {"schema_field_types": item.error}
        if failed:
            invalid.append(InvalidRecord(item, list(failed), failed))
        else:
            valid.append(item)  # type: ignore[arg-type]
    for raw in raw_invalid:
        if raw.data is None:
            invalid.append(InvalidRecord(raw, [MALFORMED], {MALFORMED: raw.error}))

    total = len(valid) + len(invalid)
    fraction = len(invalid) / total if total else 0.0
    by_kind: dict[str, dict[str, int]] = {}
    for record in valid:
        by_kind.setdefault(record.kind, {"valid": 0, "invalid": 0})["valid"] += 1
    for bad in invalid:
        kind = bad.record_or_raw.kind if isinstance(bad.record_or_raw, ExperienceRecord) else None
        if kind is None and isinstance(bad.record_or_raw, RawRecord) and bad.record_or_raw.data:
            kind = str(bad.record_or_raw.data.get("kind"))
        by_kind.setdefault(kind or "(unparsed)", {"valid": 0, "invalid": 0})["invalid"] += 1
    tokens = frame["n_tokens"].dropna()
    finished = time.perf_counter()
    statistics = {
        "records": total, "valid": len(valid), "invalid": len(invalid), "invalid_fraction": fraction,
        "max_invalid_fraction": max_invalid_fraction, "malformed": sum(r.data is None for r in raw_invalid),
        "by_kind": by_kind,
        "failures": dict(Counter(rule for bad in invalid for rule in bad.failed).most_common()),
        "tokens": {"max": int(tokens.max()) if len(tokens) else 0,
                   "mean": float(tokens.mean()) if len(tokens) else 0.0, "limit": max_tokens},
        "expectations": {"evaluated": len(gx_result["results"]),
                         "failed": sum(not r["success"] for r in gx_result["results"])},
        "seconds": {"prepare": built - started, "gx": validated - built, "total": finished - started},
        "validated_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return ValidationReport(valid=valid, invalid=invalid, statistics=statistics, gx_result=gx_result,
                            passed=fraction <= max_invalid_fraction, max_invalid_fraction=max_invalid_fraction)


def _detail(column: str | None, value: Any, max_tokens: int, limit: int = 200) -> str:
    """The offending value in words, for the quarantine line."""
    if column == "_pair_occurrence":
        return f"{int(value)} earlier record(s) in this batch with the same kind, prompt and answer"
    if column == "n_tokens":
        return f"{int(value)} tokens, over the limit of {max_tokens}"
    if column and column.startswith("_text_fraction_"):
        return f"{value:.0%} readable characters (minimum {MIN_TEXT_FRACTION:.0%})"
    if column == "_chosen_equals_rejected":
        return "chosen == rejected"
    if column and column.startswith("_invalid_utf8_"):
        return f"not UTF-8: {value}"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


# ------------------------------------------------------------------------------------ threshold, quarantine, docs


def check_threshold(report: ValidationReport, max_invalid_fraction: float | None = None,
                    quarantine_key: str | None = None) -> None:
    """Raise `ValidationFailed` when more than `max_invalid_fraction` (default: the report's) of the batch is
    invalid. The message names the fraction, the threshold, the most common failures and the quarantine key."""
    threshold = report.max_invalid_fraction if max_invalid_fraction is None else max_invalid_fraction
    fraction = report.invalid_fraction
    if fraction <= threshold:
        return
    counts = report.failure_counts()
    common = ", ".join(f"{rule} ({n})" for rule, n in counts.most_common(5))
    key = quarantine_key or report.quarantine_key
    where = f"quarantined at {key}" if key else "not quarantined yet (call quarantine() first)"
    raise ValidationFailed(
        f"{len(report.invalid)} of {report.total} records are invalid ({fraction:.1%}), over the threshold of "
        f"{threshold:.1%}. Most common failures: {common}. The invalid records are {where}. Fix the feed (or raise "
        "validation.max_invalid_fraction if this share is expected) and run again.",
        fraction=fraction, threshold=threshold, failures=dict(counts), quarantine_key=key)


def quarantine_key(settings: S3Settings, run_id: str) -> str:
    if not run_id or not re.fullmatch(r"[A-Za-z0-9._:=-]+", run_id):
        raise InvalidInputError(f"run_id {run_id!r} must be a non-empty path segment of letters, digits and "
                                "._:=- (no '/')")
    return f"{settings.prefix}quarantine/run={run_id}/invalid.jsonl"


def quarantine(client: Any, settings: S3Settings, run_id: str, report: ValidationReport) -> str:
    """Write the invalid records of `report` as one object, `{prefix}quarantine/run={run_id}/invalid.jsonl`
    (one JSON line each: record or raw text, object key, line, failed rules, details). Returns the key and
    records it in `report.quarantine_key`."""
    key = quarantine_key(settings, run_id)
    lines = []
    for bad in report.invalid:
        data = bad.to_dict()
        line = json.dumps(data, ensure_ascii=False, default=str)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from undecodable bytes: keep them, escaped
            line = json.dumps(data, ensure_ascii=True, default=str)
        lines.append(line + "\n")
    try:
        client.put_object(Bucket=settings.bucket, Key=key, Body="".join(lines).encode("utf-8"),
                          ContentType="application/x-ndjson", Metadata={"records": str(len(lines))})
    except Exception as exc:
        reraise(exc, settings, client)
    report.quarantine_key = key
    return key


def write_data_docs(report: ValidationReport, out_dir: str | Path, run_name: str | None = None) -> Path:
    """Great Expectations data docs for this validation, built by GX itself from an ephemeral context with a
    filesystem site at `out_dir` (index.html, the validation page, static assets; styles load from GX's CDN when
    online and the pages stay readable offline). Returns the validation page; `report.data_docs` is set to it."""
    from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResultSchema
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_name = run_name or f"validation-{report.statistics.get('validated_at', 'run')}"
    context = _context()
    context.add_data_docs_site(site_name="run", site_config={
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(out)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    result = ExpectationSuiteValidationResultSchema().load(report.gx_result)
    run_id = RunIdentifier(run_name=run_name, run_time=datetime.now(UTC))
    result.meta["run_id"] = run_id
    key = ValidationResultIdentifier(expectation_suite_identifier=ExpectationSuiteIdentifier(name=SUITE_NAME),
                                     run_id=run_id, batch_identifier="pulled")
    context.validation_results_store.set(key, result)
    context.build_data_docs(site_names=["run"])
    pages = sorted((out / "validations" / SUITE_NAME / run_name).rglob("*.html"), key=lambda p: p.stat().st_mtime)
    if not pages:
        raise RuntimeError(f"Great Expectations built no validation page under {out}")
    report.data_docs = pages[-1]
    return pages[-1]
