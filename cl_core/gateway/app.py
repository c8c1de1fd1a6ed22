"""The OpenAI-compatible gateway: one HTTP front for the vLLM replicas that routes `continual` through the bank.

`create_app(settings)` builds a FastAPI app with the endpoints the official `openai` client uses
(`GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, streaming included) plus `GET /health`,
`GET /v1/bank` and `POST /admin/reload`. A request for the stable name (`continual`) is routed: its prompt (the
last user message, or the completion prompt) and optional task id (body field `task` or header `x-cl-task`) go
to the bank's router (`routing.BankRouting`), and the request is forwarded with `model` replaced by the chosen
adapter's versioned name (or the base). So clients never pay vLLM's sticky in-place reload of a stable adapter
name. Any other model name passes straight through.

What it does by hand and why, all else is FastAPI, httpx and vLLM's own answers:
- forwarding with one pooled `httpx.AsyncClient` (kept-alive connections; no per-request disk reads);
  streams are passed through chunk by chunk as the replica sends them (`aiter_raw`), never buffered;
- every response says who answered: headers `x-cl-adapter` (name or `base`), `x-cl-adapter-version`,
  `x-cl-served-model`, `x-cl-route-score`, `x-cl-router`; non-streaming JSON bodies also get a `cl` object
  (clients that do not know it ignore it, the `openai` client included);
- a replica that answers 404 for a bank adapter's versioned name (restarted, or the name was evicted) gets the
  adapter loaded once from the manifest's path, and the request is retried there;
- malformed requests get an OpenAI-shaped 4xx (`{"error": {"message", "type", "param", "code"}}`) naming the
  problem; no replica reachable is a 503 saying which and why; the replicas' own 4xx pass through unchanged.

Capture hook: after each completed response the app calls `sink.record(Interaction(...))` (default `NoopSink`,
and then the streamed text is not even assembled). A sink must not block: enqueue and return.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cl_core.errors import ContinualError
from cl_core.gateway.routing import KIND_ADAPTER, KIND_OTHER, BankRouting, Decision
from cl_core.gateway.settings import GatewaySettings
from cl_core.serving.client import AdapterRefused, ServerUnavailable, ServingError, VLLMServer

log = logging.getLogger(__name__)

TASK_HEADER = "x-cl-task"
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
_JSON = "application/json"
_PASSED_RESPONSE_HEADERS = ("x-request-id",)
_REPLICA_DOWN_S = 2.0


# --- the capture hook ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interaction:
    """One completed request/response, as the capture sink receives it."""

    endpoint: str
    """`chat.completions` or `completions`."""
    prompt: str
    """What the router saw: the last user message, or the completion prompt."""
    response: str
    """The first choice's text (assembled from the chunks for a stream)."""
    served_model: str
    adapter: str
    """The adapter's name, `base`, or the served name when the bank does not know it (`Decision.label`)."""
    version: int | None
    route_score: float | None
    task: str | None
    latency_s: float
    response_id: str | None
    stream: bool
    request: dict[str, Any] = field(default_factory=dict)
    """The request body as forwarded (messages, sampling settings), for capture of whole conversations."""
    created_at: float = field(default_factory=time.time)


@runtime_checkable
class InteractionSink(Protocol):
    """Receives every completed interaction; must return quickly (spool to a queue, flush elsewhere)."""

    def record(self, interaction: Interaction) -> None: ...


class NoopSink:
    """The default sink: captures nothing."""

    def record(self, interaction: Interaction) -> None:
        return None


