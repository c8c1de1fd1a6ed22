"""The validation rules, one bad record at a time: each is caught by its named expectation and by nothing else,
while records in other scripts, code and moderate emoji pass. Pure: Great Expectations on an in-memory batch, no S3.
"""

from __future__ import annotations

import itertools
import json

import pytest

from cl_core.data.experiences import ExperienceRecord, correction, interaction, label, parse_lines, rating
from cl_core.data.validation import (
    MALFORMED,
    ValidationFailed,
    check_threshold,
    readable_fraction,
    validate,
    write_data_docs,
)
from cl_core.errors import InvalidInputError

MAX_TOKENS = 64


def words(prompt: str, answer: str) -> int:
    """A stand-in tokenizer: one token per whitespace-separated word."""
    return len(prompt.split()) + len(answer.split())


def run(records, raw=(), **kwargs):
    kwargs.setdefault("max_invalid_fraction", 1.0)
    return validate(records, raw, token_count=words, max_tokens=MAX_TOKENS, **kwargs)


GOOD = [
    interaction("What is the capital of Japan? 日本の首都は？", "東京 (Tokyo) is the capital."),
    rating("Write a function returning the first item.", "def f(x):\n    return x[0] if x else None  # <= ok",
           reward=0.5),
    rating("Say hello in Hindi", "नमस्ते दुनिया", reward=-1.0),
    correction("What is the capital of Turkey?", rejected="Istanbul.", chosen="Ankara."),
    label("Classify: 'book a table for two'", "restaurant_reservation", task="intent"),
    interaction("Rate this café in Zürich", "Great coffee 👍, friendly staff — 4/5 stars."),
    interaction("Compute 3*4+1", "3*4+1 = 13"),
    rating("Thanks!", "OK 👍", reward=1.0),
]


_numbers = itertools.count()


def bad(**fields) -> ExperienceRecord:
    """A record that is fine except for `fields` (each with its own prompt: no accidental duplicates)."""
    base = {"kind": "interaction", "prompt": f"A fine question number {next(_numbers)}?",
            "response": "A fine answer."}
    base.update(fields)
    return ExperienceRecord(**base)


# name -> (record, the only rules it must fail)
CASES: dict[str, tuple[ExperienceRecord, list[str]]] = {
    "empty prompt": (bad(prompt=""), ["prompt_not_empty"]),
    "whitespace prompt": (bad(prompt="  \n\t "), ["prompt_not_blank"]),
    "empty answer": (bad(response=""), ["response_not_empty"]),
    "whitespace answer": (bad(response="   "), ["response_not_blank"]),
    "answer without a letter or digit": (bad(response="?!?!"), ["response_has_words"]),
    "over the context": (bad(prompt="word " * MAX_TOKENS), ["tokens_within_context"]),
    "reward above 1": (bad(kind="rating", reward=1.5), ["reward_in_range"]),
    "reward below -1": (bad(kind="rating", reward=-2.0), ["reward_in_range"]),
    "rating without reward": (bad(kind="rating"), ["rating_has_reward"]),
    "correction without change": (bad(kind="correction", chosen="Same.", rejected="Same."),
                                  ["correction_chosen_differs"]),
    "correction without chosen": (bad(kind="correction", rejected="Bad."), ["correction_has_chosen"]),
    "correction without rejected": (bad(kind="correction", chosen="Good."), ["correction_has_rejected"]),
    "correction with blank chosen": (bad(kind="correction", chosen="  ", rejected="Bad."), ["chosen_not_blank"]),
    "unknown kind": (bad(kind="feedback"), ["kind_in_set"]),
    "future schema": (bad(schema_version=2), ["schema_version"]),
    "id not a uuid": (bad(id="record-1"), ["id_format"]),
    "created_at not ISO-8601": (bad(created_at="yesterday"), ["created_at_iso8601"]),
    "NUL in prompt": (bad(prompt="What is\x00 this?"), ["prompt_no_control_chars"]),
    "escape code in answer": (bad(response="\x1b[31mred\x1b[0m text"), ["response_no_control_chars"]),
    "replacement character": (bad(prompt="Caf\ufffd au lait?"), ["prompt_no_replacement_char"]),
    "bytes that were not UTF-8": (bad(response="bad \udcff byte here"), ["response_valid_utf8"]),
    "mojibake": (bad(prompt="How is cafÃ© spelled?"), ["prompt_no_mojibake"]),
    "box-drawing noise": (bad(response="\u2500\u2502\u250c\u2510" * 10 + " ok"), ["response_mostly_text"]),
    "emoji spam": (bad(prompt="😀🎉🔥💯" * 5 + " why?"), ["prompt_mostly_text"]),
    "bad text in rejected": (bad(kind="correction", chosen="Good.", rejected="Bad\x07."),
                             ["rejected_no_control_chars"]),
}


