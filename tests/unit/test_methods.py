"""One contract suite for every anti-forgetting method, on the tiny model's learner (no vLLM needed).

Each method must: run through two tasks (begin_task, steps with its penalty/mask/batch transform, end_task),
save and restore its state exactly, and change the loss, the trainable weights or the batch the way it claims.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest
import torch
from transformers import AutoTokenizer

from cl_core.errors import CheckpointError, InvalidInputError
from cl_core.learner import Example, LearnerSettings, LoRALearner
from cl_core.methods import MethodSet, MethodSettings, available_methods, make_method
from cl_core.prompting import encode_pair

RANK, TASKS = 4, 3
SETTINGS = MethodSettings(lora_rank=RANK, max_tasks=TASKS, ewc_lambda=50.0, ewc_samples=4, l2_lambda=1.0,
                          olora_lambda=1.0, replay_ratio=0.5, replay_memory=16, batch_size=4, seed=0)
TASK_DATA = {
    "colors": [(f"Name color number {i}.", ["red", "blue", "green", "black"][i % 4]) for i in range(8)],
    "animals": [(f"Name animal number {i}.", ["cat", "dog", "owl", "fox"][i % 4]) for i in range(8)],
}


class FakeSource:
    """Stored experiences by id, as the experience store would give them to replay."""

    def __init__(self, learner: LoRALearner, examples: dict[int, Example]) -> None:
        self.learner, self.by_id = learner, examples

    def examples(self, ids: Sequence[int]) -> list[tuple[int, Example]]:
        return [(i, self.by_id[i]) for i in ids if i in self.by_id]

    def embeddings(self, ids: Sequence[int]) -> torch.Tensor:
        return self.learner.embeddings([self.by_id[i] for i in ids])

    def gradients(self, ids: Sequence[int]) -> torch.Tensor:
        return self.learner.gradient_sketches([self.by_id[i] for i in ids], dim=32)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def data(tokenizer) -> dict[str, list[tuple[int, Example]]]:
    out, next_id = {}, 1
    for task, pairs in TASK_DATA.items():
        out[task] = []
        for prompt, answer in pairs:
            out[task].append((next_id, Example(encode_pair(tokenizer, prompt, answer))))
            next_id += 1
    return out


def make_learner(model_dir, blocks: int) -> LoRALearner:
    return LoRALearner(LearnerSettings(model_path=str(model_dir), lora_rank=RANK * blocks, lora_alpha=2.0 * RANK
                                       * blocks, learning_rate=1e-2, device="cpu", seed=0))


def setup(name: str, model_dir, data) -> tuple[MethodSet, LoRALearner]:
    blocks = make_method(name, SETTINGS).rank_blocks()
    learner = make_learner(model_dir, blocks)
    source = FakeSource(learner, {i: ex for items in data.values() for i, ex in items})
    return MethodSet([name], SETTINGS, source), learner


def train_task(methods: MethodSet, learner: LoRALearner, task: str, items, steps: int = 4) -> list[list[Example]]:
    ids = [i for i, _ in items]
    examples = [ex for _, ex in items]
    methods.begin_task(methods.task(task, examples, ids), learner)
    masks = methods.trainable_mask(learner.lora_parameters())
    new_per_step = SETTINGS.batch_size - methods.replay_slots(SETTINGS.batch_size)
    batches = []
    for step in range(steps):
        new = [examples[(step * new_per_step + k) % len(examples)] for k in range(new_per_step)]
        batch = methods.transform_batch(new, exclude_ids=ids)
        batches.append(batch)
        result = learner.step(batch, penalty=methods.penalty, masks=masks)
        assert not result.skipped, result.reason
        methods.after_step(result.example_losses)
    losses = learner.example_losses(examples).tolist()
    edits = methods.end_task(methods.task(task, examples, ids, losses), learner)
    if edits:
        learner.assign(edits)
    return batches


def snapshot(learner: LoRALearner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.lora_parameters().items()}


def test_every_shipped_method_is_registered():
    assert set(available_methods()) == {"none", "replay", "ewc", "l2", "packnet", "progressive", "olora",
                                      "neighbourhood"}
    with pytest.raises(InvalidInputError, match="known: .*ewc"):
        make_method("magic", SETTINGS)


@pytest.mark.parametrize("name", ["none", "replay", "ewc", "l2", "packnet", "progressive", "olora"])
def test_contract_runs_and_restores_state_exactly(name, tiny_model_dir, data, tmp_path):
    methods, learner = setup(name, tiny_model_dir, data)
    train_task(methods, learner, "colors", data["colors"])
    train_task(methods, learner, "animals", data["animals"], steps=2)
    methods.save(tmp_path / "state")

    restored = MethodSet([name], SETTINGS, methods.methods[0].source)
    restored.load(tmp_path / "state")
    for a, b in zip(methods.methods, restored.methods, strict=True):
        ta, ma = a.state()
        tb, mb = b.state()
        assert ma == mb
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key].cpu(), tb[key].cpu()), key
    assert restored.tasks == methods.tasks
    # Same behaviour after restoring: same penalty, masks and batch on the same weights.
    params = learner.lora_parameters()
    pa, pb = methods.penalty(params), restored.penalty(params)
    assert (pa is None and pb is None) or torch.equal(pa, pb)
    ma, mb = methods.trainable_mask(params), restored.trainable_mask(params)
    assert (ma is None and mb is None) or all(torch.equal(ma[k], mb[k]) for k in ma)
    new = [ex for _, ex in data["animals"][:2]]
    assert [e.pair for e in methods.transform_batch(list(new), [])] == \
        [e.pair for e in restored.transform_batch(list(new), [])]


def test_loading_state_of_other_methods_is_refused(tiny_model_dir, data, tmp_path):
    methods, learner = setup("ewc", tiny_model_dir, data)
    train_task(methods, learner, "colors", data["colors"], steps=1)
    methods.save(tmp_path / "state")
    with pytest.raises(CheckpointError, match="anti_forgetting"):
        MethodSet(["l2"], SETTINGS).load(tmp_path / "state")


def test_none_changes_nothing(tiny_model_dir, data):
    methods, learner = setup("none", tiny_model_dir, data)
    batches = train_task(methods, learner, "colors", data["colors"])
    assert methods.penalty(learner.lora_parameters()) is None
    assert methods.trainable_mask(learner.lora_parameters()) is None
    assert all(len(b) == SETTINGS.batch_size for b in batches)


@pytest.mark.parametrize("name", ["ewc", "l2"])
def test_regularizers_are_zero_at_the_anchor_and_pull_back(name, tiny_model_dir, data):
    methods, learner = setup(name, tiny_model_dir, data)
    assert methods.penalty(learner.lora_parameters()) is None  # nothing to protect before the first task
    train_task(methods, learner, "colors", data["colors"])
    params = learner.lora_parameters()
    assert float(methods.penalty(params).detach()) == pytest.approx(0.0, abs=1e-12)
    moved = {k: v.detach() + 0.05 for k, v in params.items()}
    assert float(methods.penalty(moved)) > 0
    before = snapshot(learner)
    train_task(methods, learner, "animals", data["animals"])
    # The regularised run moves the weights less than an unprotected run from the same start.
    plain, plain_learner = setup("none", tiny_model_dir, data)
    plain_learner.assign(before)
    train_task(plain, plain_learner, "animals", data["animals"])

    def distance(lrn):
        return sum(float((v.detach() - before[k]).pow(2).sum()) for k, v in lrn.lora_parameters().items())

    assert distance(learner) < distance(plain_learner)


def test_online_ewc_decays_and_accumulates_the_fisher(tiny_model_dir, data):
    learner = make_learner(tiny_model_dir, 1)
    methods = MethodSet(["ewc"], dataclasses.replace(SETTINGS, ewc_samples=len(data["animals"])))
    ewc = methods.methods[0]
    train_task(methods, learner, "colors", data["colors"], steps=1)
    first = {k: v.clone() for k, v in ewc.fisher.items()}
    fresh = learner.squared_gradients([ex for _, ex in data["animals"]])
    train_task(methods, learner, "animals", data["animals"], steps=0)  # consolidate without moving
    key = next(iter(first))
    expected = SETTINGS.ewc_gamma * first[key] + fresh[key]
    assert torch.allclose(ewc.fisher[key], expected, rtol=1e-4, atol=1e-12)
    assert ewc.consolidations == 2


def test_replay_mixes_past_tasks_into_batches(tiny_model_dir, data):
    methods, learner = setup("replay", tiny_model_dir, data)
    assert methods.replay_slots(SETTINGS.batch_size) == 0  # empty memory: the first task fills whole batches
    first = train_task(methods, learner, "colors", data["colors"])
    assert all(len(b) == SETTINGS.batch_size for b in first)
    assert methods.replay_slots(SETTINGS.batch_size) == round(SETTINGS.batch_size * SETTINGS.replay_ratio)
    second = train_task(methods, learner, "animals", data["animals"])
    colors = {id(ex.pair) for _, ex in data["colors"]}
    for batch in second:
        assert len(batch) == SETTINGS.batch_size
        assert sum(id(ex.pair) in colors for ex in batch) == methods.replay_slots(SETTINGS.batch_size)


@pytest.mark.parametrize("name", ["progressive", "olora"])
def test_block_methods_freeze_earlier_tasks_exactly(name, tiny_model_dir, data):
    methods, learner = setup(name, tiny_model_dir, data)
    train_task(methods, learner, "colors", data["colors"])
    after_first = snapshot(learner)
    train_task(methods, learner, "animals", data["animals"])
    for key, value in learner.lora_parameters().items():
        block0 = value[:RANK] if ".lora_A." in key else value[:, :RANK]
        old0 = after_first[key][:RANK] if ".lora_A." in key else after_first[key][:, :RANK]
        assert torch.equal(block0, old0), key
    changed = any(not torch.equal(v, after_first[k]) for k, v in learner.lora_parameters().items())
    assert changed
    # A task tag seen before continues in its own block; a fourth distinct task does not fit.
    train_task(methods, learner, "colors", data["colors"], steps=1)
    assert methods.methods[0].blocks == {"colors": 0, "animals": 1}
    methods.begin_task(methods.task("third", [], []), learner)
    with pytest.raises(InvalidInputError, match="max_tasks"):
        methods.begin_task(methods.task("fourth", [], []), learner)


def test_olora_penalises_overlap_with_earlier_subspaces(tiny_model_dir, data):
    def overlap(name: str) -> float:
        methods, learner = setup(name, tiny_model_dir, data)
        train_task(methods, learner, "colors", data["colors"])
        train_task(methods, learner, "animals", data["animals"], steps=6)
        total = 0.0
        for key, value in learner.lora_parameters().items():
            if ".lora_A." in key:
                total += float((value[:RANK] @ value[RANK:2 * RANK].T).abs().sum())
        return total

    methods, learner = setup("olora", tiny_model_dir, data)
    train_task(methods, learner, "colors", data["colors"])
    assert methods.penalty(learner.lora_parameters()) is None  # first task: nothing to be orthogonal to
    methods.begin_task(methods.task("animals", [], []), learner)
    assert float(methods.penalty(learner.lora_parameters())) > 0
    assert overlap("olora") < overlap("progressive")


def test_packnet_keeps_rank_components_per_task_and_freezes_them(tiny_model_dir, data):
    methods, learner = setup("packnet", tiny_model_dir, data)
    packnet = methods.methods[0]
    train_task(methods, learner, "colors", data["colors"])
    for owner in packnet.owner.values():
        assert int((owner == 0).sum()) == RANK
        assert int((owner == -1).sum()) == RANK * (TASKS - 1)
    kept = snapshot(learner)
    # Released components serve nothing: their lora_B columns are zero.
    for name_a, owner in packnet.owner.items():
        name_b = name_a.replace(".lora_A.", ".lora_B.")
        assert torch.count_nonzero(kept[name_b][:, owner == -1]) == 0
    train_task(methods, learner, "animals", data["animals"])
    for name_a, owner in packnet.owner.items():
        name_b = name_a.replace(".lora_A.", ".lora_B.")
        first = owner == 0
        assert torch.equal(learner.lora_parameters()[name_a][first], kept[name_a][first])
        assert torch.equal(learner.lora_parameters()[name_b][:, first], kept[name_b][:, first])
        assert int((owner == 1).sum()) == RANK
    train_task(methods, learner, "third", data["colors"], steps=0)
    with pytest.raises(InvalidInputError, match="max_tasks"):  # every component is owned: a clear error
        methods.begin_task(methods.task("fourth", [], []), learner)


def test_combined_methods_add_penalties_and_intersect_masks(tiny_model_dir, data):
    methods, learner = setup("progressive", tiny_model_dir, data)
    combo = MethodSet(["replay", "ewc", "progressive"], SETTINGS, methods.methods[0].source)
    batches = train_task(combo, learner, "colors", data["colors"])
    assert all(len(b) == SETTINGS.batch_size for b in batches)  # nothing to replay yet: all new examples
    second = train_task(combo, learner, "animals", data["animals"])
    assert all(len(b) == SETTINGS.batch_size for b in second)
    assert combo.penalty(learner.lora_parameters()) is not None
    with pytest.raises(InvalidInputError, match="only one"):
        MethodSet(["progressive", "packnet"], SETTINGS)
    with pytest.raises(InvalidInputError, match="twice"):
        MethodSet(["ewc", "ewc"], SETTINGS)


def test_masks_hold_frozen_weights_even_with_adam_momentum(tiny_model_dir, data):
    learner = make_learner(tiny_model_dir, 1)
    examples = [ex for _, ex in data["colors"][:4]]
    for _ in range(3):
        learner.step(examples)  # builds AdamW moments for every weight
    params = learner.lora_parameters()
    masks = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in params.items()}
    before = snapshot(learner)
    learner.step(examples, masks=masks)
    assert all(torch.equal(v, before[k]) for k, v in learner.lora_parameters().items())


def test_method_settings_come_from_the_config():
    from cl_core import ContinualConfig

    config = ContinualConfig(ewc_lambda=7.0, olora_lambda=0.1, max_tasks=3, replay_strategy="herding", seed=5)
    settings = MethodSettings.from_config(config)
    assert (settings.ewc_lambda, settings.olora_lambda, settings.max_tasks, settings.replay_strategy,
            settings.seed, settings.lora_rank) == (7.0, 0.1, 3, "herding", 5, config.lora_rank)
