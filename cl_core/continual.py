"""`ContinualLLM`: a vLLM-served model that keeps learning from experiences and corrections.

Inference (generate, score, embed) goes to vLLM. Learning trains a LoRA adapter with the PEFT learner on the same
base weights, on a background worker thread, and publishes each new version into the running engine; the engine
keeps serving the previous version until the switch, and no restart ever happens.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, overload

from cl_core.bank.bank import DEFAULT_ADAPTER, AdapterBank
from cl_core.bank.calibration import load_calibration_prompts
from cl_core.bank.lineage import AdapterLineage
from cl_core.bank.manifest import BankManifest
from cl_core.bank.router import Route, load_router, make_router, save_router
from cl_core.config import ContinualConfig
from cl_core.engine import AdapterHandle, EngineBase, EngineSettings, Generation, VLLMEngine
from cl_core.errors import CheckpointError, ConfigError, InvalidInputError, NothingToLearnError
from cl_core.learner import Example, LearnerSettings, LoRALearner
from cl_core.methods import MethodSet, MethodSettings
from cl_core.models import model_fingerprint, resolve_model
from cl_core.prompting import check_text, encode_pair, encode_prompt
from cl_core.reports import AdapterVersion, CorrectionReport, LearnReport, RetentionReport, ScoreResult
from cl_core.store import Experience, ExperienceStore
from cl_core.store_source import StoreExampleSource

log = logging.getLogger(__name__)
T = TypeVar("T")
CHECKPOINT_FORMAT = 1


class ContinualLLM:
    """A frozen base model served by vLLM plus a LoRA adapter that keeps learning.

    >>> model = ContinualLLM(ContinualConfig(lora_rank=16))
    >>> model.learn_from_correction(prompt="...", bad_response="...", good_response="...")
    """

    def __init__(self, config: ContinualConfig | None = None, *, engine: EngineBase | None = None,
                 **overrides: Any) -> None:
        config = config or ContinualConfig()
        if not isinstance(config, ContinualConfig):
            raise ConfigError(f"config must be a ContinualConfig, got {type(config).__name__}")
        self.config = config.replace(**overrides) if overrides else config
        self.model_path = resolve_model(self.config.model)
        # No work_dir means a throwaway session: a temporary directory, removed by close().
        self._temporary_work_dir = self.config.work_dir is None
        self.work_dir = Path(self.config.work_dir or tempfile.mkdtemp(prefix="cl_core-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "adapters").mkdir(exist_ok=True)
        store_path = self.config.store_path or self.work_dir / "experiences.sqlite"
        self.store = ExperienceStore(store_path, self.config.buffer_size, self.config.priority_function)
        self._owns_engine = engine is None
        self.engine = engine if engine is not None else VLLMEngine(self._engine_settings())
        self._check_engine(self.engine)
        self.tokenizer = self.engine.tokenizer
        self._learner: LoRALearner | None = None
        self._fresh_lora: dict[str, Any] | None = None
        self._checked_out: str | None = None
        self._calibration_vectors: Any = None
        self.on_progress: Callable[[dict[str, Any]], None] | None = None
        """Called after every training step with {adapter, task, step, steps, loss, elapsed_s, eta_s} (the
        pipeline shows it in the console and as a Prefect progress artifact); exceptions in it are logged."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cl-learn")
        self._online_job: Future[Any] | None = None
        self._example_source = StoreExampleSource(self.store, self.tokenizer, self.config.max_model_len,
                                                  self._get_learner)
        router = make_router(self.config.adapter_routing) if self.config.num_adapters > 1 else None
        self.bank = AdapterBank(engine=self.engine, adapters_dir=self.work_dir / "adapters",
                                capacity=self.config.num_adapters, router=router, make_methods=self._make_methods,
                                embed=self._embed_prompts, out_of_scope=self._out_of_scope_vectors)
        """The adapters and the router (`num_adapters > 1`), or the one adapter of a single-adapter model."""

    def _make_methods(self) -> MethodSet:
        return MethodSet(self.config.anti_forgetting_methods, MethodSettings.from_config(self.config),
                         source=self._example_source)

    # --- the single-adapter view (a model with num_adapters=1 is a bank of one lineage) -----------------------
    @property
    def _default(self) -> AdapterLineage:
        if self.bank.is_bank:
            raise InvalidInputError("this model holds a bank of adapters; name one (model.bank.get(name)) instead "
                                    "of asking for 'the' adapter")
        return self.bank.lineages[DEFAULT_ADAPTER]

    @property
    def _current(self) -> AdapterHandle | None:
        return None if self.bank.is_bank else self._default.current

    @property
    def methods(self) -> MethodSet:
        """The anti-forgetting methods of the model's adapter (with a bank: `model.bank.get(name).methods`)."""
        return self._default.methods

    @property
    def versions(self) -> list[AdapterVersion]:
        """Every published version (of every adapter of the bank), oldest first."""
        return sorted((v for lineage in self.bank.lineages.values() for v in lineage.versions),
                      key=lambda v: (v.created_at, v.adapter, v.version))

    @property
    def _next_version(self) -> int:
        return self._default.next_version

    # --- set-up ---------------------------------------------------------------------------------------------
    def _engine_settings(self) -> EngineSettings:
        return EngineSettings.from_config(self.config, self.model_path)

    def _check_engine(self, engine: EngineBase) -> None:
        s = engine.settings
        problems = []
        if s.model_path != self.model_path:
            problems.append(f"it serves {s.model_path}, the config asks for {self.model_path}")
        if s.serving_mode != self.config.serving_mode:
            problems.append(f"it runs in {s.serving_mode} mode, the config asks for {self.config.serving_mode}")
        if s.serving_mode == "lora" and s.max_lora_rank < self.config.adapter_rank:
            problems.append(f"its max LoRA rank is {s.max_lora_rank} < the adapter's rank {self.config.adapter_rank}"
                            " (lora_rank x per-task blocks)")
        if s.max_model_len < self.config.max_model_len:
            problems.append(f"its max_model_len is {s.max_model_len} < {self.config.max_model_len}")
        if problems:
            raise ConfigError("the given engine does not fit this config: " + "; ".join(problems))

    def _get_learner(self) -> LoRALearner:
        # Created on first use: serving-only users never pay for the float32 training copy.
        if self._learner is None:
            c = self.config
            self._learner = LoRALearner(LearnerSettings(
                # Per-task block methods grow the rank by `rank_blocks` and alpha with it: each block keeps the
                # scale alpha/r of an ordinary adapter.
                model_path=self.model_path, lora_rank=c.adapter_rank,
                lora_alpha=c.effective_lora_alpha * c.rank_blocks,
                lora_dropout=c.lora_dropout, target_modules=c.target_modules, learning_rate=c.learning_rate,
                max_grad_norm=c.max_grad_norm, seed=c.seed, device=c.device, precision=c.train_precision))
        return self._learner

    # --- embeddings for routing -------------------------------------------------------------------------------
    def _embed_prompts(self, prompts: Sequence[str]) -> Any:
        from cl_core.bank.embedder import shared_embedder

        embedder = shared_embedder(self.model_path)
        router = self.bank.router
        if router is not None and hasattr(router, "set_embedder_identity") and \
                getattr(router, "embedder_identity", None) is None:
            router.set_embedder_identity(embedder.identity)  # saved with its state: routes only in this space
        return embedder.embed(list(prompts))

    def _out_of_scope_vectors(self) -> Any:
        """Embeddings of prompts that belong to no adapter (`router_calibration`): they set the router's "none
        fits" threshold, so unrelated requests reach the base model."""
        if self._calibration_vectors is None:
            prompts = load_calibration_prompts(self.config.router_calibration)
            self._calibration_vectors = self._embed_prompts(prompts) if prompts else None
        return self._calibration_vectors

    def route(self, prompts: str | Sequence[str], task: str | Sequence[str | None] | None = None) -> list[Route]:
        """Where each prompt would go: the bank adapter (or None: the base model), the router's score and why."""
        items = _as_text_list(prompts, "prompts")
        return [route for _, route in self.bank.route(items, _tasks(task, len(items)))]

    # --- inference ------------------------------------------------------------------------------------------
    @overload
    def generate(self, prompts: str, *, task: str | None = None, **sampling: Any) -> Generation: ...
    @overload
    def generate(self, prompts: Sequence[str], *, task: str | Sequence[str | None] | None = None,
                 **sampling: Any) -> list[Generation]: ...

    def generate(self, prompts: str | Sequence[str], *, task: str | Sequence[str | None] | None = None,
                 **sampling: Any) -> Generation | list[Generation]:
        """Answer one prompt (str in, str out) or many (list in, list out) with the adapter each one is routed to.

        Sampling parameters are vLLM's (`max_tokens`, `min_tokens`, `temperature`, `top_p`, `top_k`, `stop`,
        `seed`, ...); the default is greedy with up to 128 new tokens. `task` names each prompt's task (the
        `task_id` router's input). Each result is a `str` that also carries `adapter` (the bank adapter, or
        `base`), `adapter_version`, `adapter_name` (its served name), `route_score`, `finish_reason` and
        `token_ids`. With a bank one vLLM batch mixes adapters, and the base, per request.
        """
        single = isinstance(prompts, str)
        items = _as_text_list(prompts, "prompts")
        ids = [encode_prompt(self.tokenizer, text) for text in items]
        routed = self.bank.route(items, _tasks(task, len(items)))
        handles = [handle for handle, _ in routed]
        results = self.engine.generate(ids, sampling, handles if self.bank.is_bank else handles[0])
        for result, (_, route) in zip(results, routed, strict=True):
            result.adapter = route.adapter or "base"
            result.route_score = None if math.isnan(route.score) else float(route.score)
            result.route_reason = route.reason
        return results[0] if single else results

    def score(self, prompt: str, response: str) -> ScoreResult:
        """Sum and mean log-probability of `response` given `prompt` under the served version (vLLM prompt
        logprobs), e.g. to check a reference answer without depending on greedy decoding."""
        pair = encode_pair(self.tokenizer, check_text("prompt", prompt), check_text("response", response),
                           add_eos=False)
        handle = self.bank.route([prompt])[0][0]
        logprobs = self.engine.prompt_logprobs([pair.input_ids], handle)[0]
        tokens = logprobs[len(pair.prompt_ids):]
        total = float(sum(tokens))
        return ScoreResult(total, total / max(1, len(tokens)), len(tokens), tokens,
                           handle.version if handle else None)

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Sum log-probability of each (prompt, response) under the served version, in one batched vLLM call
        (what multiple-choice scoring needs: one pair per option)."""
        if not isinstance(pairs, (list, tuple)):
            raise InvalidInputError(f"pairs must be a list of (prompt, response), got {type(pairs).__name__}")
        encoded = []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise InvalidInputError(f"pairs[{i}] must be a (prompt, response) pair, got {pair!r}")
            encoded.append(encode_pair(self.tokenizer, check_text(f"pairs[{i}][0]", pair[0]),
                                       check_text(f"pairs[{i}][1]", pair[1]), add_eos=False))
        if not encoded:
            return []
        handles = [handle for handle, _ in self.bank.route([str(p[0]) for p in pairs])]
        logprobs = self.engine.prompt_logprobs([e.input_ids for e in encoded],
                                               handles if self.bank.is_bank else handles[0])
        return [float(sum(row[len(e.prompt_ids):])) for e, row in zip(encoded, logprobs, strict=True)]

    def evaluate_retention(self, test_sets: Sequence[Any]) -> RetentionReport:
        """Per-task scores (accuracy in [0, 1]) of the version being served, through vLLM: what is measured is
        what users get.

        Each test set is a task from `cl_core.streams` (scored its own way: exact match or choice by
        log-probability), or a dict `{"name": ..., "examples": [{"prompt": ..., "answer": ...}, ...]}` scored by
        exact match of the greedy answer.
        """
        from cl_core.streams import Task, TaskExample

        if isinstance(test_sets, (str, dict)) or not isinstance(test_sets, (list, tuple)) or not test_sets:
            raise InvalidInputError("test_sets must be a non-empty list of tasks (cl_core.streams.Task) or dicts "
                                    "{'name': ..., 'examples': [{'prompt': ..., 'answer': ...}]}")
        version = None if self.bank.is_bank else (self._current.version if self._current else None)
        start = time.perf_counter()
        scores: dict[str, float] = {}
        for i, test_set in enumerate(test_sets):
            if isinstance(test_set, dict):
                try:
                    examples = tuple(TaskExample(prompt=e["prompt"], answer=e["answer"])
                                     for e in test_set["examples"])
                    test_set = Task(name=test_set["name"], train=(), test=examples, scoring="exact_match",
                                    max_answer_tokens=int(test_set.get("max_answer_tokens", 16)),
                                    description="ad-hoc test set")
                except (KeyError, TypeError) as exc:
                    raise InvalidInputError(f"test_sets[{i}] is not a valid test set ({exc!r}); give "
                                            "{'name': ..., 'examples': [{'prompt': ..., 'answer': ...}]}") from exc
            if not hasattr(test_set, "score") or not getattr(test_set, "test", None):
                raise InvalidInputError(f"test_sets[{i}] has no test examples to score")
            if test_set.name in scores:
                raise InvalidInputError(f"two test sets are named {test_set.name!r}; names must be unique")
            scores[test_set.name] = float(test_set.score(self))
        return RetentionReport(scores=scores, version=version, seconds=time.perf_counter() - start)

    @overload
    def embed(self, texts: str) -> list[float]: ...
    @overload
    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...

    def embed(self, texts: str | Sequence[str]) -> list[float] | list[list[float]]:
        """One normalized embedding vector per text, from the frozen base model through a vLLM pooling engine."""
        single = isinstance(texts, str)
        vectors = self.engine.embed(_as_text_list(texts, "texts"))
        return vectors[0] if single else vectors

    # --- experiences ----------------------------------------------------------------------------------------
    def add_experience(self, prompt: str, response: str, reward: float | None = None, task: str = "default",
                       metadata: dict[str, Any] | None = None) -> int:
        """Store one interaction durably (returns its id). In `online` mode this may start a learning round."""
        check_text("prompt", prompt)
        check_text("response", response)
        token_logprobs = None
        if self.config.priority_function == "uncertainty":  # how unsure the served model is of this response
            token_logprobs = self.score(prompt, response).token_logprobs
        exp_id = self.store.add(prompt, response, reward=reward, task=task, metadata=metadata,
                                token_logprobs=token_logprobs)
        if self.config.learning_mode == "online" and self.store.count(pending_only=True) >= \
                self.config.update_frequency and (self._online_job is None or self._online_job.done()):
            try:
                self._online_job = self.learn(wait=False)
            except NothingToLearnError as exc:  # e.g. only reward ≤ 0 experiences so far: keep collecting
                log.info("online learning round not started: %s", exc)
        return exp_id

    # --- learning -------------------------------------------------------------------------------------------
    @property
    def current_version(self) -> AdapterVersion | None:
        """The version being served (None before the first publish: the bare base model). With a bank: the
        version published last, of whichever adapter (`model.bank.get(name).current_version` for one)."""
        if self.bank.is_bank:
            published = [v for v in (lin.current_version for lin in self.bank.lineages.values()) if v is not None]
            return max(published, key=lambda v: v.created_at) if published else None
        return self._default.current_version

    def learn(self, epochs: int = 1, max_steps: int | None = None, wait: bool = True) -> LearnReport | Future:
        """Train on the experiences stored since the last round (plus replay) and publish a new version.

        With a bank, each experience trains one adapter (its task tag when that names an adapter, else the
        router's choice, else a new adapter while `num_adapters` allows); only adapters that received data train
        and publish, the others stay bit-identical. Raises `NothingToLearnError` when nothing new can be trained
        on. With `wait=False` returns a Future. Experiences with reward ≤ 0 are kept for preference learning but
        not imitated; in `feedback` mode only rated experiences and corrections are trained on.
        """
        if not isinstance(epochs, int) or epochs < 1:
            raise InvalidInputError(f"epochs must be a positive integer, got {epochs!r}")
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise InvalidInputError(f"max_steps must be a positive integer or None, got {max_steps!r}")
        pending = self.store.pending()
        if self.config.learning_mode == "feedback":
            pending = [e for e in pending if e.reward is not None or e.kind == "correction"]
        chosen = [e for e in pending if e.reward is None or e.reward > 0]
        if not chosen:
            raise NothingToLearnError(
                "nothing new to learn from: no stored experience since the last learning round"
                + (" has a rating (feedback mode)" if self.config.learning_mode == "feedback" else "")
                + "; add some with add_experience(...) first")
        return self._submit(lambda: self._learn_round(chosen, epochs, max_steps or self.config.max_steps), wait)

    def learn_from_correction(self, prompt: str, bad_response: str, good_response: str, task: str = "default",
                              wait: bool = True) -> CorrectionReport | Future:
        """Learn right away that `good_response`, not `bad_response`, answers `prompt`, and publish the result.

        Trains until the learner's greedy decode reproduces the good response with `correction_margin` to spare
        (or `correction_max_steps`), replaying stored experiences alongside to protect what the model knew. The
        correction is stored as a preference pair (chosen=good, rejected=bad) and as a top-priority experience.
        With a bank it trains the one adapter it is assigned to (as in `learn`). Blocks until the new version is
        served, unless `wait=False` (then returns a Future).
        """
        check_text("prompt", prompt)
        check_text("bad_response", bad_response)
        check_text("good_response", good_response)
        check_text("task", task)
        self.bank.check_trainable(task)
        if bad_response.strip() == good_response.strip():
            raise InvalidInputError("bad_response and good_response are the same text: nothing to correct")
        pair = encode_pair(self.tokenizer, prompt, good_response)
        self.engine.check_prompt_ids(pair.input_ids, new_tokens=0)
        exp_id = self.store.add(prompt, good_response, reward=1.0, task=task, kind="correction")
        pref_id = self.store.add_preference(prompt, good_response, bad_response, task=task, experience_id=exp_id)
        return self._submit(lambda: self._correction_round(exp_id, pref_id, Example(pair), task, prompt), wait)

    def reinforce_correction(self, experience_id: int) -> CorrectionReport:
        """Train on an already stored correction until it is the greedy answer with `correction_margin` to spare.

        For corrections that arrived in a batch (e.g. from S3) and went through `learn()` with everything else:
        those the learner does not yet answer as corrected get this margin-driven round, without being stored
        a second time. Blocks until the new version is published.
        """
        exp = self.store.get(experience_id)
        if exp is None or exp.kind != "correction":
            raise InvalidInputError(f"experience {experience_id!r} is not a stored correction (kind "
                                    f"{getattr(exp, 'kind', 'missing')!r}); store corrections with "
                                    "learn_from_correction or store.add(kind='correction')")
        pair = encode_pair(self.tokenizer, exp.prompt, exp.response)
        pref_id = next((p.id for p in self.store.preferences() if p.experience_id == experience_id), None)
        return self._submit(lambda: self._correction_round(experience_id, pref_id, Example(pair), exp.task,
                                                           exp.prompt), wait=True)

    def correction_margin(self, prompt: str, response: str, adapter: str | None = None,
                          task: str | None = None) -> float:
        """The learner's smallest log-probability margin of `response`'s tokens over each runner-up token
        (≥ `correction_margin` means greedy decoding reproduces it, in the learner's precision). With a bank, of
        `adapter`, else the adapter `task` names, else the one `prompt` is routed to; `-inf` when none would take
        it yet (nothing has learned it)."""
        example = Example(encode_pair(self.tokenizer, prompt, response))

        def margin() -> float:
            if self.bank.is_bank:
                name = adapter or (task if task in self.bank.lineages else None) or \
                    self.bank.route([prompt])[0][1].adapter
                if name is None:
                    return -math.inf
                self._check_out(self.bank.get(name))
            return float(min(self._get_learner().token_margins(example)))

        return self._submit(margin, wait=True) if self.bank.is_bank else margin()

    def reactivate(self) -> None:
        """Serve this model's current versions again, e.g. after another model published into the same engine
        (in merged mode an engine serves whichever adapter was folded in last)."""
        for lineage in self.bank.lineages.values():
            if lineage.current is not None and lineage.status != "retired":
                self.engine.publish(lineage.current)

    # --- the bank's adapters ------------------------------------------------------------------------------
    def add_adapter(self, name: str) -> None:
        """Open a new, empty adapter in the bank (experiences tagged with task `name` will train it)."""
        self._submit(lambda: self.bank.add(name), wait=True)

    def set_adapter_status(self, name: str, status: str) -> None:
        """`frozen` (serves, never trains), `retired` (never routed to; versions kept), `active` (restores it).
        Touches only that adapter: the others keep their versions, weights and routes."""
        from cl_core.bank.manifest import ADAPTER_STATUSES

        if status not in ADAPTER_STATUSES:
            raise InvalidInputError(f"status {status!r} is not one of {', '.join(ADAPTER_STATUSES)}")
        self._submit(lambda: self.bank.set_status(name, status), wait=True)

    def bank_manifest(self, router_dir: str | None = None) -> BankManifest:
        """The servable state of the bank: every adapter's current version and the router (its state is saved
        by `save_checkpoint`, or by `save_router(model.bank.router, router_dir)`)."""
        return self.bank.manifest(self.config.model, router_dir)

    # --- learning rounds ------------------------------------------------------------------------------------
    def _submit(self, job: Callable[[], T], wait: bool) -> T | Future:
        future = self._executor.submit(job)
        return future.result() if wait else future

    def _check_out(self, lineage: AdapterLineage) -> LoRALearner:
        """Make the shared learner hold `lineage`'s weights and optimizer state (a no-op with one adapter)."""
        learner = self._get_learner()
        if not self.bank.is_bank or self._checked_out == lineage.name:
            return learner
        if self._fresh_lora is None:
            self._fresh_lora = learner.lora_state()
        if self._checked_out is not None and self._checked_out in self.bank.lineages:
            self.bank.lineages[self._checked_out].check_in(learner)
        lineage.check_out(learner, self._fresh_lora)
        self._checked_out = lineage.name
        return learner

    def _examples(self, experiences: Sequence[Experience]) -> list[tuple[Experience, Example]]:
        out = []
        for exp in experiences:
            pair = encode_pair(self.tokenizer, exp.prompt, exp.response)
            if len(pair.input_ids) > self.config.max_model_len:
                log.warning("skipping experience %d: %d tokens exceed max_model_len=%d", exp.id,
                            len(pair.input_ids), self.config.max_model_len)
                continue
            weight = 1.0 if exp.reward is None else float(exp.reward)
            out.append((exp, Example(pair, weight)))
        return out

    def _learn_round(self, chosen: Sequence[Experience], epochs: int, max_steps: int) -> LearnReport:
        start = time.perf_counter()
        items = self._examples(chosen)
        if not items:
            raise NothingToLearnError("every new experience is longer than max_model_len; nothing to learn")
        assigned = self.bank.assign([exp.prompt for exp, _ in items], [exp.task for exp, _ in items])
        by_adapter: dict[str, list[tuple[Experience, Example]]] = {}
        held = 0
        for name, item in zip(assigned, items, strict=True):
            if name is None:
                held += 1
            else:
                by_adapter.setdefault(name, []).append(item)
        if not by_adapter:
            raise NothingToLearnError(f"all {held} new experiences are tagged for frozen or retired adapters, "
                                      "which never train; restore the adapter (set_adapter_status) to learn them")
        steps = skipped = replayed = 0
        losses_before: list[float] = []
        losses_after: dict[int, float] = {}
        published: dict[str, AdapterVersion] = {}
        messages = [f"{held} experiences tagged for frozen or retired adapters were left untrained"] if held else []
        tasks: list[str] = []
        for name, adapter_items in by_adapter.items():
            lineage = self.bank.get(name)
            self._check_out(lineage)
            losses_before.extend(self._losses([ex for _, ex in adapter_items]))
            by_task: dict[str, list[tuple[Experience, Example]]] = {}
            for exp, example in adapter_items:  # task groups in the order their first experience arrived
                by_task.setdefault(exp.task, []).append((exp, example))
            adapter_steps = adapter_skipped = 0
            adapter_losses: dict[int, float] = {}
            for task, group in by_task.items():
                outcome = self._train_task(lineage, task, group, epochs, max_steps)
                adapter_steps, adapter_skipped = adapter_steps + outcome[0], adapter_skipped + outcome[1]
                replayed += outcome[2]
                adapter_losses |= outcome[3]
            steps, skipped = steps + adapter_steps, skipped + adapter_skipped
            losses_after |= adapter_losses
            tasks.extend(t for t in by_task if t not in tasks)
            version, message = self._publish_if_healthy(lineage, adapter_steps, adapter_skipped,
                                                        reason=f"learn: {len(adapter_items)} experiences")
            if message:
                messages.append(f"{name}: {message}" if self.bank.is_bank else message)
            if version is not None:
                published[name] = version
                ids = [exp.id for exp, _ in adapter_items]
                self.store.mark_learned(ids, [_finite_or_none(adapter_losses[i]) for i in ids])
                self.bank.observe(name, [exp.prompt for exp, _ in adapter_items])
        if published and self.bank.is_bank:
            self.bank.refit()
        last = max(published.values(), key=lambda v: v.created_at) if published else None
        return LearnReport(steps=steps, skipped_steps=skipped, num_new=len(items), num_replayed=replayed,
                           loss_before=_mean(losses_before), loss_after=_mean(list(losses_after.values())),
                           version=last, seconds=time.perf_counter() - start, message="; ".join(messages),
                           tasks=tuple(tasks), adapters=published)

    def _train_task(self, lineage: AdapterLineage, task: str, group: Sequence[tuple[Experience, Example]],
                    epochs: int, max_steps: int) -> tuple[int, int, int, dict[int, float]]:
        """Train one task's group of new examples between the methods' begin_task and end_task hooks."""
        learner = self._check_out(lineage)
        methods = lineage.methods
        examples = [ex for _, ex in group]
        ids = [exp.id for exp, _ in group]
        methods.begin_task(methods.task(task, examples, ids), learner)
        masks = methods.trainable_mask(learner.lora_parameters())
        new_per_step = self.config.batch_size - methods.replay_slots(self.config.batch_size)
        steps = min(max_steps, math.ceil(len(examples) * epochs / new_per_step))
        order = [ex for _ in range(epochs) for ex in learner.shuffled(examples)]
        skipped = replayed = 0
        started = time.perf_counter()
        for step in range(steps):
            new = order[step * new_per_step:(step + 1) * new_per_step]  # never empty: steps ≤ len(order)/n
            batch = methods.transform_batch(new, exclude_ids=ids)
            replayed += len(batch) - len(new)
            result = learner.step(batch, penalty=methods.penalty, masks=masks)
            skipped += result.skipped
            if not result.skipped:
                methods.after_step(result.example_losses)
            self._progress(lineage.name, task, step + 1, steps, result.loss, started)
        losses = self._losses(examples)
        if not self._adapter_finite():  # never consolidate broken weights; the round publishes nothing
            return steps, steps, replayed, dict(zip(ids, losses, strict=True))
        edits = methods.end_task(methods.task(task, examples, ids, losses), learner)
        if edits:
            learner.assign(edits)
            losses = self._losses(examples)
        return steps, skipped, replayed, dict(zip(ids, losses, strict=True))

    def _correction_round(self, exp_id: int, pref_id: int | None, example: Example, task: str,
                          prompt: str) -> CorrectionReport:
        start = time.perf_counter()
        name = self.bank.assign([prompt], [task])[0]
        if name is None:
            self.bank.check_trainable(task)  # raises: the adapter was frozen after the correction was stored
        lineage = self.bank.get(str(name))
        learner = self._check_out(lineage)
        methods = lineage.methods
        c = self.config
        loss_before = self._losses([example])[0]
        steps = skipped = 0
        methods.begin_task(methods.task(task, [example], [exp_id]), learner)
        masks = methods.trainable_mask(learner.lora_parameters())
        margin = min(learner.token_margins(example))
        while margin < c.correction_margin and steps < c.correction_max_steps:
            batch = methods.transform_batch([example], exclude_ids=[exp_id])
            # The correction carries as much weight as all replayed examples together.
            batch[0] = Example(example.pair, weight=float(max(1, len(batch) - 1)))
            result = learner.step(batch, learning_rate=c.correction_learning_rate, penalty=methods.penalty,
                                  masks=masks)
            skipped += result.skipped
            if not result.skipped:
                methods.after_step(result.example_losses)
            steps += 1
            margin = min(learner.token_margins(example))
            self._progress(lineage.name, task, steps, c.correction_max_steps, result.loss, start,
                           margin=margin, target_margin=c.correction_margin)
        loss_after = self._losses([example])[0]
        if steps and self._adapter_finite():
            edits = methods.end_task(methods.task(task, [example], [exp_id], [loss_after]), learner)
            if edits:
                learner.assign(edits)
                margin = min(learner.token_margins(example))
        version, message = self._publish_if_healthy(lineage, steps, skipped,
                                                    reason=f"correction (preference {pref_id})")
        if version is not None:
            self.store.mark_learned([exp_id], [_finite_or_none(loss_after)])
            self.bank.observe(lineage.name, [prompt])
            self.bank.refit()
        elif steps == 0 and self.bank.is_bank and lineage.current is not None:
            self.bank.observe(lineage.name, [prompt])  # already answered as corrected: still route it here
            self.bank.refit()
        learned = margin >= c.correction_margin and (version is not None or steps == 0)
        if not learned and not message:
            message = (f"the good response is not yet the greedy answer after {steps} steps (margin {margin:.2f}); "
                       "raise correction_max_steps or correction_learning_rate")
        return CorrectionReport(steps=steps, skipped_steps=skipped, loss_before=loss_before, loss_after=loss_after,
                                min_margin=margin, learned=learned, version=version,
                                seconds=time.perf_counter() - start, preference_id=pref_id, message=message,
                                adapter=lineage.name)

    def _progress(self, adapter: str, task: str, step: int, steps: int, loss: float, started: float,
                  **extra: Any) -> None:
        elapsed = time.perf_counter() - started
        info = {"adapter": adapter, "task": task, "step": step, "steps": steps, "loss": float(loss),
                "elapsed_s": round(elapsed, 2), "eta_s": round(elapsed / step * (steps - step), 1), **extra}
        if step == steps or step % 5 == 0 or step == 1:
            log.info("training %s/%s: step %d/%d, loss %.4f, %.0f s elapsed, ETA %.0f s", adapter, task, step, steps,
                     loss, elapsed, info["eta_s"])
        if self.on_progress is not None:
            try:
                self.on_progress(info)
            except Exception:  # a broken progress display must never stop learning
                log.exception("on_progress callback failed")

    def _losses(self, examples: Sequence[Example], chunk: int = 16) -> list[float]:
        learner = self._get_learner()
        out: list[float] = []
        for i in range(0, len(examples), chunk):
            out.extend(learner.example_losses(examples[i:i + chunk]).tolist())
        return out

    def _publish_if_healthy(self, lineage: AdapterLineage, steps: int, skipped: int,
                            reason: str) -> tuple[AdapterVersion | None, str]:
        """Publish the learner's adapter unless training produced nothing usable; then restore the last good one."""
        healthy = self._adapter_finite()
        if steps == 0:
            return None, "already learned: the served version answers as asked, nothing published"
        if skipped == steps or not healthy:
            self._restore_last_good(lineage)
            message = (f"all {steps} steps had a non-finite loss or gradient" if healthy else
                       "training produced non-finite adapter weights")
            log.warning("%s: update skipped, version %s keeps serving", message,
                        lineage.current.name if lineage.current else "base")
            return None, message + "; update skipped, the previous version keeps serving"
        return self._publish(lineage, reason), ""

    def _adapter_finite(self) -> bool:
        return all(bool(p.isfinite().all()) for p in self._get_learner().lora_parameters().values())

    def _restore_last_good(self, lineage: AdapterLineage) -> None:
        learner = self._get_learner()
        if lineage.current is not None:
            learner.load_adapter(Path(lineage.current.path))
            return
        if self._fresh_lora is not None:
            learner.assign(self._fresh_lora)
            return
        for name, param in learner.model.named_parameters():
            if param.requires_grad and "lora_B" in name:
                param.data.zero_()
            elif param.requires_grad and not param.isfinite().all():
                param.data.normal_(0, 0.01)

    def _publish(self, lineage: AdapterLineage, reason: str) -> AdapterVersion:
        number = lineage.next_version
        path = self._get_learner().save_adapter(lineage.version_path(number))
        return lineage.serve(self.engine, number, path, reason,
                             parent=lineage.current.version if lineage.current else None)

    def _serve(self, number: int, path: Path, reason: str, parent: int | None,
               created_at: float | None = None) -> AdapterVersion:
        """Serve a saved version of the single adapter (benchmarks that bring their own adapter use it)."""
        return self._default.serve(self.engine, number, path, reason, parent, created_at)

    # --- checkpoints ----------------------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path) -> Path:
        """Write config, all adapter versions (PEFT), the experience store and the learner state to `path`.

        Everything goes to a temporary sibling directory first, which then replaces `path` in one rename, so a
        crash never leaves a half-written checkpoint and an existing one stays intact until the new one is whole.
        """
        self._executor.submit(lambda: None).result()  # wait for running learning rounds
        path = Path(path).expanduser().absolute()
        if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / "manifest.json").exists())):
            raise CheckpointError(f"{path} exists and is not a cl_core checkpoint; refusing to overwrite it. "
                                  "Give a new or empty directory.")
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise CheckpointError(f"cannot write a checkpoint to {path}: {exc.strerror or exc}. "
                                  "Choose a writable directory.") from exc
        try:
            config = self.config.to_dict() | {"work_dir": None, "store_path": None}
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            shutil.copytree(self.work_dir / "adapters", tmp / "adapters",
                            ignore=shutil.ignore_patterns(".*"))
            self.store.backup_to(tmp / "experiences.sqlite")
            if self.bank.is_bank:
                bank_state = self._submit(lambda: self._save_bank(tmp / "bank"), wait=True)
                manifest = {"format": CHECKPOINT_FORMAT, "base_model": self.config.model,
                            "base_fingerprint": model_fingerprint(self.model_path), "bank": bank_state,
                            "saved_at": time.time()}
            else:
                if self._learner is not None:
                    (tmp / "learner").mkdir()
                    self._learner.save_state(tmp / "learner")
                self.methods.save(tmp / "methods")
                manifest = {"format": CHECKPOINT_FORMAT, "base_model": self.config.model,
                            "base_fingerprint": model_fingerprint(self.model_path),
                            "current_version": self._current.version if self._current else None,
                            "next_version": self._next_version, "versions": [v.to_dict() for v in self.versions],
                            "saved_at": time.time()}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            old = None
            if path.exists():
                old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"writing the checkpoint to {path} failed: {exc}; nothing was replaced") from exc
        log.info("checkpoint saved to %s", path)
        return path

    @classmethod
    def load_checkpoint(cls, path: str | Path, *, engine: EngineBase | None = None,
                        **overrides: Any) -> ContinualLLM:
        """Restore a model that serves the same adapter version (same greedy answers) as when it was saved.

        `overrides` change config fields (e.g. `work_dir`); a different base model is refused, because the
        adapters were trained on the saved one.
        """
        path = Path(path).expanduser()
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            config = ContinualConfig.from_dict(json.loads((path / "config.json").read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is not a readable cl_core checkpoint ({exc})") from exc
        if manifest.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint format {manifest.get('format')} is not supported "
                                  f"(this version reads {CHECKPOINT_FORMAT})")
        config = config.replace(**overrides) if overrides else config
        model_path = resolve_model(config.model)
        if model_fingerprint(model_path) != manifest["base_fingerprint"]:
            raise CheckpointError(f"checkpoint {path} was made with base model {manifest['base_model']!r}, but "
                                  f"this config loads {config.model!r}, whose weights differ: its adapters only fit "
                                  "their own base model. Load it with the same base model.")
        store_target = Path(config.store_path) if config.store_path else None
        if store_target is not None and store_target.exists():
            raise CheckpointError(f"store_path {store_target} already exists; loading would overwrite its data. "
                                  "Give a new path.")
        work_dir = Path(config.work_dir or tempfile.mkdtemp(prefix="cl_core-"))
        store_file = store_target or work_dir / "experiences.sqlite"
        store_file.parent.mkdir(parents=True, exist_ok=True)
        if store_file.exists():
            raise CheckpointError(f"{store_file} already exists; give an empty work_dir to load into")
        shutil.copyfile(path / "experiences.sqlite", store_file)
        model = cls(config.replace(work_dir=str(work_dir)), engine=engine)
        model._temporary_work_dir = config.work_dir is None
        try:
            model._restore(path, manifest)
        except Exception:
            model.close()
            raise
        return model

    def _save_bank(self, directory: Path) -> dict[str, Any]:
        """Every lineage's training state and methods, and the router; returns what the manifest records."""
        from safetensors.torch import save_file

        directory.mkdir()
        learner = self._learner
        if learner is not None and self._checked_out in self.bank.lineages:
            self.bank.lineages[self._checked_out].check_in(learner)
        lineages = []
        for lineage in self.bank.lineages.values():
            own = directory / lineage.name
            own.mkdir()
            lineage.methods.save(own / "methods")
            if lineage.learner_state is not None:
                weights, tensors, meta = lineage.learner_state
                save_file({k: v.contiguous() for k, v in weights.items()}, str(own / "lora.safetensors"))
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(own / "optimizer.safetensors"))
                (own / "learner.json").write_text(json.dumps(meta))
            lineages.append({"name": lineage.name, "status": lineage.status, "next_version": lineage.next_version,
                             "current_version": lineage.current.version if lineage.current else None,
                             "versions": [v.to_dict() for v in lineage.versions]})
        assert self.bank.router is not None
        save_router(self.bank.router, directory / "router")
        return {"router": self.bank.router.name, "lineages": lineages, "calibration": self.bank.calibration}

    def _restore_bank(self, path: Path, state: dict[str, Any]) -> None:
        from safetensors.torch import load_file

        learner = self._get_learner()
        self._fresh_lora = learner.lora_state()
        if self.bank.router is not None:
            saved_router = load_router(path / "bank" / "router")
            if saved_router.name != self.bank.router.name:
                raise CheckpointError(f"the checkpoint's router is {saved_router.name!r} but the config asks for "
                                      f"{self.bank.router.name!r}; load it with adapter_routing="
                                      f"{saved_router.name!r}")
        for entry in state["lineages"]:
            lineage = self.bank.add(entry["name"])
            own = path / "bank" / lineage.name
            if (own / "methods").is_dir():
                lineage.methods.load(own / "methods")
            if (own / "lora.safetensors").exists():
                lineage.learner_state = (load_file(str(own / "lora.safetensors")),
                                         load_file(str(own / "optimizer.safetensors")),
                                         json.loads((own / "learner.json").read_text()))
            saved = [AdapterVersion(**v) for v in entry["versions"]]
            shutil.copytree(path / "adapters" / lineage.name, lineage.directory, dirs_exist_ok=True)
            current = entry["current_version"]
            lineage.versions = [AdapterVersion(**(v.to_dict() | {"path": str(lineage.version_path(v.version))}))
                                for v in saved if v.version != current]
            if current is not None:
                target = next(v for v in saved if v.version == current)
                lineage.serve(self.engine, current, lineage.version_path(current), target.reason, target.parent,
                              created_at=target.created_at)
            lineage.next_version = int(entry["next_version"])
            lineage.status = entry["status"]
        self.bank.router = saved_router
        for lineage in self.bank.lineages.values():
            if lineage.status == "retired" and lineage.current is not None:
                self.engine.retire(lineage.current)
        self.bank.calibration = dict(state.get("calibration") or {})

    def _restore(self, path: Path, manifest: dict[str, Any]) -> None:
        if "bank" in manifest:
            if not self.bank.is_bank:
                raise CheckpointError(f"{path} holds a bank of adapters; load it with num_adapters > 1")
            self._restore_bank(path, manifest["bank"])
            return
        if self.bank.is_bank:
            raise CheckpointError(f"{path} holds a single adapter; load it with num_adapters=1")
        saved = [AdapterVersion(**v) for v in manifest["versions"]]
        for version in saved:
            shutil.copytree(path / "adapters" / f"v{version.version}", self.work_dir / "adapters" /
                            f"v{version.version}")
        current = manifest["current_version"]
        learner = self._get_learner()
        if (path / "learner").is_dir():
            learner.load_state(path / "learner")
        if (path / "methods").is_dir():
            self.methods.load(path / "methods")
        lineage = self._default
        lineage.versions = [AdapterVersion(**(v.to_dict() | {"path": str(lineage.version_path(v.version))}))
                            for v in saved if v.version != current]
        if current is not None:
            target = next(v for v in saved if v.version == current)
            learner.load_adapter(lineage.version_path(current))
            lineage.serve(self.engine, current, lineage.version_path(current), target.reason, target.parent,
                          created_at=target.created_at)
        lineage.next_version = int(manifest["next_version"])

    # --- lifecycle ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish learning jobs, close the store, and stop the engine if this object started it."""
        self._executor.shutdown(wait=True)
        stored = self.store.count()
        self.store.close()
        if self._owns_engine:
            self.engine.shutdown()
        if self._temporary_work_dir and self.work_dir.exists():
            if stored and self.config.store_path is None:
                log.warning("removing the temporary work_dir %s with %d stored experiences; set "
                            "ContinualConfig.work_dir (or save_checkpoint) to keep them", self.work_dir, stored)
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> ContinualLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_text_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [check_text(name[:-1], value)]
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidInputError(f"{name} must be a str or a non-empty list of str, got {type(value).__name__}")
    return [check_text(f"{name}[{i}]", item) for i, item in enumerate(value)]


def _tasks(task: str | Sequence[str | None] | None, n: int) -> list[str | None]:
    """One task id (or None) per prompt, from one for all or a list of n."""
    if task is None or isinstance(task, str):
        return [task] * n
    if not isinstance(task, (list, tuple)) or len(task) != n:
        raise InvalidInputError(f"task must be a str, None or a list of one per prompt ({n}), got {task!r}")
    for i, t in enumerate(task):
        if t is not None and not isinstance(t, str):
            raise InvalidInputError(f"task[{i}] must be a str or None, got {type(t).__name__}")
    return list(task)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


__all__ = ["ContinualLLM"]
