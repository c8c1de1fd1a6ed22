"""The in-process vLLM engine: generation, scoring and embedding, and live publishing of adapter versions.

This is the only module of cl_core that imports vllm. It serves one frozen base model and any number of adapter
versions. Adapters are identified by `AdapterHandle`; callers say which one each request uses, so several learners
may share one engine (tests do: one engine per session).

- `lora` mode: each version is its own vLLM LoRA (new name, new integer id). Publishing preloads it, so the first
  request pays no load; retiring removes it. New names per version avoid vLLM's same-name reload pitfalls
  (stale prefix cache, sticky in-place flag).
- `merged` mode: the requested adapter is folded into the base weights in place (see `worker_ext`), then the
  prefix cache is reset, because cached KV blocks were computed with the old weights.

Engine calls are serialized by a lock: a publish waits for the running batch and never interrupts it; training
runs outside the engine, so serving continues while the learner works.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cl_core.errors import InvalidInputError, PublishError

log = logging.getLogger(__name__)

SAMPLING_KEYS = frozenset({
    "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "n", "logprobs",
    "skip_special_tokens", "include_stop_str_in_output",
})
WORKER_EXTENSION = "cl_core.engine.worker_ext.MergedAdapterExtension"


@dataclass(frozen=True)
class AdapterHandle:
    """One servable adapter version: a PEFT directory, a unique name (`adapter@v3`) and a unique integer id."""

    name: str
    lora_id: int
    path: str
    version: int


class Generation(str):
    """Generated text (a `str`) that also tells which adapter version produced it.

    `adapter_name` is the served name (`facts@v3`); with a bank, `adapter` is the bank adapter that answered
    (`base` when the router sent the request to the bare base model) and `route_score` the router's confidence.
    """

    adapter_version: int | None
    adapter_name: str | None
    finish_reason: str | None
    token_ids: tuple[int, ...]
    adapter: str | None = None
    route_score: float | None = None
    route_reason: str = ""

    def __new__(cls, text: str, adapter: AdapterHandle | None, finish_reason: str | None,
                token_ids: Sequence[int]) -> Generation:
        obj = super().__new__(cls, text)
        obj.adapter_version = adapter.version if adapter else None
        obj.adapter_name = adapter.name if adapter else None
        obj.finish_reason = finish_reason
        obj.token_ids = tuple(token_ids)
        return obj


@dataclass(frozen=True)
class EngineSettings:
    """What the engine is started with; fixed for its lifetime."""

    model_path: str
    serving_mode: str = "lora"
    dtype: str = "auto"
    max_model_len: int = 2048
    max_lora_rank: int = 16
    seed: int = 0
    kv_cache_gib: float = 1.0
    enforce_eager: bool = True
    max_loras: int = 1
    """LoRAs in one batch: a learner serves one version at a time, and each extra slot costs every LoRA forward
    pass (measured on vLLM-CPU, default model, 1 token: 283 ms with 4 slots, 202 ms with 1)."""

    @classmethod
    def from_config(cls, config: Any, model_path: str) -> EngineSettings:
        """The engine a `ContinualConfig` needs (whether started in-process or stood in for by `DetachedEngine`)."""
        return cls(model_path=model_path, serving_mode=config.serving_mode, dtype=config.dtype,
                   max_model_len=config.max_model_len, max_lora_rank=config.adapter_rank, seed=config.seed,
                   kv_cache_gib=config.kv_cache_gib, enforce_eager=config.enforce_eager,
                   max_loras=config.num_adapters)


class EngineBase:
    """What every engine shares: settings, the adapter names and ids it handed out, and the context check."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._names: set[str] = set()
        self._namespaces: set[str] = set()

    # --- adapters -------------------------------------------------------------------------------------------
    @property
    def serving_mode(self) -> str:
        return self.settings.serving_mode

    def new_handle(self, namespace: str, version: int, path: str) -> AdapterHandle:
        """A handle with an engine-unique name and id for a new adapter version."""
        with self._lock:
            name = f"{namespace}@v{version}"
            if name in self._names:
                raise PublishError(f"adapter name {name} is already in use on this engine")
            self._names.add(name)
            return AdapterHandle(name=name, lora_id=next(self._ids), path=path, version=version)

    def claim_namespace(self, wanted: str) -> str:
        """An adapter namespace no other learner on this engine uses (`adapter`, `adapter-2`, ...)."""
        with self._lock:
            taken = {name.split("@", 1)[0] for name in self._names} | self._namespaces
            candidate, n = wanted, 1
            while candidate in taken:
                n += 1
                candidate = f"{wanted}-{n}"
            self._namespaces.add(candidate)
            return candidate

    def check_prompt_ids(self, prompt_ids: Sequence[int], new_tokens: int = 1) -> None:
        limit = self.settings.max_model_len
        if len(prompt_ids) + new_tokens > limit:
            raise InvalidInputError(
                f"prompt is {len(prompt_ids)} tokens and {new_tokens} new tokens were asked for, over the "
                f"context of {limit} tokens (max_model_len): shorten the prompt, lower max_tokens, or start "
                "with a larger max_model_len")