# --- errors -----------------------------------------------------------------------------------------------------
class GatewayError(ContinualError):
    """An error the gateway answers itself, OpenAI-shaped."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", param, code)


# --- replicas -----------------------------------------------------------------------------------------------------
class ReplicaPool:
    """The replicas and which to try first: fewest requests in flight (ties in turn) or plain round robin.

    A replica that refused a connection is tried last for a short while, so a dead replica costs one failed
    connect per couple of seconds, not one per request.
    """

    def __init__(self, urls: tuple[str, ...], policy: str) -> None:
        self.urls = urls
        self.policy = policy
        self.inflight = [0] * len(urls)
        self.down_until = [0.0] * len(urls)
        self._next = 0

    def order(self) -> list[int]:
        n = len(self.urls)
        start, self._next = self._next, (self._next + 1) % n
        ranked = [(start + i) % n for i in range(n)]
        now = time.monotonic()
        if self.policy == "least_busy":
            ranked.sort(key=lambda i: (self.down_until[i] > now, self.inflight[i]))
        else:
            ranked.sort(key=lambda i: self.down_until[i] > now)
        return ranked

    def mark_down(self, index: int) -> None:
        self.down_until[index] = time.monotonic() + _REPLICA_DOWN_S

    def mark_up(self, index: int) -> None:
        self.down_until[index] = 0.0


# --- request parsing --------------------------------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise GatewayError(413, f"the request body is {int(declared)} bytes, more than the gateway's limit of "
                                f"{limit} bytes (CL_GATEWAY_MAX_BODY_BYTES)", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, f"the request body exceeds the gateway's limit of {limit} bytes "
                                    "(CL_GATEWAY_MAX_BODY_BYTES)", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise _bad("the request body is empty: send a JSON object (e.g. {\"model\": \"continual\", \"messages\": "
                   "[{\"role\": \"user\", \"content\": \"Hi\"}]})")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got a JSON {type(body).__name__}")
    return body


def content_text(content: Any) -> str:
    """The text of a chat message's content: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content
                         if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    return ""


