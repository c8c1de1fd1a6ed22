"""An engine for training where serving happens elsewhere: no vLLM in this process.

The pipeline trains adapters in a Prefect task while a vLLM *server* (one or many replicas) serves them. Starting
an in-process vLLM engine there would cost half a minute and a second copy of the weights for nothing, so
`ContinualLLM(config, engine=DetachedEngine.for_config(config))` learns, checkpoints and versions adapters exactly
as usual, and publishing only records the version. Inference calls raise `ServingUnavailableError`: evaluate the
adapters through the server that serves them (`cl_core.pipeline.evaluation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cl_core.engine.vllm_engine import AdapterHandle, EngineBase, EngineSettings
from cl_core.errors import ServingUnavailableError


class DetachedEngine(EngineBase):
    """Adapter bookkeeping and the context check of an engine, without one."""

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(settings)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
        self.published: list[AdapterHandle] = []

    @classmethod
    def for_config(cls, config: Any) -> DetachedEngine:
        """The detached engine that fits a `ContinualConfig` (same checks as the engine it would start)."""
        from cl_core.models import resolve_model

        return cls(EngineSettings.from_config(config, resolve_model(config.model)))

    def publish(self, handle: AdapterHandle) -> None:
        """Record the version; the adapter directory is what a server loads later."""
        with self._lock:
            self.published.append(handle)

    def retire(self, handle: AdapterHandle) -> None:
        """Nothing is loaded here, so nothing is freed."""

    def loaded_lora_ids(self) -> set[int]:
        return set()

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: dict[str, Any], adapter: Any) -> list[Any]:
        raise self._unavailable("generate")

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]], adapter: Any) -> list[list[float]]:
        raise self._unavailable("score")

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        raise self._unavailable("embed")

    def shutdown(self) -> None:
        """No processes to stop."""

    @staticmethod
    def _unavailable(what: str) -> ServingUnavailableError:
        return ServingUnavailableError(
            f"{what}() needs a serving engine, and this model trains detached (DetachedEngine: the adapters are "
            "served by a vLLM server). Ask the server (cl_core.serving), or create the ContinualLLM "
            "without engine= to start an in-process vLLM engine; with priority_function='uncertainty', use "
            "'loss' instead (uncertainty scores each experience through the engine).")