class VLLMEngine(EngineBase):
    """A vLLM `LLM` plus the adapter bookkeeping that live publishing needs."""

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(settings)
        _use_all_cores_on_small_cpu_machines()
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=settings.model_path, dtype=settings.dtype, max_model_len=settings.max_model_len,
            seed=settings.seed, kv_cache_memory_bytes=int(settings.kv_cache_gib * 2**30),
            enforce_eager=settings.enforce_eager, worker_extension_cls=WORKER_EXTENSION,
        )
        if settings.serving_mode == "lora":
            kwargs.update(enable_lora=True, max_lora_rank=_vllm_lora_rank(settings.max_lora_rank),
                          max_loras=settings.max_loras, max_cpu_loras=max(8, settings.max_loras * 2))
        log.info("starting vLLM engine on %s (%s mode)", settings.model_path, settings.serving_mode)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._merged: AdapterHandle | None = None
        self._embedder: Any = None

    def publish(self, handle: AdapterHandle) -> None:
        """Make `handle` ready to serve: preload its LoRA (lora mode) or merge it into the weights (merged)."""
        with self._lock:
            try:
                if self.serving_mode == "lora":
                    self.llm.llm_engine.add_lora(self._lora_request(handle))
                else:
                    self._merge(handle)
            except Exception as exc:  # vLLM raises many types for a bad adapter
                raise PublishError(f"vLLM refused adapter {handle.name} from {handle.path}: {exc}") from exc

    def retire(self, handle: AdapterHandle) -> None:
        """Free an adapter version that no request will use again (lora mode); a no-op for merged weights."""
        with self._lock:
            if self.serving_mode == "lora":
                self.llm.llm_engine.remove_lora(handle.lora_id)

    def loaded_lora_ids(self) -> set[int]:
        return set(self.llm.llm_engine.list_loras()) if self.serving_mode == "lora" else set()

    def _lora_request(self, handle: AdapterHandle) -> Any:
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=handle.name, lora_int_id=handle.lora_id, lora_path=handle.path)

    def _merge(self, handle: AdapterHandle | None) -> None:
        if handle == self._merged:
            return
        self.llm.collective_rpc("cl_merge_adapter",
                                args=(handle.path if handle else None, self.settings.model_path))
        self.llm.reset_prefix_cache()
        self._merged = handle

    def _route(self, adapter: AdapterHandle | Sequence[AdapterHandle | None] | None) -> Any:
        """The LoRA request for `adapter` (lora mode), or make the merged weights match it (merged mode).

        A sequence gives one adapter per prompt (a bank's mixed batch): vLLM batches different LoRAs, and the bare
        base, in one step. Merged weights hold one adapter at a time, so there a mixed batch is refused."""
        if isinstance(adapter, (list, tuple)):
            if self.serving_mode == "lora":
                return [self._lora_request(a) if a else None for a in adapter]
            if len(set(adapter)) > 1:
                raise InvalidInputError("merged mode folds one adapter into the weights at a time, so one batch "
                                        "cannot mix adapters; serve the bank in lora mode")
            adapter = adapter[0] if adapter else None
        if self.serving_mode == "lora":
            return self._lora_request(adapter) if adapter else None
        self._merge(adapter)
        return None

    # --- requests -------------------------------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: dict[str, Any],
                 adapter: AdapterHandle | Sequence[AdapterHandle | None] | None) -> list[Generation]:
        """Generate for each tokenized prompt with the given adapter version (or one per prompt)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        unknown = set(sampling) - SAMPLING_KEYS
        if unknown:
            raise InvalidInputError(f"unknown sampling parameter(s) {sorted(unknown)}; known: "
                                    f"{sorted(SAMPLING_KEYS)}")
        params = dict(sampling)
        params.setdefault("max_tokens", 128)
        params.setdefault("temperature", 0.0)
        try:
            sampling_params = SamplingParams(**params)
        except Exception as exc:  # vLLM's VLLMValidationError is not a ValueError; construction is pure validation
            raise InvalidInputError(f"invalid sampling parameters {params}: {exc}") from exc
        for ids in prompt_ids:
            self.check_prompt_ids(ids, int(sampling_params.max_tokens or 1))
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        with self._lock:
            outputs = self.llm.generate(prompts, sampling_params, use_tqdm=False,
                                        lora_request=self._route(adapter))
        adapters = adapter if isinstance(adapter, (list, tuple)) else [adapter] * len(outputs)
        return [Generation(out.outputs[0].text, a, out.outputs[0].finish_reason, out.outputs[0].token_ids)
                for out, a in zip(outputs, adapters, strict=True)]

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]],
                        adapter: AdapterHandle | Sequence[AdapterHandle | None] | None) -> list[list[float]]:
        """Log-probability of every token given the ones before it (position 0 has none: NaN)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        for ids in sequences:
            self.check_prompt_ids(ids)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in sequences]
        with self._lock:
            outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._route(adapter))
        result = []
        for ids, out in zip(sequences, outputs, strict=True):
            row = [math.nan]
            for token, entry in zip(ids[1:], out.prompt_logprobs[1:], strict=True):
                row.append(float(entry[token].logprob))
            result.append(row)
        return result

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One normalized vector per text from the frozen base model, via a vLLM pooling engine.

        The embedder deliberately ignores adapters: embeddings stay comparable across adapter versions, which is
        what routing by similarity and de-duplication of stored experiences need. It is started on first use.
        """
        with self._lock:
            if self._embedder is None:
                from vllm import LLM

                log.info("starting vLLM embedding engine on %s", self.settings.model_path)
                self._embedder = LLM(model=self.settings.model_path, runner="pooling", convert="embed",
                                     dtype=self.settings.dtype, max_model_len=self.settings.max_model_len,
                                     kv_cache_memory_bytes=int(min(0.25, self.settings.kv_cache_gib) * 2**30),
                                     enforce_eager=True, seed=self.settings.seed)
            for text in texts:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                self.check_prompt_ids(ids, new_tokens=0)
            outputs = self._embedder.embed(list(texts), use_tqdm=False)
        return [list(map(float, out.outputs.embedding)) for out in outputs]

    def shutdown(self) -> None:
        """Stop the engine processes (also happens at interpreter exit)."""
        with self._lock:
            for llm in (self._embedder, self.llm):
                engine = getattr(llm, "llm_engine", None)
                core = getattr(engine, "engine_core", None)
                if core is not None and hasattr(core, "shutdown"):
                    core.shutdown()
            self._embedder = None


def _use_all_cores_on_small_cpu_machines() -> None:
    """vLLM-CPU reserves one core for its scheduler; on a 2-core machine that halves compute (measured: merged
    serving 305 -> 447 tok/s with none reserved). Applies only without CUDA, ≤ 4 cores, and no user setting."""
    import torch

    if torch.cuda.is_available() or "VLLM_CPU_NUM_OF_RESERVED_CPU" in os.environ:
        return
    if len(os.sched_getaffinity(0)) <= 4:
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"


def _vllm_lora_rank(rank: int) -> int:
    """vLLM accepts only some `max_lora_rank` values; take the smallest that fits."""
    for allowed in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    return rank
