"""Helpers shared by the task sources: deterministic seeds, de-duplication, disjoint splits, answer budgets."""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from cl_core.errors import InvalidInputError
from cl_core.streams.task import TaskExample


def derive_seed(name: str, seed: int) -> int:
    """A 32-bit seed for one task: the same (name, seed) always gives the same data, on any machine and Python.

    (`hash()` of a str is randomized per process, so it cannot be used here.)
    """
    return zlib.crc32(f"{name}:{seed}".encode())


def unique_by_prompt(examples: Iterable[TaskExample]) -> list[TaskExample]:
    """Drop repeated prompts, keeping the first; a prompt seen with two different answers is dropped entirely.

    De-duplicating before splitting is what makes train and test disjoint, and a prompt with conflicting answers
    cannot be scored fairly.
    """
    first: dict[str, TaskExample] = {}
    conflicting: set[str] = set()
    for ex in examples:
        seen = first.get(ex.prompt)
        if seen is None:
            first[ex.prompt] = ex
        elif seen.answer != ex.answer:
            conflicting.add(ex.prompt)
    return [ex for prompt, ex in first.items() if prompt not in conflicting]


def check_sizes(name: str, n_train: int, n_test: int) -> None:
    for label, value in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInputError(f"task {name!r}: {label} must be an int, got {type(value).__name__}")
    if n_train < 0 or n_test < 1:
        raise InvalidInputError(f"task {name!r}: need n_train >= 0 and n_test >= 1, got n_train={n_train}, "
                                f"n_test={n_test}")


def split(name: str, examples: list[TaskExample], n_train: int, n_test: int
          ) -> tuple[tuple[TaskExample, ...], tuple[TaskExample, ...]]:
    """Test = the first `n_test` examples, train = the next `n_train` (examples already unique and shuffled).

    Taking the test set first keeps it the same for a seed whatever `n_train` is, so runs that vary the amount of
    training data are evaluated on the same examples.
    """
    if n_train + n_test > len(examples):
        raise InvalidInputError(f"task {name!r} has {len(examples)} distinct examples; n_train={n_train} + "
                                f"n_test={n_test} = {n_train + n_test} is too many")
    return tuple(examples[n_test:n_test + n_train]), tuple(examples[:n_test])


def answer_budget(answers: Iterable[str]) -> int:
    """Generation budget for scoring: an upper bound on the longest answer's token count plus the end-of-turn token.

    Without a tokenizer at hand, the bound is one token per character (no token is shorter; digits often are one
    token each), capped at 64 so that an untrained model's rambling stays cheap to generate.
    """
    longest = max((len(answer) for answer in answers), default=1)
    return min(64, max(4, longest + 1))
