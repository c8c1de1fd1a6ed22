"""The `neighbourhood` method on the tiny model's learner: which neighbours it picks, what it rehearses, how batches
grow, its state, and its errors. Embeddings come from a scripted embedder here, so the expected neighbours are
known by hand; one test uses the real base-model embedder."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from cl_core.errors import ConfigError, InvalidInputError
from cl_core.learner import Example, LearnerSettings, LoRALearner
from cl_core.methods import MethodSet, MethodSettings, make_method
from cl_core.methods.neighbourhood import load_pool, prompt_text
from cl_core.prompting import encode_pair, encode_prompt

POOL = ["What is the capital of France?", "What is the capital of Japan?", "What color are bananas?",
        "How many legs does a cat have?", "Who wrote Hamlet?"]
# Directions: capitals along x, colours along y, animals along z, books along w (so the order is known by hand).
VECTORS = {
    "What is the capital of France?": [1.0, 0.1, 0.0, 0.0],
    "What is the capital of Japan?": [0.9, 0.0, 0.3, 0.0],
    "What color are bananas?": [0.0, 1.0, 0.0, 0.0],
    "How many legs does a cat have?": [0.1, 0.0, 1.0, 0.0],
    "Who wrote Hamlet?": [0.0, 0.0, 0.0, 1.0],
    "What is the capital of Zorbania?": [1.0, 0.0, 0.0, 0.0],
    "Who wrote The Drato Ledger?": [0.0, 0.2, 0.0, 1.0],
    "Name a yellow fruit.": [0.1, 1.0, 0.0, 0.0],
}
ANSWER_TOKENS = 5


class ScriptedEmbedder:
    """Fixed unit vectors per text; counts what it was asked (the pool must be embedded once)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.asked.extend(texts)
        rows = np.array([VECTORS[t] for t in texts], dtype=np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def pool_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pool") / "pool.json"
    path.write_text(json.dumps({"questions": POOL}))
    return path


@pytest.fixture
def learner(tiny_model_dir) -> LoRALearner:
    return LoRALearner(LearnerSettings(model_path=str(tiny_model_dir), lora_rank=4, lora_alpha=8.0,
                                       learning_rate=5e-2, device="cpu", seed=0))


def settings(pool_file: Path, **changes) -> MethodSettings:
    base = dict(neighbourhood_size=2, neighbourhood_answer_tokens=ANSWER_TOKENS, neighbourhood_pool=str(pool_file),
                batch_size=4)
    return MethodSettings(**(base | changes))


def make(pool_file: Path, **changes) -> tuple[MethodSet, object]:
    methods = MethodSet(["neighbourhood"], settings(pool_file, **changes))
    method = methods.methods[0]
    method.embedder = ScriptedEmbedder()
    return methods, method


def example(tokenizer, prompt: str, answer: str) -> Example:
    return Example(encode_pair(tokenizer, prompt, answer))


def greedy_by_hand(learner: LoRALearner, prompt_ids: list[int], eos: int) -> list[int]:
    """Argmax decoding one token at a time, without a cache or padding: the reference for the own answers."""
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(ANSWER_TOKENS):
            token = int(learner.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token == eos:
                break
    return out


def test_neighbours_are_the_nearest_by_embedding(tokenizer, learner, pool_file):
    methods, method = make(pool_file)
    edit = example(tokenizer, "What is the capital of Zorbania?", "Velmora.")
    methods.begin_task(methods.task("facts", [edit], [1]), learner)
    assert [p for p, _ in method.pairs] == ["What is the capital of France?", "What is the capital of Japan?"]
    books = example(tokenizer, "Who wrote The Drato Ledger?", "Dukou Vairel.")
    fruit = example(tokenizer, "Name a yellow fruit.", "A banana.")
    methods.begin_task(methods.task("more", [books, fruit], [2, 3]), learner)
    # Per example its own two nearest: the book's are Hamlet then bananas; the fruit's are bananas then France.
    assert [p for p, _ in method.pairs] == ["Who wrote Hamlet?", "What color are bananas?",
                                            "What is the capital of France?"]
    assert method.nearest(["Who wrote The Drato Ledger?"], POOL, 3) == [[4, 2, 0]]
    # The pool was embedded once, across both tasks.
    assert sum(t == "What is the capital of Japan?" for t in method.embedder.asked) == 1


@pytest.mark.parametrize("anchor", ["first", "current"])
def test_rehearsed_answers_are_the_models_own_from_before_the_task(tokenizer, learner, pool_file, anchor):
    methods, method = make(pool_file, neighbourhood_anchor=anchor)
    eos = tokenizer.eos_token_id
    edit = example(tokenizer, "What is the capital of Zorbania?", "Velmora.")
    neighbours = ("What is the capital of France?", "What is the capital of Japan?")
    first = {p: greedy_by_hand(learner, encode_prompt(tokenizer, p), eos) for p in neighbours}
    seen = []
    for _ in range(2):  # the second round starts from an adapter the first round trained
        now = {p: greedy_by_hand(learner, encode_prompt(tokenizer, p), eos) for p in neighbours}
        seen.append(now)
        methods.begin_task(methods.task("facts", [edit], [1]), learner)
        # `first`: the answers from before the first task, every time; `current`: the adapter's before this one.
        assert {p: pair.response_ids for p, pair in method.pairs} == (first if anchor == "first" else now)
        assert all(pair.prompt_ids == encode_prompt(tokenizer, p) for p, pair in method.pairs)
        for _ in range(6):
            learner.step(methods.transform_batch([edit], exclude_ids=[1]))
        methods.end_task(methods.task("facts", [edit], [1]), learner)
    assert seen[1] != seen[0]  # training changed the greedy answers, so the two anchors were told apart


def test_recall_rehearses_earlier_neighbourhoods_and_taught_prompts_lose_their_anchor(tokenizer, learner,
                                                                                        pool_file):
    methods, method = make(pool_file, neighbourhood_size=1, neighbourhood_recall=1, neighbourhood_memory=0)
    capital = example(tokenizer, "What is the capital of Zorbania?", "Velmora.")
    methods.begin_task(methods.task("a", [capital], [1]), learner)
    assert [p for p, _ in method.pairs] == ["What is the capital of France?"] and method.recall == []
    france = method.pairs[0][1]
    methods.end_task(methods.task("a", [capital], [1]), learner)
    books = example(tokenizer, "Who wrote The Drato Ledger?", "Dukou Vairel.")
    methods.begin_task(methods.task("b", [books], [2]), learner)
    assert [p for p, _ in method.pairs] == ["Who wrote Hamlet?", "What is the capital of France?"]
    batch = methods.transform_batch([books], exclude_ids=[2])
    assert [e.pair for e in batch[1:]] == [method.pairs[0][1], france]  # own neighbour, then the recalled one
    methods.end_task(methods.task("b", [books], [2]), learner)
    taught = example(tokenizer, "What is the capital of France?", "Velmora.")
    methods.begin_task(methods.task("c", [taught], [3]), learner)
    assert "What is the capital of France?" not in method.anchors
    assert "What is the capital of France?" not in [p for p, _ in method.pairs]


def test_greedy_generation_is_the_same_batched_and_alone(tokenizer, learner):
    prompts = [encode_prompt(tokenizer, q) for q in ("Hi?", "What is the capital of France today, please?")]
    batched = learner.generate_greedy(prompts, ANSWER_TOKENS, tokenizer.eos_token_id)
    assert batched == [greedy_by_hand(learner, p, tokenizer.eos_token_id) for p in prompts]


def test_each_batch_grows_by_its_examples_neighbours(tokenizer, learner, pool_file):
    methods, method = make(pool_file, neighbourhood_size=2)
    books = example(tokenizer, "Who wrote The Drato Ledger?", "Dukou Vairel.")
    fruit = example(tokenizer, "Name a yellow fruit.", "A banana.")
    other = example(tokenizer, "Unrelated replayed prompt", "x")
    methods.begin_task(methods.task("more", [books, fruit], [2, 3]), learner)
    alone = methods.transform_batch([books], exclude_ids=[])
    assert len(alone) == 1 + 2
    assert [e.pair for e in alone[1:]] == [method.pairs[0][1], method.pairs[1][1]]
    both = methods.transform_batch([books, fruit, other], exclude_ids=[])
    # In turn, at most neighbourhood_size: the book's nearest (Hamlet), the fruit's nearest (bananas).
    assert len(both) == 3 + 2
    assert [e.pair for e in both[3:]] == [method.pairs[0][1], method.pairs[1][1]]
    assert methods.transform_batch([other], exclude_ids=[]) == [other]  # no neighbours of its own
    methods.end_task(methods.task("more", [books, fruit], [2, 3]), learner)
    assert methods.transform_batch([books], exclude_ids=[]) == [books]  # the task is over


def test_learned_prompts_become_candidates_and_a_task_never_rehearses_itself(tokenizer, learner, pool_file):
    methods, method = make(pool_file, neighbourhood_size=1, neighbourhood_memory=1)
    first = example(tokenizer, "What is the capital of Zorbania?", "Velmora.")
    methods.begin_task(methods.task("a", [first], [1]), learner)
    methods.end_task(methods.task("a", [first], [1]), learner)
    assert method.learned == ["What is the capital of Zorbania?"]
    # A nearer learned prompt wins over the pool: [1, 0.05, 0, 0] is closest to Zorbania, not France.
    VECTORS["Which city is the capital of Kostrava?"] = [1.0, 0.0, 0.0, 0.02]
    second = example(tokenizer, "Which city is the capital of Kostrava?", "Dravel.")
    methods.begin_task(methods.task("b", [second], [2]), learner)
    assert [p for p, _ in method.pairs] == ["What is the capital of Zorbania?"]
    methods.end_task(methods.task("b", [second], [2]), learner)
    assert method.learned == ["Which city is the capital of Kostrava?"]  # memory of 1: the oldest went
    methods.begin_task(methods.task("b", [second], [2]), learner)  # the same prompt again: not its own neighbour
    assert "Which city is the capital of Kostrava?" not in [p for p, _ in method.pairs]


def test_state_round_trip_gives_the_same_batches(tokenizer, learner, pool_file, tmp_path):
    methods, method = make(pool_file)
    edit = example(tokenizer, "What is the capital of Zorbania?", "Velmora.")
    methods.begin_task(methods.task("facts", [edit], [1]), learner)
    methods.save(tmp_path / "state")
    restored = MethodSet(["neighbourhood"], settings(pool_file))
    restored.load(tmp_path / "state")
    assert restored.methods[0].state() == method.state()
    assert [e.pair for e in restored.transform_batch([edit], [1])] == [e.pair for e in
                                                                        methods.transform_batch([edit], [1])]
    other = MethodSet(["neighbourhood"], settings(pool_file, neighbourhood_pool="builtin"))
    with pytest.raises(InvalidInputError, match="neighbourhood_pool="):
        other.load(tmp_path / "state")


def test_combines_with_replay_and_trains_through_the_learner(tokenizer, learner, pool_file):
    methods = MethodSet(["replay", "neighbourhood"], settings(pool_file, replay_ratio=0.5))
    methods.methods[1].embedder = ScriptedEmbedder()
    edit = example(tokenizer, "What is the capital of Zorbania?", "Velmora.")
    methods.begin_task(methods.task("facts", [edit], [1]), learner)
    batch = methods.transform_batch([edit], exclude_ids=[1])
    assert len(batch) == 3  # the replay memory is empty; two neighbours
    result = learner.step(batch, penalty=methods.penalty)
    assert not result.skipped and len(result.example_losses) == 3


@pytest.mark.parametrize(("changes", "match"), [
    ({"neighbourhood_size": 0}, "neighbourhood_size"),
    ({"neighbourhood_answer_tokens": -1}, "neighbourhood_answer_tokens"),
    ({"neighbourhood_memory": -2}, "neighbourhood_memory"),
    ({"neighbourhood_pool": ""}, "neighbourhood_pool"),
    ({"neighbourhood_pool": "/nonexistent/pool.json"}, "cannot read"),
    ({"neighbourhood_anchor": "last"}, "neighbourhood_anchor"),
    ({"neighbourhood_weight": 0.0}, "neighbourhood_weight"),
    ({"neighbourhood_recall": -1}, "neighbourhood_recall"),
])
def test_bad_settings_raise_config_errors(pool_file, changes, match):
    with pytest.raises(ConfigError, match=match):
        make_method("neighbourhood", settings(pool_file, **changes))


def test_bad_pool_files_and_config_values_are_refused(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "mixed.json").write_text(json.dumps({"questions": ["ok?", 3]}))
    for name in ("empty.json", "mixed.json"):
        with pytest.raises(ConfigError, match="non-empty list of question strings"):
            load_pool(str(tmp_path / name))
    from cl_core import ContinualConfig

    for field, value in (("neighbourhood_size", 0), ("neighbourhood_memory", -1), ("neighbourhood_pool", " ")):
        with pytest.raises(ConfigError, match=field):
            ContinualConfig(anti_forgetting=["replay", "neighbourhood"], **{field: value})
    config = ContinualConfig(anti_forgetting=["replay", "neighbourhood"], neighbourhood_size=5)
    assert MethodSettings.from_config(config).neighbourhood_size == 5
    assert dataclasses.asdict(MethodSettings())["neighbourhood_pool"] == "builtin"


def test_the_builtin_pool_loads():
    pool = load_pool("builtin")
    assert len(pool) > 200 and "What is the capital of Germany?" in pool


def test_prompt_text_inverts_the_chat_encoding(tokenizer):
    for prompt in ("What is the capital of France?", "Two\nlines, and ünïcode?"):
        assert prompt_text(tokenizer, encode_prompt(tokenizer, prompt)) == prompt


def test_without_an_embedder_the_error_says_what_is_missing(tokenizer, learner, pool_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "cl_core.bank.embedder", None)  # importing it now raises ImportError
    methods = MethodSet(["neighbourhood"], settings(pool_file))
    edit = example(tokenizer, "What is the capital of Zorbania?", "Velmora.")
    with pytest.raises(ConfigError, match="cl_core.bank.embedder"):
        methods.begin_task(methods.task("facts", [edit], [1]), learner)


def test_real_base_model_embedder_puts_same_form_questions_nearest(tokenizer, learner, pool_file, tiny_model_dir):
    pytest.importorskip("cl_core.bank.embedder")
    methods = MethodSet(["neighbourhood"], settings(pool_file, neighbourhood_size=1))
    edit = example(tokenizer, "What is the capital of France?", "Velmora.")
    methods.begin_task(methods.task("facts", [edit], [1]), learner)
    method = methods.methods[0]
    vectors = method.embedder.embed(["What is the capital of France?", *POOL[1:]])
    expected = POOL[1:][int(np.argmax(vectors[1:] @ vectors[0]))]
    assert [p for p, _ in method.pairs] == [expected]
