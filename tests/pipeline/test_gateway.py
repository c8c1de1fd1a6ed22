"""The gateway over real HTTP: the official `openai` client -> gateway (uvicorn) -> a real vLLM server (tiny model).

One vLLM server for the session (`vllm_server`, shared with test_serving; every name loaded here carries this
module's tag and is unloaded afterwards), gateways started in threads on free loopback ports. Two random PEFT
LoRA adapters (B not zero: each answers differently) form the bank, routed by task id.

The last section needs no vLLM: a fake upstream checks what vLLM cannot show on demand (a stream that pauses, a
dead replica next to a live one) and the routing rules in memory.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from cl_core.bank.embedder import BaseEmbedder, EmbedderIdentity
from cl_core.bank.manifest import BankManifest, ManifestAdapter
from cl_core.bank.router import make_router, save_router
from cl_core.errors import ConfigError
from cl_core.gateway.app import Interaction, create_app
from cl_core.gateway.routing import BankRouting
from cl_core.gateway.settings import GatewaySettings
from cl_core.serving.client import VLLMServer
from cl_core.stack.service import free_port

TAG = uuid.uuid4().hex[:6]
A, B = f"ga{TAG}", f"gb{TAG}"
PROMPT = "What is the capital of France?"
GEN = {"max_tokens": 8, "temperature": 0.0}


# --- helpers ------------------------------------------------------------------------------------------------------
class RecordingSink:
    def __init__(self) -> None:
        self.items: list[Interaction] = []
        self._lock = threading.Lock()

    def record(self, interaction: Interaction) -> None:
        with self._lock:
            self.items.append(interaction)

    def after(self, seen: int, timeout: float = 5.0) -> Interaction:
        """The first interaction recorded after the first `seen` ones (a stream is recorded once the gateway has
        sent its last chunk, which may be just after the client read it)."""
        deadline = time.monotonic() + timeout
        while len(self.items) <= seen:
            assert time.monotonic() < deadline, "no interaction was recorded"
            time.sleep(0.01)
        return self.items[seen]


class Running:
    """A uvicorn server in a thread; `url` is its root."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def _random_adapter(model_dir: Path, path: Path, seed: int) -> str:
    """A rank-8 PEFT LoRA with random A and B (init_lora_weights=False), so it changes the model's answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj", "o_proj"]))
    peft_model.save_pretrained(path)
    return str(path)


def _write_bank(root: Path, base: str, adapters: dict[str, tuple[int, str]], router: str = "task_id") -> Path:
    state = make_router(router)
    for name in adapters:
        state.add_adapter(name)
    save_router(state, root / "router")
    manifest = BankManifest(base_model=base, router=router, router_dir=str(root / "router"),
                            adapters=tuple(ManifestAdapter(n, v, p) for n, (v, p) in adapters.items()))
    return manifest.save(root / "bank.json")


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _served(name: str, version: int = 1) -> str:
    return f"continual-{name}@v{version}"


def _direct(vllm_server: Any, model: str, prompt: str = PROMPT) -> str:
    data = httpx.post(f"{vllm_server.base_url}/v1/chat/completions", timeout=60,
                      json={"model": model, "messages": [{"role": "user", "content": prompt}], **GEN}).json()
    return data["choices"][0]["message"]["content"]


def _assert_error(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]
    return error


# --- fixtures -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bank_files(vllm_server, tiny_model_dir) -> dict[str, Any]:
    root = Path(vllm_server.adapter_dir) / f"gateway-{TAG}"
    paths = {A: _random_adapter(tiny_model_dir, root / "adapters" / A, seed=1),
             B: _random_adapter(tiny_model_dir, root / "adapters" / B, seed=2)}
    manifest = _write_bank(root / "bank", str(tiny_model_dir), {A: (1, paths[A]), B: (1, paths[B])})
    yield {"root": root, "paths": paths, "manifest": manifest}
    with VLLMServer(vllm_server.base_url) as server:
        for name in server.models():
            if TAG in name:
                server.unload_adapter(name)


@pytest.fixture
def make_gateway(vllm_server) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(sink: Any = None, **changes: Any) -> Running:
        settings = GatewaySettings(**({"upstreams": (vllm_server.base_url,), "port": 0, "reload_interval_s": 0.2}
                                      | changes))
        started.append(Running(create_app(settings, sink=sink)))
        return started[-1]

    yield start
    for running in started:
        running.stop()


@pytest.fixture(scope="module")
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture(scope="module")
def gateway(vllm_server, bank_files, sink) -> Iterator[Running]:
    settings = GatewaySettings(upstreams=(vllm_server.base_url,), manifest_path=bank_files["manifest"],
                               max_body_bytes=64 * 1024, port=0)
    running = Running(create_app(settings, sink=sink))
    yield running
    running.stop()


# --- the openai client against the gateway ---------------------------------------------------------------------------
@pytest.mark.integration
def test_models_lists_continual_and_the_upstream_models(gateway):
    ids = [m.id for m in gateway.client().models.list().data]
    assert ids[0] == "continual"
    assert "base" in ids
    assert ids.count("continual") == 1


@pytest.mark.integration
def test_chat_routes_each_task_to_its_own_adapter(gateway, vllm_server, sink):
    client = gateway.client()
    texts = {}
    for name, how in ((A, {"extra_body": {"task": A}}), (B, {"extra_headers": {"x-cl-task": B}})):
        seen = len(sink.items)
        raw = client.chat.completions.with_raw_response.create(
            model="continual", messages=[{"role": "user", "content": PROMPT}], **GEN, **how)
        assert raw.headers["x-cl-adapter"] == name
        assert raw.headers["x-cl-adapter-version"] == "1"
        assert raw.headers["x-cl-served-model"] == _served(name)
        assert float(raw.headers["x-cl-route-score"]) == 1.0
        assert raw.headers["x-cl-router"] == "task_id"
        cl = raw.http_response.json()["cl"]
        assert cl["adapter"] == name and cl["version"] == 1 and cl["served_model"] == _served(name)
        completion = raw.parse()
        assert completion.model == _served(name)
        texts[name] = completion.choices[0].message.content
        # the adapter the gateway picked answers exactly like the versioned name asked for directly
        assert texts[name] == _direct(vllm_server, _served(name))
        captured = sink.after(seen)
        assert (captured.adapter, captured.version, captured.served_model) == (name, 1, _served(name))
        assert captured.prompt == PROMPT and captured.response == texts[name] and not captured.stream
        assert captured.task == name and captured.response_id == completion.id and captured.latency_s > 0
    assert texts[A] != texts[B]
    assert _direct(vllm_server, "base") not in (texts[A], texts[B])


@pytest.mark.integration
def test_requests_without_a_known_task_reach_the_base(gateway, vllm_server):
    client = gateway.client()
    for how in ({}, {"extra_body": {"task": "no-such-task"}}):
        raw = client.chat.completions.with_raw_response.create(
            model="continual", messages=[{"role": "user", "content": PROMPT}], **GEN, **how)
        assert raw.headers["x-cl-adapter"] == "base"
        assert raw.headers["x-cl-served-model"] == "base"
        assert raw.headers["x-cl-adapter-version"] == "none"
        assert raw.parse().choices[0].message.content == _direct(vllm_server, "base")


@pytest.mark.integration
def test_other_model_names_pass_straight_through(gateway):
    client = gateway.client()
    raw = client.chat.completions.with_raw_response.create(
        model="base", messages=[{"role": "user", "content": PROMPT}], **GEN)
    assert (raw.headers["x-cl-adapter"], raw.headers["x-cl-served-model"]) == ("base", "base")
    raw = client.completions.with_raw_response.create(model=_served(A), prompt=PROMPT, **GEN)
    assert raw.headers["x-cl-adapter"] == A and raw.headers["x-cl-adapter-version"] == "1"
    assert raw.http_response.json()["cl"]["routed"] is False


@pytest.mark.integration
def test_completions_plain_and_streaming_agree(gateway, sink):
    client = gateway.client()
    raw = client.completions.with_raw_response.create(model="continual", prompt=PROMPT, extra_body={"task": B},
                                                      **GEN)
    assert raw.headers["x-cl-served-model"] == _served(B)
    text = raw.parse().choices[0].text
    seen = len(sink.items)
    raw = client.completions.with_raw_response.create(model="continual", prompt=PROMPT, extra_body={"task": B},
                                                      stream=True, **GEN)
    assert raw.headers["x-cl-adapter"] == B and raw.headers["content-type"].startswith("text/event-stream")
    chunks = [c.choices[0].text for c in raw.parse() if c.choices]
    assert len(chunks) > 1
    assert "".join(chunks) == text
    captured = sink.after(seen)
    assert captured.stream and captured.response == text and captured.endpoint == "completions"


@pytest.mark.integration
def test_chat_streaming_chunk_by_chunk(gateway, sink):
    client = gateway.client()
    messages = [{"role": "user", "content": PROMPT}]
    text = client.chat.completions.create(model="continual", messages=messages, extra_body={"task": A},
                                          **GEN).choices[0].message.content
    seen = len(sink.items)
    with client.chat.completions.with_streaming_response.create(
            model="continual", messages=messages, extra_body={"task": A}, stream=True, **GEN) as response:
        assert response.headers["x-cl-served-model"] == _served(A)
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    pieces = [json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[:-1]
              if json.loads(e[6:])["choices"]]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == text
    captured = sink.after(seen)
    assert captured.stream and captured.response == text and captured.endpoint == "chat.completions"


@pytest.mark.integration
def test_bank_and_health(gateway, bank_files):
    bank = httpx.get(f"{gateway.url}/v1/bank").json()
    assert bank["router"] == "task_id" and bank["error"] is None
    assert bank["served_names"] == {A: _served(A), B: _served(B)}
    assert bank["manifest"]["adapters"][0]["name"] == A
    health = httpx.get(f"{gateway.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.integration
def test_manifest_change_is_picked_up_and_the_new_version_loaded(make_gateway, bank_files, tiny_model_dir,
                                                                 vllm_server):
    root = bank_files["root"] / "reload"
    paths = bank_files["paths"]
    manifest = _write_bank(root, str(tiny_model_dir), {A: (1, paths[A])})
    running = make_gateway(manifest_path=manifest)
    client = running.client()

    def served_for(task: str) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model="continual", messages=[{"role": "user", "content": PROMPT}], extra_body={"task": task}, **GEN)
        return raw.headers["x-cl-served-model"]

    assert served_for(A) == _served(A)
    assert served_for(B) == "base"
    # a new version of A (B's weights) and adapter B: the watcher sees the file change, no reload call
    _write_bank(root, str(tiny_model_dir), {A: (2, paths[B]), B: (1, paths[B])})
    deadline = time.monotonic() + 10
    while httpx.get(f"{running.url}/v1/bank").json()["served_names"].get(A) != _served(A, 2):
        assert time.monotonic() < deadline, "the gateway did not notice the new manifest"
        time.sleep(0.1)
    assert served_for(A) == _served(A, 2)  # not loaded on vLLM before: loaded on the 404, then answered
    assert _served(A, 2) in VLLMServer(vllm_server.base_url).models()
    assert served_for(B) == _served(B)
    # an explicit reload answers with the bank
    reloaded = httpx.post(f"{running.url}/admin/reload").json()
    assert reloaded["reloaded"] is True and reloaded["served_names"][A] == _served(A, 2)
    # a broken manifest is refused and the previous one keeps serving
    Path(manifest).write_text("{not json")
    refused = httpx.post(f"{running.url}/admin/reload")
    _assert_error(refused, 422, "previous one keeps serving")
    assert httpx.get(f"{running.url}/v1/bank").json()["error"]
    assert served_for(A) == _served(A, 2)


@pytest.mark.integration
def test_no_manifest_uses_the_replicas_stable_name_or_the_base(make_gateway, bank_files, vllm_server, tmp_path):
    running = make_gateway(manifest_path=tmp_path / "missing" / "bank.json")
    raw = running.client().chat.completions.with_raw_response.create(
        model="continual", messages=[{"role": "user", "content": PROMPT}], **GEN)
    assert (raw.headers["x-cl-adapter"], raw.headers["x-cl-served-model"]) == ("base", "base")
    assert httpx.get(f"{running.url}/v1/bank").json()["manifest"] is None

    stable = f"stable-{TAG}"
    server = VLLMServer(vllm_server.base_url)
    server.load_adapter(stable, bank_files["paths"][A])
    try:
        running = make_gateway(manifest_path=tmp_path / "missing" / "bank.json", stable_name=stable)
        client = running.client()
        raw = client.chat.completions.with_raw_response.create(
            model=stable, messages=[{"role": "user", "content": PROMPT}], **GEN)
        assert (raw.headers["x-cl-adapter"], raw.headers["x-cl-served-model"]) == (stable, stable)
        assert raw.parse().choices[0].message.content == _direct(vllm_server, stable)
    finally:
        server.unload_adapter(stable)
    # the gateway still believes the replicas serve it: their 404 sends the request to the base instead
    raw = client.chat.completions.with_raw_response.create(
        model=stable, messages=[{"role": "user", "content": PROMPT}], **GEN)
    assert (raw.headers["x-cl-adapter"], raw.headers["x-cl-served-model"]) == ("base", "base")


@pytest.mark.integration
def test_bad_requests_get_a_4xx_that_names_the_problem(gateway):
    chat = f"{gateway.url}/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    _assert_error(httpx.post(chat, content=b'{"model": "continual", "messages": [',
                             headers={"content-type": "application/json"}), 400, "not valid JSON")
    _assert_error(httpx.post(chat, content=b""), 400, "empty")
    _assert_error(httpx.post(chat, json=["a list"]), 400, "JSON object")
    error = _assert_error(httpx.post(chat, json={"model": "continual"}), 400, "messages")
    assert error["param"] == "messages"
    assert _assert_error(httpx.post(chat, json={"messages": msgs}), 400, "model")["param"] == "model"
    _assert_error(httpx.post(chat, json={"model": "continual", "messages": []}), 400, "non-empty")
    _assert_error(httpx.post(chat, json={"model": "continual", "messages": ["hi"]}), 400, "messages[0]")
    _assert_error(httpx.post(chat, json={"model": "continual", "messages": msgs, "task": 3}), 400, "task")
    _assert_error(httpx.post(chat, json={"model": "continual", "messages": msgs, "stream": "yes"}), 400, "stream")
    _assert_error(httpx.post(f"{gateway.url}/v1/completions", json={"model": "continual"}), 400, "prompt")
    big = {"model": "continual", "messages": [{"role": "user", "content": "x" * 70_000}]}
    _assert_error(httpx.post(chat, json=big), 413, "limit")
    _assert_error(httpx.get(f"{gateway.url}/v1/nothing-here"), 404, "no route")
    # errors of the replica pass through as it gave them (OpenAI-shaped already)
    client = gateway.client()
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        client.chat.completions.create(model="no-such-model", messages=msgs, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="continual", messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="continual", messages=msgs, max_tokens=-1)
    assert httpx.get(f"{gateway.url}/health").status_code == 200  # none of it hurt the gateway


@pytest.mark.integration
def test_upstream_down_is_a_503_with_a_clear_message(make_gateway, bank_files):
    dead = _dead_url()
    running = make_gateway(upstreams=(dead,), manifest_path=bank_files["manifest"])
    client = running.client()
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="continual", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"task": A}, max_tokens=2)
    assert caught.value.status_code == 503
    assert "no vLLM replica is reachable" in str(caught.value) and dead in str(caught.value)
    for path in ("/v1/models", "/health"):
        assert httpx.get(f"{running.url}{path}").status_code == 503


# --- no vLLM: a fake upstream ----------------------------------------------------------------------------------------
def _fake_upstream(pause_s: float = 0.0) -> Any:
    """An OpenAI-shaped upstream: fixed answers, a stream that pauses `pause_s` after its first chunk."""
    app = FastAPI()
    app.state.seen = []
    app.state.streams = []  # per stream: "running", then "complete" or "cancelled"

    @app.get("/health")
    async def health() -> dict:
        return {}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "base", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        app.state.seen.append(body)
        if not body.get("stream"):
            return JSONResponse({"id": "cmpl-1", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                                              "finish_reason": "stop"}]})

        async def events():
            slot = len(app.state.streams)
            app.state.streams.append("running")
            try:
                for i, piece in enumerate(("hel", "lo")):
                    chunk = {"id": "cmpl-2", "object": "chat.completion.chunk", "model": body["model"],
                             "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                    if i == 0:
                        await asyncio.sleep(pause_s)
                yield "data: [DONE]\n\n"
                app.state.streams[slot] = "complete"
            except asyncio.CancelledError:
                app.state.streams[slot] = "cancelled"
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_streams_are_passed_through_unbuffered_and_captured():
    upstream = Running(_fake_upstream(pause_s=1.5))
    sink = RecordingSink()
    gateway = Running(create_app(GatewaySettings(upstreams=(upstream.url,), port=0), sink=sink))
    try:
        stream = gateway.client().chat.completions.create(model="base", messages=[{"role": "user", "content": "q"}],
                                                          stream=True)
        start = time.perf_counter()
        first = next(iter(stream))
        first_after = time.perf_counter() - start
        rest = list(stream)
        total = time.perf_counter() - start
        assert first.choices[0].delta.content == "hel"
        assert first_after < 1.0 < total, (first_after, total)  # the first chunk did not wait for the pause
        assert "".join(c.choices[0].delta.content for c in [first, *rest]) == "hello"
        captured = sink.after(0)
        assert captured.response == "hello" and captured.stream and captured.response_id == "cmpl-2"
        assert captured.adapter == "base"
        # a client that goes away mid-stream: the gateway drops the upstream stream too (no wasted generation)
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", timeout=10,
                          json={"model": "base", "messages": [{"role": "user", "content": "q"}], "stream": True}
                          ) as response:
            next(response.iter_raw())
        states = upstream.server.config.app.state.streams
        deadline = time.monotonic() + 1.0
        while states[-1] == "running" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert states == ["complete", "cancelled"]
        assert len(sink.items) == 1  # an interrupted stream is not captured as an interaction
    finally:
        gateway.stop()
        upstream.stop()


def test_a_dead_replica_is_skipped():
    upstream = Running(_fake_upstream())
    gateway = Running(create_app(GatewaySettings(upstreams=(_dead_url(), upstream.url), balance="round_robin",
                                                 port=0)))
    try:
        client = gateway.client()
        for _ in range(4):
            reply = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "q"}],
                                                   extra_body={"task": "t"})
            assert reply.choices[0].message.content == "hello"
        health = httpx.get(f"{gateway.url}/health").json()
        assert health["status"] == "degraded"
        assert health["upstreams"][upstream.url] == "ok"
        assert "task" not in upstream.server.config.app.state.seen[-1]
    finally:
        gateway.stop()
        upstream.stop()


def test_routing_rules_in_memory(tmp_path):
    manifest = _write_bank(tmp_path / "bank", "tiny", {"facts": (3, "adapters/facts"), "intent": (1, "/abs/i")})
    routing = BankRouting(GatewaySettings(manifest_path=manifest))
    assert routing.reload() is True and routing.reload() is False  # unchanged file: nothing to do
    decision = routing.route("q", "facts")
    assert (decision.served_model, decision.adapter, decision.version, decision.score) == \
        ("continual-facts@v3", "facts", 3, 1.0)
    assert decision.adapter_path == str((tmp_path / "bank" / "adapters" / "facts").resolve())
    assert routing.route("q", None).served_model == "base"
    assert routing.route("q", "other").headers()["x-cl-adapter"] == "base"
    assert routing.describe("continual-intent@v1").adapter_path == "/abs/i"
    old = routing.describe("continual-facts@v1")
    assert (old.adapter, old.version, old.adapter_path) == ("facts", 1, None)
    assert routing.describe("base").label == "base"
    assert routing.describe("something").label == "something"
    # a retired adapter is never routed to, even when the router still names it
    BankManifest(base_model="tiny", router="task_id", router_dir=str(tmp_path / "bank" / "router"),
                 adapters=(ManifestAdapter("facts", 3, "/f", "retired"), ManifestAdapter("intent", 1, "/i"))
                 ).save(manifest)
    assert routing.changed() and routing.reload()
    retired = routing.route("q", "facts")
    assert retired.served_model == "base" and "does not serve" in retired.reason
    # no manifest: the stable name when the replicas serve it, else the base
    bare = BankRouting(GatewaySettings(manifest_path=tmp_path / "none.json"))
    bare.reload(force=True)
    assert bare.route("q", "facts").served_model == "base"
    bare.set_upstream_models(["base", "continual"])
    assert bare.route("q", "facts").served_model == "continual"


def test_settings_from_env_and_bad_values(tmp_path):
    env = {"CL_VLLM_URLS": "http://127.0.0.1:8000/v1, http://127.0.0.1:8001", "CL_ADAPTER_DIR": str(tmp_path),
           "CL_GATEWAY_PORT": "9001"}
    settings = GatewaySettings.from_env(env)
    assert settings.upstreams == ("http://127.0.0.1:8000", "http://127.0.0.1:8001")
    assert settings.manifest_path == tmp_path / "bank.json" and settings.port == 9001
    assert settings.host == "127.0.0.1" and settings.stable_name == "continual"
    assert GatewaySettings.from_env(env | {"CL_BANK_MANIFEST": "/x/b.json"}).manifest_path == Path("/x/b.json")
    for bad in ({"CL_VLLM_URLS": "ftp://x"}, {"CL_GATEWAY_PORT": "http"}, {"CL_GATEWAY_BALANCE": "random"},
                {"CL_GATEWAY_MAX_BODY_BYTES": "0"}, {"CL_VLLM_URLS": "http://a,http://a"}):
        with pytest.raises(ConfigError):
            GatewaySettings.from_env(bad)
    with pytest.raises(ConfigError, match="stable name"):
        GatewaySettings(stable_name="base")


@pytest.mark.integration
def test_the_stack_service_runs_the_gateway_process(vllm_server, bank_files, tmp_path):
    from cl_core.stack.gateway import GatewayServer

    service = GatewayServer(tmp_path / "state", free_port(), upstreams=[vllm_server.base_url],
                            manifest_path=bank_files["manifest"])
    service.die_with_parent = True
    service.start()
    try:
        service.wait_healthy()
        assert service.status() == "healthy"
        client = openai.OpenAI(base_url=service.openai_url, api_key="x", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="continual", messages=[{"role": "user", "content": PROMPT}], extra_body={"task": A}, **GEN)
        assert raw.headers["x-cl-served-model"] == _served(A)
        assert httpx.get(f"{service.url}/v1/bank").json()["manifest_path"] == str(bank_files["manifest"])
    finally:
        assert service.stop(grace=5)
    assert service.status() == "stopped"


class _KeywordEmbedder:
    """A stand-in for BaseEmbedder: one axis per keyword, so which adapter a prompt belongs to is unambiguous."""

    AXES = ("cat", "dog", "tax")

    def __init__(self, model: str, layer: int | None) -> None:
        self.model, self.layer = model, layer
        self.identity = EmbedderIdentity("fake-weights", 1 if layer is None else layer, "mean", len(self.AXES) + 1)
        self.calls = 0

    def embed(self, texts: list[str]) -> Any:
        import numpy as np

        self.calls += 1
        rows = np.full((len(texts), len(self.AXES) + 1), 0.05, dtype=np.float32)
        for i, text in enumerate(texts):
            hits = [j for j, word in enumerate(self.AXES) if word in text]
            rows[i, hits[0] if hits else len(self.AXES)] = 1.0
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    check_identity = BaseEmbedder.check_identity


def test_embedding_router_in_the_gateway_embeds_in_its_space(tmp_path):
    made: list[_KeywordEmbedder] = []

    def factory(model: str, layer: int | None) -> _KeywordEmbedder:
        made.append(_KeywordEmbedder(model, layer))
        return made[-1]

    def write(identity: Any) -> Path:
        router = make_router("embedding", threshold=0.9, center=False, embedder_identity=identity)
        probe = _KeywordEmbedder("m", 1)
        for adapter, word in (("cats", "cat"), ("dogs", "dog")):
            prompts = [f"a {word} question {i}" for i in range(3)]
            router.observe(adapter, prompts, probe.embed(prompts))
        save_router(router, tmp_path / "router")
        return BankManifest(base_model="tiny", router="embedding", router_dir=str(tmp_path / "router"),
                            adapters=(ManifestAdapter("cats", 2, "/c"), ManifestAdapter("dogs", 1, "/d"))
                            ).save(tmp_path / "bank.json")

    manifest = write(_KeywordEmbedder("m", 1).identity)
    routing = BankRouting(GatewaySettings(manifest_path=manifest), embedder_factory=factory)
    routing.reload()
    assert routing.needs_embeddings and made[-1].layer == 1  # the router's recorded layer
    assert asyncio.run(routing.aroute("my cat sneezes", None)).served_model == "continual-cats@v2"
    assert asyncio.run(routing.aroute("my dog barks", None)).served_model == "continual-dogs@v1"
    assert asyncio.run(routing.aroute("my tax return", None)).served_model == "base"
    assert asyncio.run(routing.aroute("  ", None)).served_model == "base"
    # a router fitted in another embedding space is refused, and the loaded one keeps routing
    other = _KeywordEmbedder("m", 1).identity.to_dict() | {"fingerprint": "other-weights"}
    write(other)
    with pytest.raises(ConfigError, match="another space"):
        routing.reload()
    assert "another space" in routing.info()["error"]
    assert asyncio.run(routing.aroute("my cat sneezes", None)).served_model == "continual-cats@v2"