@pytest.fixture(scope="module")
def report():
    """One batch holding every good record and every bad case (GX runs once for the whole table)."""
    return run(GOOD + [record for record, _ in CASES.values()])


def test_good_records_pass(report) -> None:
    valid_ids = {r.id for r in report.valid}
    rejected = {bad.record_or_raw.prompt: bad.failed for bad in report.invalid if bad.record_or_raw.id in
                {r.id for r in GOOD}}
    assert not rejected
    assert {r.id for r in GOOD} <= valid_ids


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_record_fails_its_named_rule(report, case: str) -> None:
    record, expected = CASES[case]
    found = [bad for bad in report.invalid if bad.record_or_raw is record]
    assert len(found) == 1, f"{case}: not rejected"
    assert sorted(found[0].failed) == sorted(expected), f"{case}: failed {found[0].failed}, details {found[0].details}"
    assert set(found[0].details) == set(expected)
    assert record not in report.valid


def test_statistics_and_gx_result(report) -> None:
    stats = report.statistics
    assert stats["records"] == len(GOOD) + len(CASES)
    assert stats["valid"] == len(GOOD) and stats["invalid"] == len(CASES)
    assert stats["invalid_fraction"] == pytest.approx(len(CASES) / (len(GOOD) + len(CASES)))
    assert stats["failures"]["reward_in_range"] == 2
    assert stats["tokens"]["limit"] == MAX_TOKENS and stats["tokens"]["max"] > MAX_TOKENS
    json.dumps(report.gx_result)  # JSON-serialisable as is
    rules = [r["expectation_config"]["meta"]["rule"] for r in report.gx_result["results"]]
    assert len(rules) == len(set(rules)) == stats["expectations"]["evaluated"]
    reward = next(r for r in report.gx_result["results"] if r["expectation_config"]["meta"]["rule"] ==
                  "reward_in_range")
    assert reward["result"]["unexpected_count"] == 2
    failing_ids = {entry["id"] for entry in reward["result"]["unexpected_index_list"]}
    assert failing_ids == {CASES["reward above 1"][0].id, CASES["reward below -1"][0].id}


def test_unparseable_lines_and_schema_errors() -> None:
    good = GOOD[0].to_dict()
    lines = [
        json.dumps(good),
        '{"kind": "rating", "prompt": "half a record"}',
        json.dumps({**good, "id": "e" * 32, "prompt": 42}),
        json.dumps({**good, "id": "f" * 32, "prompt": "Another question?", "extra": "field"}),
        "[1, 2, 3]",
        "{not json",
        json.dumps({**good, "id": "a" * 32})[:40],  # cut short, no newline
    ]
    records, raw = parse_lines("experiences/x.jsonl", "\n".join(lines).encode())
    assert len(records) == 1 and len(raw) == 6
    report = run(records, raw)
    failed = {bad.line: bad.failed for bad in report.invalid}
    assert failed == {2: ["schema_required_fields", "rating_has_reward"], 3: ["schema_field_types"],
                      4: ["schema_known_fields"], 5: [MALFORMED], 6: [MALFORMED], 7: [MALFORMED]}
    assert all(bad.key == "experiences/x.jsonl" for bad in report.invalid)
    truncated = next(bad for bad in report.invalid if bad.line == 7)
    assert "truncated last line" in truncated.details[MALFORMED]
    missing = next(bad for bad in report.invalid if bad.line == 2)
    assert missing.details["schema_required_fields"] == "schema_version,id,created_at,response"
    assert report.statistics["malformed"] == 3
    assert [r.id for r in report.valid] == [GOOD[0].id]


