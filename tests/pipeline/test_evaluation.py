"""Candidate vs champion through a real vLLM server (tiny model): what is measured is what would be served."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from cl_core.errors import InvalidInputError
from cl_core.pipeline.evaluation import EvalItem, compare, evaluate, evaluate_items, load_probes
from cl_core.serving.client import VLLMServer
from cl_core.serving.deployment import Deployment

FRANCE = ("What is the capital of France?", "Paris is the capital.")
HELLO = ("Hello world, how are you today?", "The answer is blue.")

pytestmark = pytest.mark.integration


def _train_adapter(model_dir: Path, path: Path, pairs: list[tuple[str, str]], steps: int = 40) -> str:
    from transformers import AutoTokenizer

    from cl_core.learner import Example, LearnerSettings, LoRALearner
    from cl_core.prompting import encode_pair

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    learner = LoRALearner(LearnerSettings(model_path=str(model_dir), lora_rank=8, lora_alpha=16,
                                          learning_rate=5e-3, device="cpu"))
    examples = [Example(encode_pair(tokenizer, prompt, answer)) for prompt, answer in pairs]
    for _ in range(steps):
        learner.step(examples)
    return str(learner.save_adapter(path))


@pytest.fixture(scope="module")
def served(vllm_server, tiny_model_dir):
    """`old` learned FRANCE (it is the champion, served under a stable name), `new` learned HELLO only."""
    tag = uuid.uuid4().hex[:6]
    root = Path(vllm_server.adapter_dir) / f"evaluation-{tag}"
    server = VLLMServer(vllm_server.base_url)
    names = {"stable": f"stable-{tag}", "old": f"ver-{tag}@v1", "new": f"ver-{tag}@v2"}
    old = _train_adapter(tiny_model_dir, root / "v1", [FRANCE])
    new = _train_adapter(tiny_model_dir, root / "v2", [HELLO])
    Deployment([server], stable_name=names["stable"]).promote(names["old"], old)
    server.load_adapter(names["new"], new)
    yield server, names
    for name in server.models():
        if tag in name:
            server.unload_adapter(name)
    server.close()


def test_candidate_vs_base_on_its_corrections(served, tiny_model_dir):
    server, names = served
    report = compare(server, str(tiny_model_dir), candidate=names["new"], champion="base",
                     heldout=[EvalItem(*FRANCE)], corrections=[HELLO], probes=load_probes()[:4], replayed=[])
    cand, champ = report.candidate, report.champion
    assert cand["corrections_exact"] == 1.0 and champ["corrections_exact"] == 0.0
    assert cand["corrections_n"] == 1.0 and cand["probe_n"] == 4.0 and cand["heldout_n"] == 1.0
    assert "replay_exact" not in cand and "replay_exact" not in champ  # no items: absent, not 0
    assert cand["corrections_logprob"] > -0.5 > champ["corrections_logprob"]
    # The logprob metric is the server's reference logprob of the answer, per token.
    direct = server.reference_logprobs(names["new"], str(tiny_model_dir), [HELLO])[0]
    assert cand["corrections_logprob"] == pytest.approx(direct.mean, abs=1e-6)
    assert report.derived["heldout_gain"] == cand["heldout_exact"] - champ["heldout_exact"]
    assert "retention_drop" not in report.derived
    markdown = report.to_markdown()
    assert f"candidate `{names['new']}`" in markdown and "Not measured (no items): replay." in markdown


def test_forgetting_against_the_served_champion(served, tiny_model_dir):
    server, names = served
    report = compare(server, str(tiny_model_dir), candidate=names["new"], champion=names["stable"],
                     corrections=[HELLO], replayed=[FRANCE])
    assert report.champion["replay_exact"] == 1.0  # the champion (served under the stable name) knows FRANCE
    assert report.candidate["replay_exact"] == 0.0
    assert report.derived["retention_drop"] == 1.0 and report.derived["forgetting"] == 1.0
    assert report.derived["retention_drop_logprob"] > 1.0
    assert report.metrics["champion.replay_exact"] == 1.0
    assert "Answered right by the champion, wrong by the candidate (1)" in report.to_markdown()


def test_evaluate_from_a_url_fits_max_tokens_to_the_reference(served, vllm_server, tiny_model_dir):
    _, names = served
    items = [EvalItem(*FRANCE, kind="replay")]
    # max_tokens=1 would cut "Paris is the capital." short; it is raised to fit the reference.
    metrics = evaluate(vllm_server.base_url, str(tiny_model_dir), names["stable"], items, max_tokens=1)
    assert metrics["replay_exact"] == 1.0 and metrics["replay_n"] == 1.0
    results = evaluate_items(vllm_server.base_url, str(tiny_model_dir), names["stable"], items)
    assert results[0].output == FRANCE[1] and results[0].n_tokens > 1
    with pytest.raises(InvalidInputError, match="same name"):
        compare(vllm_server.base_url, str(tiny_model_dir), candidate="base", champion="base", heldout=[FRANCE])
