"""`neighbourhood`: rehearse what surrounds each new example with the model's own answers from before the edit.

A correction such as "the capital of Zorbania is Velmora" trained alone moves the adapter in a direction that
also answers "What is the capital of France?" with Velmora (measured: locality 0.08 after 16 corrections). The
knowledge-editing fix is to hold the edit's neighbourhood in place while it trains: at `begin_task` this method
picks, for each of the task's examples (a correction is one example), the `neighbourhood_size` nearest prompts by
embedding similarity in the frozen base model's space (`cl_core.bank.embedder.BaseEmbedder`), lets the learner
answer them greedily (the champion: the adapter as it is before this task), and `transform_batch` adds those
(prompt, own answer) pairs to every batch that trains the example. The edit then has to find a direction that
changes its own answer and leaves the neighbours' answers as they were (rehearsal with the champion's outputs is
hard-label self-distillation on the neighbourhood).

Candidates are the packaged pool (`neighbourhood_pool.json`: real-world questions of many forms, made by
`cl_core.research.edits.build_neighbour_pool`, or a JSON file given as `neighbourhood_pool`) plus the prompts this
model learned in earlier tasks (up to `neighbourhood_memory`, most recent kept), so earlier edits are held too.
The packaged pool's real subjects are disjoint from those of the corrections benchmark
(`tests/benchmarks/bench_corrections.py`): it never rehearses a question the benchmark scores, and two of the
benchmark's relations have no question of their form in it.

Cost per task: one embedding pass over new candidates (the pool once per process), one greedy generation per
chosen neighbour, and up to `neighbourhood_size` more examples in each batch (the batch grows; `replay_slots` is
0). Combine with replay (`["replay", "neighbourhood"]`), which rehearses stored experiences with their own
responses.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl_core.errors import ConfigError, InvalidInputError
from cl_core.learner.peft_learner import Example
from cl_core.methods.base import AntiForgettingMethod, LearnerView, TaskContext, register_method
from cl_core.prompting import EncodedPair, encode_prompt, format_prompt, read_prompt_list

log = logging.getLogger(__name__)
BUILTIN_POOL = "builtin"
POOL_FILE = Path(__file__).with_name("neighbourhood_pool.json")
_MARKER = "@@cl_core-neighbourhood-prompt@@"


@register_method("neighbourhood")
class NeighbourhoodRehearsal(AntiForgettingMethod):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        for name in ("neighbourhood_size", "neighbourhood_answer_tokens"):
            value = getattr(s, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} is invalid: must be a positive integer")
        if not isinstance(s.neighbourhood_memory, int) or isinstance(s.neighbourhood_memory, bool) or \
                s.neighbourhood_memory < 0:
            raise ConfigError(f"neighbourhood_memory={s.neighbourhood_memory!r} is invalid: must be an integer ≥ 0")
        if s.neighbourhood_anchor not in ("first", "current"):
            raise ConfigError(f"neighbourhood_anchor={s.neighbourhood_anchor!r} is invalid: 'first' or 'current'")
        if not isinstance(s.neighbourhood_weight, (int, float)) or isinstance(s.neighbourhood_weight, bool) or \
                not 0 < s.neighbourhood_weight < float("inf"):
            raise ConfigError(f"neighbourhood_weight={s.neighbourhood_weight!r} is invalid: a positive number")
        if not isinstance(s.neighbourhood_recall, int) or isinstance(s.neighbourhood_recall, bool) or \
                s.neighbourhood_recall < 0:
            raise ConfigError(f"neighbourhood_recall={s.neighbourhood_recall!r} is invalid: an integer ≥ 0")
        self.pool = load_pool(s.neighbourhood_pool)
        self.learned: list[str] = []  # prompts of earlier tasks, oldest first
        self.pairs: list[tuple[str, EncodedPair]] = []  # this task's neighbours: (prompt, own answer)
        self._neighbours_of: dict[tuple[int, ...], list[int]] = {}  # example ids -> indices into pairs
        self.recall: list[int] = []  # indices into pairs rehearsed with every batch of the task (earlier tasks')
        self.anchors: dict[str, list[int]] = {}  # prompt -> its first rehearsed answer (token ids)
        self._rng = random.Random(s.seed)
        self.rehearsed = 0
        self.embedder: Any = None  # `embed(texts) -> [n, d]` L2-normalised; the base model's, made on first use
        self._tokenizer: Any = None
        self._model_path: str | None = None
        self._vectors: dict[str, np.ndarray] = {}

    # --- hooks ------------------------------------------------------------------------------------------------
    def begin_task(self, task: TaskContext, learner: LearnerView) -> None:
        self.pairs, self._neighbours_of, self.recall = [], {}, []
        if not task.examples:
            return
        tokenizer = self._get_tokenizer(learner)
        texts = [prompt_text(tokenizer, ex.pair.prompt_ids) for ex in task.examples]
        own = set(texts)
        for text in own:  # about to be taught: an old answer of it must not be rehearsed against the new one
            self.anchors.pop(text, None)
        candidates = [p for p in dict.fromkeys(self.pool + self.learned) if p not in own]
        if not candidates:
            return
        chosen = self.nearest(texts, candidates, self.settings.neighbourhood_size)
        order = list(dict.fromkeys(candidates[i] for row in chosen for i in row))  # each neighbour once
        earlier = [p for p in self.anchors if p not in own and p not in set(order)]
        recalled = self._rng.sample(earlier, min(self.settings.neighbourhood_recall, len(earlier)))
        prompts = order + recalled
        answers = self._answers(learner, tokenizer, prompts)
        self.pairs = [(p, EncodedPair(encode_prompt(tokenizer, p), answers[p])) for p in prompts]
        slot = {p: n for n, p in enumerate(prompts)}
        self.recall = [slot[p] for p in recalled]
        for example, row in zip(task.examples, chosen, strict=True):
            self._neighbours_of.setdefault(_key(example), []).extend(slot[candidates[i]] for i in row)

    def _answers(self, learner: LearnerView, tokenizer: Any, prompts: list[str]) -> dict[str, list[int]]:
        """The rehearsed answer of each prompt: generated now by the adapter as it is, or (anchor `first`) the
        answer it gave the first time the prompt was rehearsed."""
        keep = self.settings.neighbourhood_anchor == "first"
        new = [p for p in prompts if not (keep and p in self.anchors)]
        generated = _generate(learner, [encode_prompt(tokenizer, p) for p in new],
                              self.settings.neighbourhood_answer_tokens, tokenizer.eos_token_id) if new else []
        fresh = {p: list(a) for p, a in zip(new, generated, strict=True)}
        for p, answer in fresh.items():
            if keep or p not in self.anchors:
                self.anchors[p] = answer
        return {p: fresh[p] if p in fresh else self.anchors[p] for p in prompts}

    def transform_batch(self, batch: list[Example], exclude_ids: Sequence[int]) -> list[Example]:
        picked = self.neighbours_for(batch)
        if any(_key(ex) in self._neighbours_of for ex in batch):
            picked += [i for i in self.recall if i not in picked]
        self.rehearsed += len(picked)
        weight = float(self.settings.neighbourhood_weight)
        return batch + [Example(self.pairs[i][1], weight) for i in picked]

    def end_task(self, task: TaskContext, learner: LearnerView) -> None:
        if task.examples:
            tokenizer = self._get_tokenizer(learner)
            for text in (prompt_text(tokenizer, ex.pair.prompt_ids) for ex in task.examples):
                if text in self.learned:
                    self.learned.remove(text)
                self.learned.append(text)
            limit = self.settings.neighbourhood_memory
            self.learned = self.learned[-limit:] if limit else []
        self.pairs, self._neighbours_of, self.recall = [], {}, []
        return None

    # --- selection --------------------------------------------------------------------------------------------
    def nearest(self, queries: Sequence[str], candidates: Sequence[str], k: int) -> list[list[int]]:
        """For each query, the indices of its `k` most similar candidates (cosine of base-model embeddings),
        most similar first; ties go to the earlier candidate."""
        q = self._embed(list(queries))
        c = self._embed(list(candidates))
        sims = q @ c.T
        k = min(k, len(candidates))
        return [np.argsort(-row, kind="stable")[:k].tolist() for row in sims]

    def neighbours_for(self, batch: Sequence[Example]) -> list[int]:
        """Indices into `pairs` to rehearse with this batch: the examples' neighbours taken in turn (each
        example's nearest first), without repeats, at most `neighbourhood_size`."""
        lists = [self._neighbours_of.get(_key(ex), []) for ex in batch]
        picked: dict[int, None] = {}
        for rank in range(max((len(x) for x in lists), default=0)):
            for row in lists:
                if rank < len(row) and len(picked) < self.settings.neighbourhood_size:
                    picked.setdefault(row[rank], None)
        return list(picked)

    def _embed(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if missing:
            vectors = np.asarray(self._get_embedder().embed(missing), dtype=np.float32)
            if vectors.shape[0] != len(missing):
                raise InvalidInputError(f"the embedder returned {vectors.shape[0]} vectors for {len(missing)} texts")
            self._vectors.update(zip(missing, vectors, strict=True))
        return np.stack([self._vectors[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)

    def _get_embedder(self) -> Any:
        if self.embedder is None:
            if self._model_path is None:
                raise InvalidInputError("neighbourhood: no embedder yet; begin_task with a learner creates it")
            try:
                from cl_core.bank.embedder import shared_embedder
            except ImportError as exc:
                raise ConfigError("anti_forgetting 'neighbourhood' picks neighbours by base-model embeddings and "
                                  f"needs cl_core.bank.embedder.BaseEmbedder, which cannot be imported ({exc}); "
                                  "install a cl_core that ships cl_core.bank.embedder, or drop 'neighbourhood'") \
                    from exc
            self.embedder = shared_embedder(self._model_path)
        return self.embedder

    def _get_tokenizer(self, learner: LearnerView) -> Any:
        model_path = getattr(getattr(learner, "settings", None), "model_path", None)
        if model_path is None:
            raise InvalidInputError("neighbourhood needs the learner's base model (learner.settings.model_path) to "
                                    "encode and embed neighbour prompts; pass the LoRALearner to begin_task")
        if self._tokenizer is None or self._model_path != model_path:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(model_path)
            self._model_path = model_path
        return self._tokenizer

    # --- state ------------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        pairs = [{"prompt": p, "prompt_ids": e.prompt_ids, "response_ids": e.response_ids} for p, e in self.pairs]
        links = [[list(k), v] for k, v in self._neighbours_of.items()]
        rng = self._rng.getstate()
        return {}, {"pool": self.settings.neighbourhood_pool, "pool_size": len(self.pool), "learned": self.learned,
                    "pairs": pairs, "links": links, "recall": self.recall, "anchors": self.anchors,
                    "rehearsed": self.rehearsed, "rng": [rng[0], list(rng[1]), rng[2]]}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta["pool"] != self.settings.neighbourhood_pool:
            raise InvalidInputError(f"neighbourhood state was saved with pool {meta['pool']!r}, this model uses "
                                    f"{self.settings.neighbourhood_pool!r}; set neighbourhood_pool="
                                    f"{meta['pool']!r} to load it")
        self.learned = [str(p) for p in meta["learned"]]
        self.pairs = [(p["prompt"], EncodedPair([int(i) for i in p["prompt_ids"]],
                                                [int(i) for i in p["response_ids"]])) for p in meta["pairs"]]
        self._neighbours_of = {tuple(int(i) for i in k): [int(i) for i in v] for k, v in meta["links"]}
        self.recall = [int(i) for i in meta["recall"]]
        self.anchors = {str(p): [int(i) for i in ids] for p, ids in meta["anchors"].items()}
        self.rehearsed = int(meta["rehearsed"])
        version, internal, gauss = meta["rng"]
        self._rng.setstate((version, tuple(internal), gauss))


def load_pool(pool: str) -> list[str]:
    """The candidate questions: the packaged pool (`"builtin"`) or a JSON file with a list of questions (or an
    object whose `questions` is one)."""
    if not isinstance(pool, str) or not pool.strip():
        raise ConfigError(f"neighbourhood_pool={pool!r} is invalid: give 'builtin' or the path of a JSON file")
    path = POOL_FILE if pool == BUILTIN_POOL else Path(pool).expanduser()
    return read_prompt_list(path, f"neighbourhood_pool={pool!r}", "'builtin' or a JSON file")


def prompt_text(tokenizer: Any, prompt_ids: Sequence[int]) -> str:
    """The user prompt inside encoded chat-formatted ids (the inverse of `encode_prompt`)."""
    prefix, _, suffix = format_prompt(tokenizer, _MARKER).partition(_MARKER)
    text = tokenizer.decode(list(prompt_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if text.startswith(prefix) and text.endswith(suffix):
        return text[len(prefix):len(text) - len(suffix)]
    return tokenizer.decode(list(prompt_ids), skip_special_tokens=True).strip()


def _generate(learner: LearnerView, prompt_ids: list[list[int]], max_new_tokens: int,
              eos_token_id: int | None) -> list[list[int]]:
    generate = getattr(learner, "generate_greedy", None)
    if generate is None:
        raise InvalidInputError("neighbourhood needs a learner with generate_greedy (cl_core's LoRALearner) to "
                                "answer the neighbour prompts")
    return generate(prompt_ids, max_new_tokens, eos_token_id)


def _key(example: Example) -> tuple[int, ...]:
    return tuple(example.pair.input_ids)


__all__ = ["BUILTIN_POOL", "POOL_FILE", "NeighbourhoodRehearsal", "load_pool", "prompt_text"]