def test_duplicates() -> None:
    first = interaction("What is 2+2?", "4")
    same_pair = interaction("What is 2+2?", "4")            # same kind, prompt and answer: later copy rejected
    other_kind = rating("What is 2+2?", "4", reward=1.0)     # a rating of that answer is not a duplicate
    twin = ExperienceRecord(**{**GOOD[1].to_dict(), "prompt": "Another prompt entirely"})  # same id as GOOD[1]
    report = run([first, same_pair, other_kind, GOOD[1], twin])
    failed = {id(bad.record_or_raw): bad.failed for bad in report.invalid}
    assert failed == {id(same_pair): ["duplicate_prompt_answer"], id(GOOD[1]): ["unique_id"],
                      id(twin): ["unique_id"]}
    assert [r.id for r in report.valid] == [first.id, other_kind.id]


def test_a_tokenizer_error_rejects_only_that_record() -> None:
    def fragile(prompt: str, answer: str) -> int:
        if "boom" in prompt:
            raise ValueError("cannot tokenize")
        return words(prompt, answer)

    boom = interaction("boom goes the tokenizer", "ok")
    report = validate([GOOD[0], boom], token_count=fragile, max_tokens=MAX_TOKENS)
    assert [bad.failed for bad in report.invalid] == [["token_count_ok"]]
    assert "cannot tokenize" in report.invalid[0].details["token_count_ok"]


def test_threshold() -> None:
    batch = [*GOOD[:4], bad(prompt=""), bad(kind="rating", reward=3.0)]  # 2 of 6 invalid
    passing = run(batch, max_invalid_fraction=0.5)
    assert passing.passed
    check_threshold(passing)  # at or under the threshold: no error
    check_threshold(passing, max_invalid_fraction=2 / 6)

    failing = run(batch, max_invalid_fraction=0.25)
    assert not failing.passed
    failing.quarantine_key = "quarantine/run=r1/invalid.jsonl"
    with pytest.raises(ValidationFailed) as caught:
        check_threshold(failing)
    message = str(caught.value)
    for part in ("2 of 6", "33.3%", "25.0%", "prompt_not_empty (1)", "reward_in_range (1)",
                 "quarantine/run=r1/invalid.jsonl"):
        assert part in message
    assert caught.value.fraction == pytest.approx(1 / 3) and caught.value.threshold == 0.25
    with pytest.raises(ValidationFailed, match="not quarantined yet"):
        check_threshold(run(batch), max_invalid_fraction=0.0)


def test_empty_batch_passes() -> None:
    report = run([], max_invalid_fraction=0.0)
    assert report.passed and report.total == 0 and report.invalid_fraction == 0.0
    check_threshold(report)


def test_bad_arguments() -> None:
    with pytest.raises(InvalidInputError, match="max_tokens"):
        validate([], token_count=words, max_tokens=0)
    with pytest.raises(InvalidInputError, match="max_invalid_fraction"):
        validate([], token_count=words, max_tokens=8, max_invalid_fraction=1.5)


def test_readable_fraction() -> None:
    assert readable_fraction("Hello, world!") == 1.0
    assert readable_fraction("नमस्ते") == 1.0  # combining vowel signs are marks, readable
    assert readable_fraction("a<=b || c>=d") == 1.0  # ASCII symbols count
    assert readable_fraction("OK 👍") == pytest.approx(0.9)  # short texts: over a 10-character window
    assert readable_fraction("\u2500" * 15 + "abcde") == pytest.approx(0.25)


def test_data_docs(report, tmp_path) -> None:
    page = write_data_docs(report, tmp_path / "docs", run_name="run-42")
    assert page.is_file() and page.suffix == ".html" and report.data_docs == page
    assert "run-42" in page.parts
    html = page.read_text()
    assert "experience_records" in html
    # each failing rule is named on the page, with the id of a record that failed it
    reward_case = CASES["reward above 1"][0]
    assert "reward_in_range: reward, where present, is in [-1, 1]" in html and reward_case.id in html
    assert "prompt_no_mojibake" in html
    assert (tmp_path / "docs" / "index.html").is_file()
