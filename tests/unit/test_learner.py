import math

import pytest
import torch
from transformers import AutoTokenizer

from cl_core.learner import Example, LearnerSettings, LoRALearner
from cl_core.prompting import encode_pair


@pytest.fixture
def learner(tiny_model_dir):
    return LoRALearner(LearnerSettings(model_path=str(tiny_model_dir), lora_rank=8, lora_alpha=16,
                                       learning_rate=5e-3, device="cpu"))


@pytest.fixture
def example(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return Example(encode_pair(tokenizer, "What is the capital of France?", "Paris is the capital."))


def test_encode_pair_masks_only_the_prompt(example, learner):
    _, labels, _ = learner._batch([example])
    n_prompt = len(example.pair.prompt_ids)
    assert (labels[0, :n_prompt] == -100).all()
    assert labels[0, n_prompt:].tolist() == example.pair.response_ids


def test_training_lowers_the_loss_and_reaches_greedy(learner, example):
    before = float(learner.example_losses([example])[0])
    for _ in range(40):
        assert not learner.step([example]).skipped
    after = float(learner.example_losses([example])[0])
    assert after < before / 4
    assert min(learner.token_margins(example)) > 0


def test_non_finite_loss_skips_the_update(learner, example, monkeypatch):
    learner.step([example])
    weights = learner.lora_state()
    monkeypatch.setattr(learner, "example_losses",
                        lambda examples, grad=False: torch.full((len(examples),), math.nan, requires_grad=True))
    result = learner.step([example])
    assert result.skipped and "non-finite" in result.reason
    for name, value in learner.lora_state().items():
        assert torch.equal(value, weights[name])


def test_non_finite_penalty_skips_the_update(learner, example):
    weights = learner.lora_state()
    result = learner.step([example], penalty=lambda params: torch.tensor(math.inf))
    assert result.skipped and "non-finite" in result.reason
    assert all(torch.equal(v, weights[k]) for k, v in learner.lora_state().items())


def test_adapter_and_state_round_trip(learner, example, tmp_path, tiny_model_dir):
    for _ in range(3):
        learner.step([example])
    learner.save_adapter(tmp_path / "v1")
    learner.save_state(tmp_path)
    assert (tmp_path / "v1" / "adapter_model.safetensors").exists()
    other = LoRALearner(LearnerSettings(model_path=str(tiny_model_dir), lora_rank=8, lora_alpha=16,
                                        learning_rate=5e-3, device="cpu"))
    other.load_adapter(tmp_path / "v1")
    other.load_state(tmp_path)
    assert other.steps_done == 3
    for name, value in learner.lora_state().items():
        assert torch.equal(value, other.lora_state()[name])
    # Same optimizer state => the next step is identical.
    learner.step([example])
    other.step([example])
    for name, value in learner.lora_state().items():
        assert torch.allclose(value, other.lora_state()[name], atol=1e-7)


def test_batched_losses_match_single_example_losses(learner, tiny_model_dir):
    """Left padding and response-only logits must not change any example's loss."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [Example(encode_pair(tokenizer, prompt, answer)) for prompt, answer in
                [("Hi", "a much longer answer than the others here"), ("A very long question " * 6, "ok"),
                 ("Medium question?", "medium answer")]]
    batched = learner.example_losses(examples)
    alone = torch.stack([learner.example_losses([ex])[0] for ex in examples])
    assert torch.allclose(batched, alone, atol=1e-5)
    full = []
    for ex in examples:  # the textbook computation: full logits, no padding
        ids = torch.tensor([ex.pair.input_ids])
        with torch.no_grad():
            logp = learner.model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        n = len(ex.pair.prompt_ids)
        targets = ids[0, n:]
        full.append(-logp[n - 1:].gather(1, targets[:, None]).mean())
    assert torch.allclose(batched, torch.stack(full), atol=1e-5)


def test_bfloat16_training_precision_trains_with_fp32_master_weights(tiny_model_dir, example):
    learner = LoRALearner(LearnerSettings(model_path=str(tiny_model_dir), lora_rank=8, lora_alpha=16,
                                          learning_rate=5e-3, device="cpu", precision="bfloat16"))
    reference = LoRALearner(LearnerSettings(model_path=str(tiny_model_dir), lora_rank=8, lora_alpha=16,
                                            learning_rate=5e-3, device="cpu"))
    assert torch.allclose(learner.example_losses([example]), reference.example_losses([example]), rtol=0.05)
    first = learner.step([example]).loss
    for _ in range(20):
        last = learner.step([example]).loss
    assert last < first / 2
    assert all(p.dtype == torch.float32 for p in learner.lora_parameters().values())
