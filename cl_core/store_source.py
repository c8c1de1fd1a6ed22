"""`StoreExampleSource`: what replay needs from the model: stored experiences as training examples and vectors.

Replay strategies keep only experience ids; this turns ids back into encoded examples (the same encoding the
learner and vLLM use) and computes the embeddings (herding) or gradient sketches (gradient diversity) on demand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from cl_core.learner import Example, LoRALearner
from cl_core.prompting import encode_pair
from cl_core.store import ExperienceStore


class StoreExampleSource:
    def __init__(self, store: ExperienceStore, tokenizer: Any, max_model_len: int,
                 learner: Callable[[], LoRALearner]) -> None:
        self._store, self._tokenizer, self._max_len, self._learner = store, tokenizer, max_model_len, learner

    def examples(self, ids: Sequence[int]) -> list[tuple[int, Example]]:
        """(id, example) for each id still in the store and short enough to train on, in the given order."""
        out = []
        for exp_id in ids:
            exp = self._store.get(int(exp_id))
            if exp is None:
                continue
            pair = encode_pair(self._tokenizer, exp.prompt, exp.response)
            if len(pair.input_ids) <= self._max_len:
                out.append((int(exp_id), Example(pair, 1.0 if exp.reward is None else float(exp.reward))))
        return out

    def _found(self, ids: Sequence[int]) -> list[Example]:
        found = dict(self.examples(ids))
        missing = [i for i in ids if int(i) not in found]
        if missing:
            raise KeyError(f"experiences {missing[:5]} are not in the store (evicted?)")
        return [found[int(i)] for i in ids]

    def embeddings(self, ids: Sequence[int]) -> torch.Tensor:
        examples = self._found(ids)
        learner = self._learner()
        return torch.cat([learner.embeddings(examples[i:i + 16]) for i in range(0, len(examples), 16)]) \
            if examples else torch.zeros((0, 0))

    def gradients(self, ids: Sequence[int]) -> torch.Tensor:
        return self._learner().gradient_sketches(self._found(ids))
