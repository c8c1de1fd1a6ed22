"""The pipeline's vLLM client and the all-or-nothing stable-name switch, against a real vLLM server (tiny model).

Every test uses its own stable name, so tests sharing the session's server never see each other's state.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import uuid
from pathlib import Path

import httpx
import pytest

from cl_core.errors import InvalidInputError
from cl_core.serving.client import (
    AdapterRefused,
    InconsistentDeployment,
    PromotionFailed,
    PromptFormatMismatch,
    ServerUnavailable,
    StageFailed,
    VLLMServer,
    _refusal_hint,
)
from cl_core.serving.deployment import Deployment

PROMPT = "What is the capital of France?"
ANSWERS = {"v1": "Paris is the capital.", "v2": "The answer is blue."}


# --- fixtures -----------------------------------------------------------------------------------------------------
def _train_adapter(model_dir: Path, path: Path, answer: str, rank: int = 8, steps: int = 40) -> Path:
    from transformers import AutoTokenizer

    from cl_core.learner import Example, LearnerSettings, LoRALearner
    from cl_core.prompting import encode_pair

    learner = LoRALearner(LearnerSettings(model_path=str(model_dir), lora_rank=rank, lora_alpha=2 * rank,
                                          learning_rate=5e-3, device="cpu"))
    example = Example(encode_pair(AutoTokenizer.from_pretrained(model_dir), PROMPT, answer))
    for _ in range(steps):
        learner.step([example])
    return learner.save_adapter(path)


@pytest.fixture(scope="module")
def adapters(vllm_server, tiny_model_dir) -> dict[str, str]:
    """Two rank-8 versions that answer PROMPT differently, and a rank-32 one the server (max rank 16) refuses."""
    root = Path(vllm_server.adapter_dir) / f"serving-{uuid.uuid4().hex[:6]}"
    out = {name: str(_train_adapter(tiny_model_dir, root / name, answer)) for name, answer in ANSWERS.items()}
    out["big"] = str(_train_adapter(tiny_model_dir, root / "big", ANSWERS["v1"], rank=32, steps=1))
    return out


@pytest.fixture
def server(vllm_server):
    with VLLMServer(vllm_server.base_url) as client:
        yield client


@pytest.fixture
def names(server):
    """A unique stable name and version prefix per test; everything loaded under them (replica views' suffixed
    names included) is unloaded afterwards."""
    tag = uuid.uuid4().hex[:6]
    yield f"stable-{tag}", f"ver-{tag}"
    for name in server.models():
        if tag in name:
            server.unload_adapter(name)


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _greedy(server: VLLMServer, model: str) -> str:
    return server.chat(model, [PROMPT], max_tokens=12)[0]


class ReplicaView(httpx.BaseTransport):
    """A second replica made from the real server: its own adapter namespace on the same engine.

    Every adapter name it is sent is stored on the server with a suffix, and `/v1/models` shows only its own
    names (without the suffix), so its state is independent of the first replica's. `refuse` makes loads of one
    name fail like a replica that ran out of memory. Everything else is forwarded as-is.
    """

    def __init__(self, target: str, suffix: str = "__b", refuse: str | None = None) -> None:
        self.target = httpx.URL(target)
        self.suffix = suffix
        self.refuse = refuse
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        content = request.content
        if content and request.headers.get("content-type", "").startswith("application/json"):
            body = json.loads(content)
            if self.refuse is not None and request.url.path == "/v1/load_lora_adapter" and \
                    body.get("lora_name") == self.refuse:
                return httpx.Response(500, json={"error": {"message": "injected: replica b ran out of memory"}})
            for key in ("lora_name", "model"):
                if body.get(key) not in (None, "base"):
                    body[key] += self.suffix
            content = json.dumps(body).encode()
        url = request.url.copy_with(scheme=self.target.scheme, host=self.target.host, port=self.target.port)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length", "host")}
        response = self.inner.handle_request(httpx.Request(request.method, url, headers=headers, content=content))
        response.read()
        body_bytes = response.content
        if request.url.path == "/v1/models" and response.status_code == 200:
            data = response.json()
            cards = []
            for card in data["data"]:
                if card["id"] == "base" or card["id"].endswith(self.suffix):
                    cards.append(card | {"id": card["id"].removesuffix(self.suffix)})
            body_bytes = json.dumps(data | {"data": cards}).encode()
        return httpx.Response(response.status_code, content=body_bytes,
                              headers={"content-type": response.headers.get("content-type", "application/json")})


# --- one server -----------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_load_list_chat_unload(server, adapters, names):
    name = f"{names[1]}@v1"
    assert server.health()
    assert server.models()["base"]
    server.load_adapter(name, adapters["v1"])
    assert server.models()[name] == adapters["v1"]
    assert _greedy(server, name) == ANSWERS["v1"]
    assert _greedy(server, "base") != ANSWERS["v1"]
    with pytest.raises(AdapterRefused, match="new name per version") as refused:
        server.load_adapter(name, adapters["v2"])
    assert refused.value.status == 400
    server.unload_adapter(name)
    assert name not in server.models()
    with pytest.raises(AdapterRefused, match="not loaded") as missing:
        server.unload_adapter(name)
    assert missing.value.status == 404


@pytest.mark.integration
def test_refused_adapters_leave_the_stable_version_serving(server, adapters, names, tokenizer):
    stable, version = names
    deployment = Deployment([server.base_url], stable_name=stable)
    deployment.promote(f"{version}@v1", adapters["v1"])
    before = server.reference_logprobs(stable, tokenizer, [(PROMPT, ANSWERS["v1"])])

    with pytest.raises(AdapterRefused, match="max-lora-rank") as too_big:
        server.load_adapter(f"{version}@big", adapters["big"])
    assert too_big.value.status == 500 and "greater than max_lora_rank" in too_big.value.message
    with pytest.raises(AdapterRefused, match="CL_ADAPTER_DIR") as missing:
        server.load_adapter(f"{version}@gone", adapters["v1"] + "-does-not-exist")
    assert missing.value.status == 404

    with pytest.raises(StageFailed, match="max_lora_rank"):
        deployment.promote(f"{version}@big", adapters["big"])
    with pytest.raises(PromotionFailed, match="max_lora_rank") as failed:
        deployment.switch(adapters["big"])  # straight to the stable name: the in-place reload is refused
    assert failed.value.restored == {}  # the refused replica itself was never changed

    assert deployment.current() == {server.base_url: adapters["v1"]}
    assert f"{version}@big" not in server.models()
    assert _greedy(server, stable) == ANSWERS["v1"]
    after = server.reference_logprobs(stable, tokenizer, [(PROMPT, ANSWERS["v1"])])
    assert after[0].total == pytest.approx(before[0].total, abs=1e-5)


@pytest.mark.integration
def test_stable_name_answers_exactly_like_the_promoted_version(server, adapters, names, tokenizer):
    stable, version = names
    deployment = Deployment([server.base_url], stable_name=stable)
    pairs = [(PROMPT, ANSWERS["v1"]), (PROMPT, ANSWERS["v2"]), ("Hello world, how are you today?", "blue")]
    for tag in ("v1", "v2"):  # first a plain load, then an in-place reload
        result = deployment.promote(f"{version}@{tag}", adapters[tag])
        assert result.previous == {server.base_url: adapters["v1"] if tag == "v2" else None}
        assert result.latency_s > 0 and set(result.first_response_s) == {server.base_url}
        assert deployment.check_consistent() == adapters[tag]
        assert _greedy(server, stable) == _greedy(server, f"{version}@{tag}") == ANSWERS[tag]
        served = server.reference_logprobs(stable, tokenizer, pairs)
        versioned = server.reference_logprobs(f"{version}@{tag}", tokenizer, pairs)
        for a, b in zip(served, versioned, strict=True):
            assert a.total == pytest.approx(b.total, abs=1e-5) and a.n_tokens == b.n_tokens
    # The two versions really differ, so the equalities above are not trivially true.
    v1 = server.reference_logprobs(f"{version}@v1", tokenizer, pairs[:1])[0]
    v2 = server.reference_logprobs(f"{version}@v2", tokenizer, pairs[:1])[0]
    assert abs(v1.total - v2.total) > 1.0


def _long_prompt_logprobs(server: VLLMServer, model: str, prompt_ids: list[int]) -> list[float]:
    """Greedy continuation logprobs of a prompt longer than one KV block (128 tokens on CPU): its first block
    comes from the prefix cache when the cache holds it."""
    data = httpx.post(f"{server.base_url}/v1/completions", timeout=60,
                      json={"model": model, "prompt": prompt_ids, "max_tokens": 3, "temperature": 0.0,
                            "logprobs": 1}).json()
    return data["choices"][0]["logprobs"]["token_logprobs"]


def _replace_dir(source: str, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)


@pytest.mark.integration
def test_switch_resets_the_prefix_cache(server, adapters, names, tokenizer, tmp_path, vllm_server):
    """An in-place reload of the same path whose files changed: without a reset the cached KV of the old weights
    is reused (stale logprobs); `switch` resets, so the stable name answers like a fresh load of the new files."""
    stable, version = names
    text = "The quick brown fox jumps over the lazy dog. " * 30
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"][:200]
    live = Path(vllm_server.adapter_dir) / f"live-{version}"
    deployment = Deployment([server.base_url], stable_name=stable)

    server.load_adapter(f"{version}@fresh-v2", adapters["v2"])
    expected_v2 = _long_prompt_logprobs(server, f"{version}@fresh-v2", prompt_ids)

    _replace_dir(adapters["v1"], live)
    deployment.switch(str(live))
    expected_v1 = _long_prompt_logprobs(server, stable, prompt_ids)  # also fills the prefix cache
    assert max(abs(a - b) for a, b in zip(expected_v1, expected_v2, strict=True)) > 1e-3

    # What goes wrong without a reset: the raw in-place reload serves v2 weights on v1's cached KV.
    _replace_dir(adapters["v2"], live)
    server.load_adapter(stable, str(live), inplace=True)
    stale = _long_prompt_logprobs(server, stable, prompt_ids)
    assert max(abs(a - b) for a, b in zip(stale, expected_v2, strict=True)) > 1e-3

    # The switch (reload + reset) gives exactly the fresh v2 numbers.
    _replace_dir(adapters["v1"], live)
    deployment.switch(str(live))
    assert _long_prompt_logprobs(server, stable, prompt_ids) == pytest.approx(expected_v1, abs=1e-5)
    _replace_dir(adapters["v2"], live)
    deployment.switch(str(live))
    assert _long_prompt_logprobs(server, stable, prompt_ids) == pytest.approx(expected_v2, abs=1e-5)


@pytest.mark.integration
def test_a_dead_replica_stops_the_promotion_before_anything_changes(server, adapters, names):
    stable, version = names
    Deployment([server.base_url], stable_name=stable).promote(f"{version}@v1", adapters["v1"])
    dead = _dead_url()
    pair = Deployment([server.base_url, dead], stable_name=stable)

    with pytest.raises(StageFailed) as staged:
        pair.promote(f"{version}@v2", adapters["v2"])
    assert list(staged.value.failures) == [dead] and "unreachable" in staged.value.failures[dead]
    with pytest.raises(PromotionFailed) as switched:
        pair.switch(adapters["v2"])
    assert list(switched.value.failures) == [dead] and switched.value.restored == {}

    assert f"{version}@v2" not in server.models()
    assert Deployment([server.base_url], stable_name=stable).current() == {server.base_url: adapters["v1"]}
    assert _greedy(server, stable) == ANSWERS["v1"]
    with pytest.raises(ServerUnavailable):
        pair.current()


@pytest.mark.integration
def test_a_replica_failing_mid_switch_puts_the_switched_ones_back(server, adapters, names):
    stable, version = names
    Deployment([server.base_url], stable_name=stable).promote(f"{version}@v1", adapters["v1"])
    view = ReplicaView(server.base_url)
    replica_b = VLLMServer("http://replica-b.invalid", transport=view)
    Deployment([replica_b], stable_name=stable).switch(adapters["v1"])
    view.refuse = stable  # from now on, replica b fails to load the stable name
    pair = Deployment([server, replica_b], stable_name=stable)

    with pytest.raises(PromotionFailed, match="ran out of memory") as failed:
        pair.promote(f"{version}@v2", adapters["v2"])
    assert failed.value.step == "switch"
    assert list(failed.value.failures) == ["http://replica-b.invalid"]
    assert failed.value.restored == {server.base_url: "restored"}
    # Replica a had switched to v2 before b failed; it serves v1 again, weights included.
    assert pair.current() == {server.base_url: adapters["v1"], "http://replica-b.invalid": adapters["v1"]}
    assert _greedy(server, stable) == _greedy(replica_b, stable) == ANSWERS["v1"]


@pytest.mark.integration
def test_rollback_to_an_older_version(server, adapters, names, tokenizer):
    stable, version = names
    deployment = Deployment([server.base_url], stable_name=stable)
    deployment.promote(f"{version}@v1", adapters["v1"])
    deployment.promote(f"{version}@v2", adapters["v2"])
    with pytest.raises(InvalidInputError, match="promote another version"):
        deployment.retire(f"{version}@v2")
    with pytest.raises(InvalidInputError, match="never retired"):
        deployment.retire(stable)
    deployment.retire(f"{version}@v1")
    assert f"{version}@v1" not in server.models()

    result = deployment.rollback(adapters["v1"], f"{version}@v1")
    assert result.kind == "rollback" and result.previous == {server.base_url: adapters["v2"]}
    assert deployment.current() == {server.base_url: adapters["v1"]}
    assert _greedy(server, stable) == ANSWERS["v1"]
    served = server.reference_logprobs(stable, tokenizer, [(PROMPT, ANSWERS["v1"])])[0]
    versioned = server.reference_logprobs(f"{version}@v1", tokenizer, [(PROMPT, ANSWERS["v1"])])[0]
    assert served.total == pytest.approx(versioned.total, abs=1e-5)


@pytest.mark.integration
def test_two_replicas_switch_together_and_disagreement_is_named(server, adapters, names):
    stable, version = names
    replica_b = VLLMServer("http://replica-b.invalid", transport=ReplicaView(server.base_url))
    pair = Deployment([server, replica_b], stable_name=stable)
    assert pair.check_consistent() is None  # nobody serves the stable name yet
    for tag in ("v1", "v2"):
        result = pair.promote(f"{version}@{tag}", adapters[tag])
        assert set(result.first_response_s) == set(pair.replicas)
        assert pair.check_consistent() == adapters[tag]
        assert _greedy(server, stable) == _greedy(replica_b, stable) == ANSWERS[tag]
    replica_b.load_adapter(stable, adapters["v1"], inplace=True)  # someone changed replica b by hand
    with pytest.raises(InconsistentDeployment, match="replica-b.invalid: " + adapters["v1"]):
        pair.check_consistent()
    pair.rollback(adapters["v1"], f"{version}@v1")
    assert pair.check_consistent() == adapters["v1"]


@pytest.mark.integration
def test_reference_logprobs_match_the_learner(server, adapters, names, tiny_model_dir, tokenizer):
    """What the server scores for an adapter is what the learner computes for it (fp32: within 1e-3)."""
    from cl_core.learner import LearnerSettings, LoRALearner
    from cl_core.prompting import encode_pair

    name = f"{names[1]}@v1"
    server.load_adapter(name, adapters["v1"])
    learner = LoRALearner(LearnerSettings(model_path=str(tiny_model_dir), lora_rank=8, lora_alpha=16, device="cpu"))
    pairs = [(PROMPT, ANSWERS["v1"]), (PROMPT, ANSWERS["v2"]), ("Hello world, how are you today?", "Colors: red")]

    def check(scores) -> None:
        for (prompt, answer), score in zip(pairs, scores, strict=True):
            pair = encode_pair(tokenizer, prompt, answer, add_eos=False)
            expected = learner.token_logprobs(pair.input_ids)[len(pair.prompt_ids):]
            assert score.n_tokens == len(expected)
            assert score.total == pytest.approx(sum(expected), abs=1e-3)
            assert score.mean == pytest.approx(sum(expected) / len(expected), abs=1e-3)

    check(server.reference_logprobs("base", tokenizer, pairs))  # a fresh LoRA (B = 0) is the base model
    learner.load_adapter(Path(adapters["v1"]))
    scores = server.reference_logprobs(name, tokenizer, pairs)
    check(scores)
    assert scores[0].mean > -0.5 > scores[1].mean  # v1 learned its answer, not v2's
    with_eos = server.reference_logprobs(name, tokenizer, pairs[:1], add_eos=True)[0]
    assert with_eos.n_tokens == scores[0].n_tokens + 1 and math.isfinite(with_eos.total)


@pytest.mark.integration
def test_client_formatting_is_checked_against_the_server(server, tiny_model_dir):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(PromptFormatMismatch, match="formats chat prompts differently"):
        server.reference_logprobs("base", other, [(PROMPT, "Paris")])


# --- without a server -----------------------------------------------------------------------------------------------
def test_unreachable_server_is_named():
    dead = _dead_url()
    client = VLLMServer(dead + "/v1/")
    assert client.base_url == dead and not client.health()
    with pytest.raises(ServerUnavailable, match=r"unreachable.*CL_VLLM_URLS"):
        client.models()


@pytest.mark.parametrize(("status", "message", "hint"), [
    (404, "Not Found", "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"),
    (404, "Loading lora x failed: No adapter found for /a/b", "CL_ADAPTER_DIR"),
    (500, "Worker failed with error 'LoRA rank 32 is greater than max_lora_rank 16.'", "--max-lora-rank"),
    (400, "The lora adapter 'x' has already been loaded.", "new name per version"),
    (400, "The lora adapter 'base' conflicts with a served base model.", "other than the served base model"),
    (500, "LoRA is not enabled. Use --enable-lora to enable LoRA.", "--enable-lora"),
    (500, "something else", "server log"),
])
def test_refusals_say_how_to_fix_them(status, message, hint):
    assert hint in _refusal_hint(status, message)
    assert hint in str(AdapterRefused("http://h:1", "x", status, message))


def test_bad_arguments_are_rejected_before_any_request():
    with pytest.raises(InvalidInputError, match="http"):
        VLLMServer("127.0.0.1:8000")
    with pytest.raises(InvalidInputError, match="non-empty list"):
        Deployment([])
    with pytest.raises(InvalidInputError, match="listed twice"):
        Deployment(["http://a:1", "http://a:1/"])
    with pytest.raises(InvalidInputError, match="base model"):
        Deployment(["http://a:1"], stable_name="base")
    deployment = Deployment(["http://a:1"])
    with pytest.raises(InvalidInputError, match="its own name"):
        deployment.stage("continual", "/x")
    with pytest.raises(InvalidInputError, match="single str"):
        VLLMServer("http://a:1").chat("base", "one prompt")
