"""Tasks of a continual-learning stream: examples, scoring against an inference backend, JSON form.

A task is plain data (prompts and target answers) so that a built stream can be written to a file by one pipeline
stage and read by later stages without the packages the data came from. Scoring talks to a backend through a
two-method protocol and sends the whole evaluation set in ONE call, because the real backend is vLLM and batching is
what makes it fast.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from cl_core.errors import InvalidInputError

EXACT_MATCH = "exact_match"
CHOICE_LOGPROB = "choice_logprob"
GENERATOR = "generator"
SCORINGS = (EXACT_MATCH, CHOICE_LOGPROB, GENERATOR)
FORMAT = "cl_core.streams/v1"
_TRAILING = ".,;:!?"


@runtime_checkable
class InferenceBackend(Protocol):
    """What scoring needs from a model. Prompts are plain user-message text; the backend applies its chat template.

    `generate` decodes greedily, one completion per prompt, at most `max_tokens` new tokens each.
    `score_pairs` returns, for each (prompt, response), the SUM of the log-probabilities of the response tokens given
    the chat-formatted prompt (the same quantity vLLM's prompt logprobs give).
    """

    def generate(self, prompts: list[str], max_tokens: int) -> list[str]: ...

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]: ...


def normalize_answer(text: str) -> str:
    """The form compared by exact match: surrounding whitespace removed, casefolded, trailing `.,;:!?` removed.

    So " Positive." matches "positive" and "3!" matches "3", but "3 apples" does not match "3": the answer must be
    the whole response. Inner text is untouched ("search_screening_event" must be spelled exactly).
    """
    return text.strip().casefold().rstrip(_TRAILING).rstrip()


@dataclass(frozen=True)
class TaskExample:
    """One example: the user message, the target response, and the candidate answers for choice scoring.

    `answer` is both the training target and the reference for exact match. `metadata` is the generator's
    per-example record as JSON text (reasoning-gym scorers read it); it is empty for other sources.
    """

    prompt: str
    answer: str
    choices: tuple[str, ...] = ()
    metadata: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "answer": self.answer}
        if self.choices:
            out["choices"] = list(self.choices)
        if self.metadata:
            out["metadata"] = self.metadata
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskExample:
        return cls(prompt=data["prompt"], answer=data["answer"], choices=tuple(data.get("choices", ())),
                   metadata=data.get("metadata", ""))


@dataclass(frozen=True)
class Task:
    """A named task with disjoint train and test examples and the way its test examples are scored.

    `scoring` is "exact_match" (greedy text compared after `normalize_answer`), "choice_logprob" (the choice with
    the highest summed log-probability must be the answer), or "generator" (the mean of the source generator's own
    scorer, used for reasoning-gym tasks whose generator defines one; needs the reasoning-gym wheel, which is
    fetched into the cache on first use). `max_answer_tokens` is the generation budget for scoring: the longest
    answer plus room for the end-of-turn token.
    """

    name: str
    train: tuple[TaskExample, ...]
    test: tuple[TaskExample, ...]
    scoring: str
    max_answer_tokens: int
    description: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise InvalidInputError(f"task {self.name!r}: scoring {self.scoring!r} is not one of {list(SCORINGS)}")
        if self.max_answer_tokens < 1:
            raise InvalidInputError(f"task {self.name!r}: max_answer_tokens must be >= 1, got "
                                    f"{self.max_answer_tokens}")
        if self.scoring == CHOICE_LOGPROB:
            _check_choices(self.name, self.test)

    @property
    def labels(self) -> tuple[str, ...]:
        """The distinct answers of the train and test examples, sorted (the label set of a classification task)."""
        return tuple(sorted({ex.answer for ex in (*self.train, *self.test)}))

    def score(self, backend: InferenceBackend, examples: Sequence[TaskExample] | None = None,
              scoring: str | None = None) -> float:
        """Accuracy in [0, 1] of `backend` on the test examples (or `examples`), by `scoring` (default: the task's).

        Under "generator" scoring it is the mean reward of the generator's scorer, which may give partial credit.
        """
        values = self.example_scores(backend, examples, scoring)
        return sum(values) / len(values)

    def example_scores(self, backend: InferenceBackend, examples: Sequence[TaskExample] | None = None,
                       scoring: str | None = None) -> list[float]:
        """Per-example scores in [0, 1], in order; one batched backend call for the whole set."""
        examples = list(self.test if examples is None else examples)
        if not examples:
            raise InvalidInputError(f"task {self.name!r}: no examples to score")
        scoring = scoring or self.scoring
        if scoring == EXACT_MATCH:
            outputs = _generate(backend, examples, self.max_answer_tokens)
            return [float(normalize_answer(out) == normalize_answer(ex.answer)) for out, ex in zip(outputs, examples,
                                                                                                  strict=True)]
        if scoring == CHOICE_LOGPROB:
            _check_choices(self.name, examples)
            pairs = [(ex.prompt, choice) for ex in examples for choice in ex.choices]
            logprobs = list(backend.score_pairs(pairs))
            if len(logprobs) != len(pairs):
                raise InvalidInputError(f"backend returned {len(logprobs)} scores for {len(pairs)} pairs")
            scores, start = [], 0
            for ex in examples:
                chunk = logprobs[start:start + len(ex.choices)]
                start += len(ex.choices)
                best = max(range(len(chunk)), key=chunk.__getitem__)  # ties: the first choice wins
                scores.append(float(ex.choices[best] == ex.answer))
            return scores
        if scoring == GENERATOR:
            from cl_core.streams.rgym import generator_scorer

            scorer = generator_scorer(self.name)
            outputs = _generate(backend, examples, self.max_answer_tokens)
            return [float(scorer(out.strip(), ex)) for out, ex in zip(outputs, examples, strict=True)]
        raise InvalidInputError(f"scoring {scoring!r} is not one of {list(SCORINGS)}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scoring": self.scoring, "max_answer_tokens": self.max_answer_tokens,
                "description": self.description, "source": self.source,
                "train": [ex.to_dict() for ex in self.train], "test": [ex.to_dict() for ex in self.test]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        try:
            return cls(name=data["name"], scoring=data["scoring"], max_answer_tokens=int(data["max_answer_tokens"]),
                       description=data.get("description", ""), source=data.get("source", ""),
                       train=tuple(TaskExample.from_dict(ex) for ex in data["train"]),
                       test=tuple(TaskExample.from_dict(ex) for ex in data["test"]))
        except (KeyError, TypeError) as exc:
            raise InvalidInputError(f"not a serialized task (missing or bad field {exc})") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Task:
        return cls.from_dict(json.loads(text))


def _generate(backend: InferenceBackend, examples: Sequence[TaskExample], max_tokens: int) -> list[str]:
    outputs = list(backend.generate([ex.prompt for ex in examples], max_tokens=max_tokens))
    if len(outputs) != len(examples):
        raise InvalidInputError(f"backend returned {len(outputs)} completions for {len(examples)} prompts")
    return outputs


def _check_choices(name: str, examples: Sequence[TaskExample]) -> None:
    for ex in examples:
        if ex.answer not in ex.choices:
            raise InvalidInputError(f"task {name!r}: choice_logprob scoring needs every example's answer among its "
                                    f"choices; {ex.answer!r} is not in {list(ex.choices)}")

