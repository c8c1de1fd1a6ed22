"""Prompt embeddings in the frozen base model's space: what the `embedding` and `learned` routers compare.

Why its own small module: the same embedding must be computed in the library (`ContinualLLM.generate`), in the
pipeline's evaluation and in the gateway, and a router's state only means something in the space it was fitted
in. So there is exactly one definition here (mean-pooled hidden states of one layer of the base model, adapters
never applied, L2-normalised), and `BaseEmbedder.identity` (model fingerprint, layer, pooling) is saved with the
router state; routing with an embedder of another identity is refused instead of silently misrouting.

It runs the base model with Hugging Face transformers in the calling process (float32 on CPU by default), only up
to the pooled layer: no second vLLM engine, and deterministic (the same prompt gets the same vector in every
process). Its cost per prompt is measured in `tests/benchmarks/bench_routing.py`.

The default layer is the middle one: the last layer of a causal LM is specialised for predicting the next token,
while middle layers carry more of the prompt's meaning (a known result for decoder-only sentence embeddings).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cl_core.errors import ConfigError, InvalidInputError
from cl_core.models import model_fingerprint, resolve_model


class _StopForward(Exception):
    """Raised by the layer hook once the wanted hidden states are captured."""


@dataclass(frozen=True)
class EmbedderIdentity:
    """What makes two embedders produce comparable vectors (saved with router state)."""

    fingerprint: str
    layer: int
    pooling: str = "mean"
    dim: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "layer": self.layer, "pooling": self.pooling, "dim": self.dim}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbedderIdentity:
        return cls(str(data["fingerprint"]), int(data["layer"]), str(data.get("pooling", "mean")),
                   int(data.get("dim", 0)))


class BaseEmbedder:
    """`embed(texts) -> float32 array [n, d]`, rows L2-normalised, from the frozen base model.

    `model`: a model directory or the name `resolve_model` knows (the default model). `layer`: the hidden-state
    layer to pool (None = the middle layer; 0 is the token embeddings, `num_hidden_layers` the last). Texts are
    embedded as the user's message of the chat template when the tokenizer has one, so the vectors describe the
    prompt the model answers, not a bare string. Thread-safe: one forward at a time.
    """

    def __init__(self, model: str, *, layer: int | None = None, max_length: int = 256, batch_size: int = 32,
                 device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path = resolve_model(model)
        if not isinstance(max_length, int) or max_length < 8:
            raise ConfigError(f"max_length must be an integer ≥ 8, got {max_length!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if self.tokenizer.pad_token is None:  # padding is masked out of the mean, any token will do
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).to(device).eval()
        layers = int(self.model.config.num_hidden_layers)
        self.layer = layers // 2 if layer is None else layer
        if not isinstance(self.layer, int) or not 0 <= self.layer <= layers:
            raise ConfigError(f"embedding layer {layer!r} does not exist: the model has layers 0..{layers}")
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = device
        self._lock = threading.Lock()
        self.identity = EmbedderIdentity(model_fingerprint(self.model_path), self.layer, "mean",
                                         int(self.model.config.hidden_size))

    @property
    def dim(self) -> int:
        return self.identity.dim

    def _text(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=False)
        return prompt

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One L2-normalised float32 row per text (an empty list gives an array of shape [0, dim])."""
        import torch

        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise InvalidInputError(f"embed() takes a list of str, got {type(texts).__name__}")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise InvalidInputError(f"texts[{i}] must be a non-empty string, got {text!r}")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with self._lock, torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                chunk = [self._text(t) for t in texts[start:start + self.batch_size]]
                enc = self.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.max_length, add_special_tokens=False)
                enc = {k: v.to(self.device) for k, v in enc.items()}
                hidden = self._hidden(enc)
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
                out[start:start + len(chunk)] = pooled.cpu().numpy()
        return out

    def _hidden(self, enc: dict[str, Any]) -> Any:
        """Hidden states after layer `self.layer`, without running the layers above it (half the cost at the
        default middle layer; the values are exactly `hidden_states[layer]` of a full forward)."""
        layers = getattr(getattr(self.model, "model", None), "layers", None)
        if layers is None or not 0 < self.layer < len(layers):
            return self.model(**enc, output_hidden_states=True).hidden_states[self.layer]
        captured: list[Any] = []

        def grab(_module: Any, _inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        handle = layers[self.layer - 1].register_forward_hook(grab)
        try:
            self.model.model(**enc)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0]

    def check_identity(self, saved: dict[str, Any] | EmbedderIdentity | None) -> None:
        """Refuse router state fitted in another embedding space (other base weights, layer or pooling)."""
        if saved is None:
            return
        other = saved if isinstance(saved, EmbedderIdentity) else EmbedderIdentity.from_dict(saved)
        mine = self.identity
        if (other.fingerprint, other.layer, other.pooling) != (mine.fingerprint, mine.layer, mine.pooling):
            raise ConfigError(f"the router was fitted on embeddings of another space ({other.to_dict()}) than this "
                              f"embedder's ({mine.to_dict()}); route with the same base model and layer, or refit "
                              "the router")




_SHARED: dict[tuple[str, int | None], BaseEmbedder] = {}
_SHARED_LOCK = threading.Lock()


def shared_embedder(model: str, layer: int | None = None) -> BaseEmbedder:
    """One embedder per (base model, layer) per process: the bank's router, the `neighbourhood` method and the
    gateway all embed with the same weights, and the base model is loaded once."""
    key = (resolve_model(model), layer)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = BaseEmbedder(model, layer=layer)
        return _SHARED[key]


__all__ = ["BaseEmbedder", "EmbedderIdentity", "shared_embedder"]
