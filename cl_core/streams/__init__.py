"""Task streams for continual-learning experiments, built from data shipped in pinned PyPI packages.

    from cl_core.streams import DEFAULT_SEQUENCE, build_stream, save_stream, load_stream
    tasks = build_stream(DEFAULT_SEQUENCE, n_train=200, n_test=50, seed=0)
    accuracy = tasks[0].score(backend)      # backend: generate(prompts, max_tokens) + score_pairs(pairs)

Sources (fetched on first use into `$CL_CORE_CACHE/streams`, sha256-checked; no model hub):
- `bigbench/...`: BIG-bench JSON tasks from the `bigbench==1.0.0` sdist (classification with small label sets);
- `reasoning_gym/...`: procedural generators of `reasoning-gym==0.1.25`, scored by their own scorer where the
  generator defines one;
- `human_eval/return_value`: return values read from HumanEval's unit tests (no code is executed).

Why the default sequence: each task answers with one short label from a fixed set (1-6 tokens), the label sets do
not overlap (intent names, a digit, sentiment words, color words), every prompt is a short "classify this text"
user message, and SmolLM2-135M-Instruct scores ~0 on each zero-shot by exact match (it answers in sentences).
LoRA learns each label format in tens of steps, and training the next task overwrites it: forgetting shows up in
minutes on CPU. Measured numbers are in the docstring of `DEFAULT_SEQUENCE` (cl_core/streams/registry.py).

A built stream is plain JSON (`save_stream`/`load_stream`, `Task.to_json`/`from_json`), so later pipeline stages
need none of the source packages (except "generator" scoring, which loads the cached reasoning-gym wheel).
CLI: `python -m cl_core.streams build --tasks a,b --n-train 200 --n-test 50 --seed 0 --out data/stream.json`.
"""

from __future__ import annotations

from cl_core.streams.fetch import TaskDataError
from cl_core.streams.registry import (
    DEFAULT_SEQUENCE,
    available_tasks,
    build_stream,
    load_stream,
    load_task,
    save_stream,
)
from cl_core.streams.task import InferenceBackend, Task, TaskExample, normalize_answer

__all__ = [
    "DEFAULT_SEQUENCE", "InferenceBackend", "Task", "TaskDataError", "TaskExample", "available_tasks",
    "build_stream", "load_stream", "load_task", "normalize_answer", "save_stream",
]
