"""vLLM serves exactly what the learner trained: prompt logprobs agree for the same adapter version."""

import math

import pytest

from cl_core.prompting import encode_pair

pytestmark = pytest.mark.integration
PROMPTS = [("What is the capital of France?", "Paris is the capital."), ("Hello world", "how are you today?")]


def _max_diff(model, pair):
    served = model.engine.prompt_logprobs([pair.input_ids], model._current)[0]
    trained = model._get_learner().token_logprobs(pair.input_ids)
    return max(abs(a - b) for a, b in zip(served[1:], trained[1:], strict=True))


@pytest.mark.parametrize("mode", ["lora", "merged"])
def test_vllm_logprobs_equal_learner_logprobs(make_model, mode):
    model = make_model(mode)
    for i, (prompt, response) in enumerate(PROMPTS * 2):
        model.add_experience(prompt, response + ("" if i < 2 else " Again."))
        report = model.learn(epochs=3)
        assert report.published
        pairs = [encode_pair(model.tokenizer, p, r) for p, r in PROMPTS]
        diffs = [_max_diff(model, pair) for pair in pairs]
        assert max(diffs) <= 1e-4, (report.version.name, diffs)
    # The adapter really changed what is served (parity is not vacuous).
    pair = encode_pair(model.tokenizer, *PROMPTS[0])
    base = model.engine.prompt_logprobs([pair.input_ids], None)[0]
    served = model.engine.prompt_logprobs([pair.input_ids], model._current)[0]
    assert max(abs(a - b) for a, b in zip(base[1:], served[1:], strict=True)) > 1e-2
    assert not any(math.isnan(x) for x in served[1:])
