"""Tasks from BIG-bench JSON tasks, read out of the pinned `bigbench==1.0.0` sdist.

The sdist is 358 MB; only the task.json files of the tasks listed here are needed (a few MB). On first use the
sdist is downloaded (or taken from `CL_CORE_BIGBENCH_SDIST`), verified, read once as a stream, the listed
task.json files are written into the cache, and the download is deleted. Keep your own copy and point
`CL_CORE_BIGBENCH_SDIST` at it to avoid downloading again when the list grows.

BIG-bench data carries a canary asking that it never be used to train published models: fine for local
continual-learning experiments, not for models you release.
"""

from __future__ import annotations

import json
import random
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl_core.errors import InvalidInputError
from cl_core.streams.common import answer_budget, check_sizes, derive_seed, split, unique_by_prompt
from cl_core.streams.fetch import BIGBENCH, TaskDataError, fetch, streams_cache, write_atomic
from cl_core.streams.task import EXACT_MATCH, Task, TaskExample

PREFIX = "bigbench/"
_MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/{path}/task.json"
CANARY = "BIG-bench canary: do not train models you publish on this data."


@dataclass(frozen=True)
class BigBenchSpec:
    """How one BIG-bench task becomes prompts and short answers.

    `list_choices` adds an "Options: a, b, c" line to the prompt, so the label set is stated (turned off where the
    task's own prefix already lists it). `prefer_digits` picks the digit form among several accepted targets
    ("three" / "3"), so counting tasks answer with a number. Inputs longer than `max_input_chars` are left out, which
    keeps prompts under ~200 tokens so that training stays fast. `summary` is a one-line description.
    """

    path: str
    summary: str
    list_choices: bool = True
    prefer_digits: bool = False
    max_input_chars: int = 400


SPECS: dict[str, BigBenchSpec] = {spec.path: spec for spec in (
    BigBenchSpec("intent_recognition", "Name the intent of a voice-assistant utterance (7 snake_case labels).",
                 list_choices=False),
    BigBenchSpec("sports_understanding", "Is a sports statement plausible or implausible?"),
    BigBenchSpec("multiemo/reviews_sentence_en",
                 "Sentiment of a review sentence: positive, negative, neutral or ambivalent."),
    BigBenchSpec("color/rgb", "Name the basic color closest to an rgb(...) value (10 color words)."),
    BigBenchSpec("cs_algorithms/valid_parentheses", "Is a bracket sequence properly matched? Valid or Invalid."),
    BigBenchSpec("implicatures", "Does an indirect answer mean yes or no?"),
    BigBenchSpec("navigate", "Do movement instructions return to the start? True or False."),
    BigBenchSpec("winowhy", "Is a pronoun-resolution explanation correct or incorrect?"),
    BigBenchSpec("strategyqa", "Yes/no questions that need implicit multi-step knowledge."),
    BigBenchSpec("anachronisms", "Does a sentence contain an anachronism? Yes or No."),
    BigBenchSpec("object_counting", "Count the objects of a kind in a list; the answer is a number.",
                 list_choices=False, prefer_digits=True),
)}


def names() -> list[str]:
    return [PREFIX + path for path in SPECS]


def data_dir() -> Path:
    return streams_cache() / "bigbench-1.0.0"


def _spec(name: str) -> BigBenchSpec:
    path = name.removeprefix(PREFIX)
    if path not in SPECS:
        raise InvalidInputError(f"unknown BIG-bench task {name!r}; known: {names()}")
    return SPECS[path]


def task_json(path: str) -> dict[str, Any]:
    """The parsed task.json of a listed task, extracting the listed tasks from the sdist if it is not cached."""
    cached = data_dir() / path / "task.json"
    if not cached.is_file():
        _extract(sorted(p for p in SPECS if not (data_dir() / p / "task.json").is_file()))
    try:
        return json.loads(cached.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        cached.unlink(missing_ok=True)  # the next call extracts it again
        raise TaskDataError(f"cached BIG-bench file {cached} was unreadable ({exc}) and has been removed; retry to "
                            f"extract it again from {BIGBENCH.requirement}") from exc


def _extract(paths: list[str]) -> None:
    """One streaming pass over the sdist writes each wanted task.json into the cache (atomically, one by one)."""
    wanted = {_MEMBER.format(path=path): path for path in paths}
    data_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir(), prefix=".download-") as tmp:
        sdist = fetch(BIGBENCH, Path(tmp))
        try:
            with tarfile.open(sdist, mode="r|gz") as archive:
                for member in archive:
                    path = wanted.pop(member.name, None)
                    if path is None or not member.isfile():
                        continue
                    handle = archive.extractfile(member)
                    if handle is None:
                        continue
                    data = handle.read()
                    json.loads(data)  # refuse to cache a file that does not parse
                    write_atomic(data_dir() / path / "task.json", data)
                    if not wanted:
                        break
        except (tarfile.TarError, OSError, EOFError, json.JSONDecodeError) as exc:
            raise TaskDataError(f"could not read {sdist} ({BIGBENCH.requirement}): {exc}; delete it and retry") \
                from exc
    if wanted:
        raise TaskDataError(f"{BIGBENCH.filename} has no {sorted(wanted)}: the task list does not match the pinned "
                            "release")


def _prompt(data: dict[str, Any], example: dict[str, Any], choices: tuple[str, ...], spec: BigBenchSpec) -> str:
    lines = []
    prefix = str(data.get("task_prefix", "")).strip()
    if prefix:
        lines.append(prefix)
    lines.append(f"{str(data.get('example_input_prefix', '')).strip()} {example['input'].strip()}".strip())
    if spec.list_choices and choices:
        lines.append("Options: " + ", ".join(choices))
    suffix = str(data.get("example_output_prefix", "")).strip()
    if suffix:
        lines.append(suffix)
    return "\n".join(lines)


def _answer(example: dict[str, Any], spec: BigBenchSpec) -> tuple[str, tuple[str, ...]] | None:
    """(answer, choices) of one example, or None when it has no single best answer."""
    scores = example.get("target_scores")
    if scores:
        best = max(scores.values())
        winners = [choice for choice, score in scores.items() if score == best]
        if len(winners) != 1 or best <= 0:
            return None
        return winners[0], tuple(scores)
    target = example.get("target")
    targets = [target] if isinstance(target, str) else list(target or [])
    if not targets:
        return None
    if spec.prefer_digits:
        targets.sort(key=lambda t: not t.strip().lstrip("-").isdigit())
    return targets[0], ()


def load(name: str, n_train: int, n_test: int, seed: int) -> Task:
    """Shuffle the task's distinct examples by (name, seed); test = the first `n_test`, train = the next `n_train`."""
    spec = _spec(name)
    check_sizes(name, n_train, n_test)
    data = task_json(spec.path)
    examples = []
    for raw in data.get("examples", []):
        picked = _answer(raw, spec)
        text = str(raw.get("input", "")).strip()
        if picked is None or not text or len(text) > spec.max_input_chars:
            continue
        answer, choices = picked
        examples.append(TaskExample(prompt=_prompt(data, raw, choices, spec), answer=answer, choices=choices))
    examples = unique_by_prompt(examples)
    random.Random(derive_seed(name, seed)).shuffle(examples)
    train, test = split(name, examples, n_train, n_test)
    return Task(name=name, train=train, test=test, scoring=EXACT_MATCH,
                max_answer_tokens=answer_budget(ex.answer for ex in (*train, *test)),
                description=f"{spec.summary} ({len(examples)} distinct examples.) {CANARY}",
                source=BIGBENCH.requirement)