def check_request(endpoint: str, body: dict[str, Any], header_task: str | None) -> tuple[str, str | None]:
    """Validate what the gateway itself needs; returns (prompt text for the router, task id)."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _bad("you must provide a model parameter (a model name string, e.g. \"continual\")"
                   if model is None else f"model must be a non-empty string, got {model!r}", param="model")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _bad(f"stream must be true or false, got {stream!r}", param="stream")
    task = body.pop("task", None)
    if task is None:
        task = header_task
    if task is not None and (not isinstance(task, str) or not task.strip()):
        raise _bad(f"task must be a non-empty string (the task id routing picks an adapter by), got {task!r}",
                   param="task")
    if endpoint == CHAT_PATH:
        messages = body.get("messages")
        if messages is None:
            raise _bad("you must provide a messages parameter (a list of {\"role\", \"content\"} objects)",
                       param="messages")
        if not isinstance(messages, list) or not messages:
            raise _bad(f"messages must be a non-empty list of message objects, got {str(messages)[:80]!r}",
                       param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise _bad(f"messages[{i}] must be an object with a string 'role', got {str(message)[:80]!r}",
                           param=f"messages[{i}]")
        prompt = next((content_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    else:
        if "prompt" not in body or body["prompt"] is None:
            raise _bad("you must provide a prompt parameter (a string or a list of strings)", param="prompt")
        raw = body["prompt"]
        if isinstance(raw, str):
            prompt = raw
        elif isinstance(raw, list) and raw:
            prompt = raw[0] if isinstance(raw[0], str) else ""  # token-id prompts carry no text to route by
        else:
            raise _bad(f"prompt must be a string or a non-empty list, got {str(raw)[:80]!r}", param="prompt")
    return prompt, task


def response_text(endpoint: str, data: Any) -> tuple[str, str | None]:
    """(first choice's text, response id) of a non-streaming answer."""
    if not isinstance(data, dict):
        return "", None
    choices = data.get("choices") or [{}]
    first = choices[0] if isinstance(choices[0], dict) else {}
    text = ((first.get("message") or {}).get("content") if endpoint == CHAT_PATH else first.get("text")) or ""
    return str(text), data.get("id")


def with_cl(content: bytes, decision: Decision) -> bytes:
    """The JSON object `content` with the `cl` member appended, spliced in as bytes (no parse and re-dump of the
    whole answer); anything that is not a JSON object is returned unchanged."""
    body = content.rstrip()
    if not body.startswith(b"{") or not body.endswith(b"}"):
        return content
    inner = body[:-1].rstrip()
    member = b'"cl":' + json.dumps(decision.to_dict(), separators=(",", ":")).encode()
    return inner + (member if inner == b"{" else b"," + member) + b"}"


class StreamCollector:
    """Assembles the first choice's text and the response id from SSE chunks (only when a sink listens)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.parts: list[str] = []
        self.response_id: str | None = None
        self.done = False
        """The stream's `data: [DONE]` went by: the answer is whole even if the client hangs up right after."""
        self._buffer = b""

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                continue
            if not payload:
                continue
            try:
                event = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            self.response_id = self.response_id or event.get("id")
            for choice in event.get("choices") or []:
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                piece = (choice.get("delta") or {}).get("content") if self.endpoint == CHAT_PATH else choice.get("text")
                if isinstance(piece, str):
                    self.parts.append(piece)

    @property
    def text(self) -> str:
        return "".join(self.parts)


class _UpstreamStream(StreamingResponse):
    """A streaming response that always closes its upstream stream, also when the client goes away."""

    def __init__(self, body: AsyncIterator[bytes], close: Callable[[], Awaitable[None]], headers: dict[str, str],
                 media_type: str) -> None:
        super().__init__(body, status_code=200, headers=headers, media_type=media_type)
        self._close = close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._close()


# --- the gateway ------------------------------------------------------------------------------------------------
class Gateway:
    """State of one app: settings, routing, the pooled upstream client, the replicas, the sink."""

    def __init__(self, settings: GatewaySettings, routing: BankRouting | None = None,
                 sink: InteractionSink | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.routing = routing or BankRouting(settings)
        self.sink: InteractionSink = sink or NoopSink()
        self.capture = not isinstance(self.sink, NoopSink)
        self.pool = ReplicaPool(settings.upstreams, settings.balance)
        self._transport = transport
        self.client: httpx.AsyncClient | None = None
        self._servers: dict[int, VLLMServer] = {}
        self._load_locks: dict[tuple[int, str], asyncio.Lock] = {}
        self._watcher: asyncio.Task | None = None
        self._models_at = 0.0

    # --- lifecycle --------------------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(s.request_timeout_s, connect=s.connect_timeout_s),
            limits=httpx.Limits(max_connections=s.max_connections, max_keepalive_connections=s.max_connections),
            transport=self._transport)
        # a bad manifest is logged and reported by /health and /v1/bank; the gateway serves without the bank
        with contextlib.suppress(ContinualError):
            await asyncio.to_thread(self.routing.reload, True)
        await self.refresh_models()
        self._watcher = asyncio.create_task(self._watch(), name="cl-gateway-watch")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self.client is not None:
            await self.client.aclose()
        for server in self._servers.values():
            server.close()

    async def _watch(self) -> None:
        """Reload the manifest when its file changes; refresh the replicas' model lists now and then."""
        s = self.settings
        while True:
            await asyncio.sleep(s.reload_interval_s)
            try:
                if self.routing.changed():
                    with contextlib.suppress(ContinualError):
                        await asyncio.to_thread(self.routing.reload)
                if time.monotonic() - self._models_at >= s.models_refresh_s:
                    await self.refresh_models()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher must survive anything a reload throws
                log.exception("gateway watcher iteration failed")

    async def refresh_models(self) -> None:
        """What the replicas serve (union over the reachable ones), for the no-manifest stable-name rule."""
        self._models_at = time.monotonic()
        names: set[str] = set()
        reached = False
        for index in range(len(self.pool.urls)):
            try:
                data = await self._get_json(index, "/v1/models", timeout=min(5.0, self.settings.request_timeout_s))
            except GatewayError:
                continue
            reached = True
            names.update(card.get("id") for card in data.get("data", []) if isinstance(card, dict))
        if reached:
            self.routing.set_upstream_models(n for n in names if isinstance(n, str))

    # --- upstream calls ---------------------------------------------------------------------------------------
    async def _get_json(self, index: int, path: str, timeout: float) -> Any:
        assert self.client is not None
        url = self.pool.urls[index] + path
        try:
            response = await self.client.get(url, timeout=timeout)
        except httpx.TransportError as exc:
            raise GatewayError(503, f"vLLM replica {self.pool.urls[index]} is unreachable: "
                                    f"{type(exc).__name__}: {exc}", "service_unavailable") from None
        if response.status_code != 200:
            raise GatewayError(502, f"vLLM replica {self.pool.urls[index]} answered GET {path} with HTTP "
                                    f"{response.status_code}", "upstream_error")
        return response.json()

    async def _open(self, path: str, payload: bytes, headers: dict[str, str], replica: int | None
                    ) -> tuple[int, httpx.Response]:
        """Send to the best replica (or `replica`), moving on when one cannot be connected to."""
        assert self.client is not None
        order = [replica] if replica is not None else self.pool.order()
        failures = []
        for index in order:
            request = self.client.build_request("POST", self.pool.urls[index] + path, content=payload,
                                                headers=headers)
            self.pool.inflight[index] += 1
            try:
                response = await self.client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                self.pool.inflight[index] -= 1
                self.pool.mark_down(index)
                failures.append(f"{self.pool.urls[index]}: {type(exc).__name__}: {exc or 'no answer'}")
                continue
            except httpx.TimeoutException as exc:
                self.pool.inflight[index] -= 1
                raise GatewayError(504, f"vLLM replica {self.pool.urls[index]} did not answer within "
                                        f"{self.settings.request_timeout_s:g} s ({type(exc).__name__}); raise "
                                        "CL_GATEWAY_REQUEST_TIMEOUT for long generations", "timeout_error") from None
            except httpx.TransportError as exc:
                self.pool.inflight[index] -= 1
                raise GatewayError(502, f"vLLM replica {self.pool.urls[index]} broke the connection: "
                                        f"{type(exc).__name__}: {exc}", "upstream_error") from None
            self.pool.mark_up(index)
            return index, response
        raise GatewayError(503, "no vLLM replica is reachable (" + "; ".join(failures) + "). Check that the "
                           "servers run (GET <url>/health) and that CL_VLLM_URLS / --upstream name them",
                           "service_unavailable", code="upstream_unavailable")

    def _server(self, index: int) -> VLLMServer:
        if index not in self._servers:
            self._servers[index] = VLLMServer(self.pool.urls[index], timeout=self.settings.request_timeout_s)
        return self._servers[index]

    async def _load_adapter(self, index: int, decision: Decision) -> None:
        """Load a bank adapter version a replica does not serve (once, even under concurrent 404s)."""
        key = (index, decision.served_model)
        lock = self._load_locks.setdefault(key, asyncio.Lock())
        async with lock:
            models = await asyncio.to_thread(self._server_models, index)
            if decision.served_model in models:
                return  # another request loaded it while this one waited
            log.info("replica %s does not serve %s: loading it from %s", self.pool.urls[index],
                     decision.served_model, decision.adapter_path)
            try:
                await asyncio.to_thread(self._server(index).load_adapter, decision.served_model,
                                        str(decision.adapter_path))
            except AdapterRefused as exc:
                if "already been loaded" not in exc.message:
                    raise GatewayError(502, f"the bank's adapter {decision.served_model} is not served by "
                                            f"{self.pool.urls[index]} and loading it failed: {exc}",
                                       "upstream_error", code="adapter_load_failed") from None
            except ServerUnavailable as exc:
                raise GatewayError(503, str(exc), "service_unavailable", code="upstream_unavailable") from None

    def _server_models(self, index: int) -> dict[str, str]:
        try:
            return self._server(index).models()
        except ServingError:
            return {}

    # --- the completions endpoints ----------------------------------------------------------------------------
    async def complete(self, request: Request, path: str) -> Response:
        started = time.perf_counter()
        body = parse_json_object(await read_body(request, self.settings.max_body_bytes))
        prompt, task = check_request(path, body, request.headers.get(TASK_HEADER))
        model = body["model"]
        if model == self.settings.stable_name:
            decision = await self.routing.aroute(prompt, task)
            body["model"] = decision.served_model
        else:
            decision = self.routing.describe(model)
        stream = bool(body.get("stream"))
        payload = json.dumps(body, separators=(",", ":")).encode()
        headers = {"content-type": _JSON, "accept": "text/event-stream" if stream else _JSON}
        if request_id := request.headers.get("x-request-id"):
            headers["x-request-id"] = request_id

        index, response = await self._open(path, payload, headers, None)
        if response.status_code == 404:
            if decision.kind == KIND_ADAPTER and decision.adapter_path:
                await self._release(index, response)
                await self._load_adapter(index, decision)
                index, response = await self._open(path, payload, headers, index)
            elif decision.routed and decision.kind == KIND_OTHER:  # the replicas' stable name is gone: the base
                await self._release(index, response)
                decision = decision.as_base(self.settings.base_name, f"the replicas no longer serve "
                                            f"'{decision.served_model}': base model")
                body["model"] = decision.served_model
                payload = json.dumps(body, separators=(",", ":")).encode()
                self._models_at = 0.0  # refresh the model lists at the next watcher tick
                index, response = await self._open(path, payload, headers, None)
        out_headers = decision.headers()
        for name in _PASSED_RESPONSE_HEADERS:
            if name in response.headers:
                out_headers[name] = response.headers[name]
        if stream and response.status_code == 200:
            return self._stream(index, response, decision, out_headers, path, prompt, task, body, started)
        try:
            content = await response.aread()
        except httpx.TransportError as exc:
            raise GatewayError(502, f"vLLM replica {self.pool.urls[index]} broke the connection while "
                                    f"answering: {type(exc).__name__}: {exc}", "upstream_error") from None
        finally:
            await self._release(index, response)
        media_type = response.headers.get("content-type", _JSON)
        if response.status_code == 200 and media_type.startswith(_JSON):
            content = with_cl(content, decision)
            if self.capture:
                with contextlib.suppress(ValueError):
                    text, response_id = response_text(path, json.loads(content))
                    self._record(path, prompt, text, decision, task, started, response_id, False, body)
        return Response(content, status_code=response.status_code, media_type=media_type, headers=out_headers)

    def _stream(self, index: int, response: httpx.Response, decision: Decision, headers: dict[str, str],
                path: str, prompt: str, task: str | None, body: dict[str, Any], started: float) -> Response:
        collector = StreamCollector(path) if self.capture else None
        closed = recorded = False

        def finish() -> None:
            nonlocal recorded
            if collector is not None and not recorded:
                recorded = True
                self._record(path, prompt, collector.text, decision, task, started, collector.response_id, True,
                             body)

        async def close() -> None:
            # Also reached when the client hangs up: a stream whose [DONE] was already relayed is still whole
            # (clients close right after reading it), anything cut earlier is not captured.
            nonlocal closed
            if not closed:
                closed = True
                await self._release(index, response)
                if collector is not None and collector.done:
                    finish()

        async def chunks() -> AsyncIterator[bytes]:
            complete = False
            try:
                async for chunk in response.aiter_raw():
                    if collector is not None:
                        collector.feed(chunk)
                    yield chunk
                complete = True
            except httpx.TransportError as exc:  # the status line is sent: report in the stream, as vLLM does
                error = {"error": {"message": f"vLLM replica {self.pool.urls[index]} broke the stream: "
                                              f"{type(exc).__name__}: {exc}", "type": "upstream_error",
                                   "param": None, "code": None}}
                yield f"data: {json.dumps(error)}\n\n".encode()
            finally:
                await close()
            if complete:
                finish()

        media_type = response.headers.get("content-type", "text/event-stream")
        return _UpstreamStream(chunks(), close, headers, media_type)

    async def _release(self, index: int, response: httpx.Response) -> None:
        self.pool.inflight[index] -= 1
        with contextlib.suppress(Exception):
            await response.aclose()

    def _record(self, path: str, prompt: str, text: str, decision: Decision, task: str | None, started: float,
                response_id: str | None, stream: bool, body: dict[str, Any]) -> None:
        try:
            self.sink.record(Interaction(
                endpoint="chat.completions" if path == CHAT_PATH else "completions", prompt=prompt, response=text,
                served_model=decision.served_model, adapter=decision.label, version=decision.version,
                route_score=decision.score, task=task, latency_s=time.perf_counter() - started,
                response_id=response_id, stream=stream, request=body))
        except Exception:  # capture must never break serving
            log.exception("the interaction sink failed; the response was served")

    # --- the other endpoints ----------------------------------------------------------------------------------
    async def models(self) -> JSONResponse:
        last: GatewayError | None = None
        for index in self.pool.order():
            try:
                data = await self._get_json(index, "/v1/models", timeout=min(10.0, self.settings.request_timeout_s))
                break
            except GatewayError as exc:
                last = exc
        else:
            raise GatewayError(503, f"no vLLM replica answered the model list: {last.message if last else ''}",
                               "service_unavailable", code="upstream_unavailable")
        cards = [c for c in data.get("data", []) if isinstance(c, dict)]
        self.routing.set_upstream_models(c.get("id") for c in cards if isinstance(c.get("id"), str))
        stable = self.settings.stable_name
        state = self.routing.state
        ours = {"id": stable, "object": "model", "created": int(state.loaded_at or time.time()),
                "owned_by": "cl-gateway", "root": None, "parent": self.settings.base_name,
                "permission": [], "max_model_len": next((c.get("max_model_len") for c in cards
                                                         if c.get("id") == self.settings.base_name), None)}
        return JSONResponse({"object": "list", "data": [ours, *(c for c in cards if c.get("id") != stable)]})

    async def health(self) -> JSONResponse:
        assert self.client is not None

        async def probe(url: str) -> str:
            try:
                response = await self.client.get(f"{url}/health", timeout=min(5.0, self.settings.request_timeout_s))
            except httpx.HTTPError as exc:
                return f"unreachable: {type(exc).__name__}"
            return "ok" if response.status_code == 200 else f"HTTP {response.status_code}"

        states = await asyncio.gather(*(probe(url) for url in self.pool.urls))
        upstreams = dict(zip(self.pool.urls, states, strict=True))
        up = sum(state == "ok" for state in states)
        status = "ok" if up == len(states) and self.routing.error is None else ("degraded" if up else "unavailable")
        info = self.routing.info()
        body = {"status": status, "upstreams": upstreams,
                "bank": {"manifest": info["manifest_path"] if info["manifest"] else None, "router": info["router"],
                         "error": info["error"]}}
        return JSONResponse(body, status_code=200 if up else 503)

    async def reload(self) -> JSONResponse:
        try:
            await asyncio.to_thread(self.routing.reload, True)
        except ContinualError as exc:
            raise GatewayError(422, f"the bank manifest was not reloaded, the previous one keeps serving: {exc}",
                               "manifest_error", code="manifest_invalid") from None
        await self.refresh_models()
        return JSONResponse({**self.routing.info(), "reloaded": True})


def create_app(settings: GatewaySettings | None = None, *, sink: InteractionSink | None = None,
               routing: BankRouting | None = None, transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """The gateway app. `sink` receives completed interactions; `routing` and `transport` are for embedding the
    gateway elsewhere (a prepared router, an in-process upstream)."""
    settings = settings or GatewaySettings.from_env()
    gateway = Gateway(settings, routing=routing, sink=sink, transport=transport)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="cl_core gateway", description="OpenAI-compatible front of the vLLM replicas that routes "
                  f"'{settings.stable_name}' through the adapter bank", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.gateway = gateway

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = (f"no route {request.method} {request.url.path} on the gateway; it serves GET /v1/models, POST "
                   f"{CHAT_PATH}, POST {COMPLETIONS_PATH}, GET /v1/bank, GET /health, POST /admin/reload"
                   if exc.status_code in (404, 405) else str(exc.detail))
        return error_response(exc.status_code, message, "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, f"invalid request: {exc.errors()}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("gateway bug answering %s %s", request.method, request.url.path)
        return error_response(500, f"internal gateway error ({type(exc).__name__}: {exc}); the gateway log has the "
                                   f"traceback (request {uuid.uuid4().hex[:8]})", "server_error")

    # The two hot routes are plain Starlette routes: FastAPI's request parsing and dependency machinery would
    # only add latency to endpoints that read the raw body themselves.
    async def chat_completions(request: Request) -> Response:
        return await gateway.complete(request, CHAT_PATH)

    async def completions(request: Request) -> Response:
        return await gateway.complete(request, COMPLETIONS_PATH)

    app.add_route(CHAT_PATH, chat_completions, methods=["POST"])
    app.add_route(COMPLETIONS_PATH, completions, methods=["POST"])

    @app.get("/v1/models")
    async def models() -> Response:
        return await gateway.models()

    @app.get("/v1/bank")
    async def bank() -> Response:
        return JSONResponse(gateway.routing.info())

    @app.get("/health")
    async def health() -> Response:
        return await gateway.health()

    @app.post("/admin/reload")
    async def reload() -> Response:
        return await gateway.reload()

    return app


__all__ = ["Gateway", "GatewayError", "Interaction", "InteractionSink", "NoopSink", "ReplicaPool", "create_app"]
