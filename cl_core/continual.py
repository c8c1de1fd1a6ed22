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
        self._namespace = self.engine.claim_namespace("adapter")
        self._learner: LoRALearner | None = None
        self._current: AdapterHandle | None = None
        self.versions: list[AdapterVersion] = []
        self._next_version = 1
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cl-learn")
        self._online_job: Future[Any] | None = None
        self.methods = MethodSet(self.config.anti_forgetting_methods, MethodSettings.from_config(self.config),
                                 source=StoreExampleSource(self.store, self.tokenizer, self.config.max_model_len,
                                                           self._get_learner))

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

    # --- inference ------------------------------------------------------------------------------------------
    @overload
    def generate(self, prompts: str, **sampling: Any) -> Generation: ...
    @overload
    def generate(self, prompts: Sequence[str], **sampling: Any) -> list[Generation]: ...

    def generate(self, prompts: str | Sequence[str], **sampling: Any) -> Generation | list[Generation]:
        """Answer one prompt (str in, str out) or many (list in, list out) with the current adapter version.

        Sampling parameters are vLLM's (`max_tokens`, `min_tokens`, `temperature`, `top_p`, `top_k`, `stop`,
        `seed`, ...); the default is greedy with up to 128 new tokens. Each result is a `str` that also carries
        `adapter_version`, `adapter_name`, `finish_reason` and `token_ids`.
        """
        single = isinstance(prompts, str)
        items = _as_text_list(prompts, "prompts")
        ids = [encode_prompt(self.tokenizer, text) for text in items]
        results = self.engine.generate(ids, sampling, self._current)
        return results[0] if single else results

    def score(self, prompt: str, response: str) -> ScoreResult:
        """Sum and mean log-probability of `response` given `prompt` under the served version (vLLM prompt
        logprobs), e.g. to check a reference answer without depending on greedy decoding."""
        pair = encode_pair(self.tokenizer, check_text("prompt", prompt), check_text("response", response),
                           add_eos=False)
        logprobs = self.engine.prompt_logprobs([pair.input_ids], self._current)[0]
        tokens = logprobs[len(pair.prompt_ids):]
        total = float(sum(tokens))
        return ScoreResult(total, total / max(1, len(tokens)), len(tokens), tokens,
                           self._current.version if self._current else None)

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
        logprobs = self.engine.prompt_logprobs([e.input_ids for e in encoded], self._current)
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
        version = self._current.version if self._current else None
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
        """The version being served (None before the first publish: the bare base model)."""
        if self._current is None:
            return None
        return next(v for v in self.versions if v.version == self._current.version)

    def learn(self, epochs: int = 1, max_steps: int | None = None, wait: bool = True) -> LearnReport | Future:
        """Train on the experiences stored since the last round (plus replay) and publish a new version.

        Raises `NothingToLearnError` when nothing new can be trained on. With `wait=False` returns a Future.
        Experiences with reward ≤ 0 are kept for preference learning but not imitated; in `feedback` mode only
        rated experiences and corrections are trained on.
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
        Blocks until the new version is served, unless `wait=False` (then returns a Future).
        """
        check_text("prompt", prompt)
        check_text("bad_response", bad_response)
        check_text("good_response", good_response)
        if bad_response.strip() == good_response.strip():
            raise InvalidInputError("bad_response and good_response are the same text: nothing to correct")
        pair = encode_pair(self.tokenizer, prompt, good_response)
        self.engine.check_prompt_ids(pair.input_ids, new_tokens=0)
        exp_id = self.store.add(prompt, good_response, reward=1.0, task=task, kind="correction")
        pref_id = self.store.add_preference(prompt, good_response, bad_response, task=task, experience_id=exp_id)
        return self._submit(lambda: self._correction_round(exp_id, pref_id, Example(pair), task), wait)

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
        return self._submit(lambda: self._correction_round(experience_id, pref_id, Example(pair), exp.task),
                            wait=True)

    def correction_margin(self, prompt: str, response: str) -> float:
        """The learner's smallest log-probability margin of `response`'s tokens over each runner-up token
        (≥ `correction_margin` means greedy decoding reproduces it, in the learner's precision)."""
        return float(min(self._get_learner().token_margins(Example(encode_pair(self.tokenizer, prompt,
                                                                                 response)))))

    def reactivate(self) -> None:
        """Serve this model's current version again, e.g. after another model published into the same engine
        (in merged mode an engine serves whichever adapter was folded in last)."""
        if self._current is not None:
            self.engine.publish(self._current)

    def _submit(self, job: Callable[[], T], wait: bool) -> T | Future:
        future = self._executor.submit(job)
        return future.result() if wait else future

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
        by_task: dict[str, list[tuple[Experience, Example]]] = {}
        for exp, example in items:  # task groups in the order their first experience arrived
            by_task.setdefault(exp.task, []).append((exp, example))
        examples = [ex for _, ex in items]
        loss_before = _mean(self._losses(examples))
        steps = skipped = replayed = 0
        losses_after: dict[int, float] = {}
        for task, group in by_task.items():
            outcome = self._train_task(task, group, epochs, max_steps)
            steps, skipped, replayed = steps + outcome[0], skipped + outcome[1], replayed + outcome[2]
            losses_after |= outcome[3]
        ids = [exp.id for exp, _ in items]
        version, message = self._publish_if_healthy(steps, skipped, reason=f"learn: {len(examples)} experiences")
        if version is not None:
            self.store.mark_learned(ids, [_finite_or_none(losses_after[i]) for i in ids])
        return LearnReport(steps=steps, skipped_steps=skipped, num_new=len(examples), num_replayed=replayed,
                           loss_before=loss_before, loss_after=_mean(list(losses_after.values())), version=version,
                           seconds=time.perf_counter() - start, message=message, tasks=tuple(by_task))

    def _train_task(self, task: str, group: Sequence[tuple[Experience, Example]], epochs: int,
                    max_steps: int) -> tuple[int, int, int, dict[int, float]]:
        """Train one task's group of new examples between the methods' begin_task and end_task hooks."""
        learner = self._get_learner()
        examples = [ex for _, ex in group]
        ids = [exp.id for exp, _ in group]
        self.methods.begin_task(self.methods.task(task, examples, ids), learner)
        masks = self.methods.trainable_mask(learner.lora_parameters())
        new_per_step = self.config.batch_size - self.methods.replay_slots(self.config.batch_size)
        steps = min(max_steps, math.ceil(len(examples) * epochs / new_per_step))
        order = [ex for _ in range(epochs) for ex in learner.shuffled(examples)]
        skipped = replayed = 0
        for step in range(steps):
            new = order[step * new_per_step:(step + 1) * new_per_step]  # never empty: steps ≤ len(order)/n
            batch = self.methods.transform_batch(new, exclude_ids=ids)
            replayed += len(batch) - len(new)
            result = learner.step(batch, penalty=self.methods.penalty, masks=masks)
            skipped += result.skipped
            if not result.skipped:
                self.methods.after_step(result.example_losses)
        losses = self._losses(examples)
        if not self._adapter_finite():  # never consolidate broken weights; the round publishes nothing
            return steps, steps, replayed, dict(zip(ids, losses, strict=True))
        edits = self.methods.end_task(self.methods.task(task, examples, ids, losses), learner)
        if edits:
            learner.assign(edits)
            losses = self._losses(examples)
        return steps, skipped, replayed, dict(zip(ids, losses, strict=True))

    def _correction_round(self, exp_id: int, pref_id: int, example: Example, task: str) -> CorrectionReport:
        start = time.perf_counter()
        learner = self._get_learner()
        c = self.config
        loss_before = self._losses([example])[0]
        steps = skipped = 0
        self.methods.begin_task(self.methods.task(task, [example], [exp_id]), learner)
        masks = self.methods.trainable_mask(learner.lora_parameters())
        margin = min(learner.token_margins(example))
        while margin < c.correction_margin and steps < c.correction_max_steps:
            batch = self.methods.transform_batch([example], exclude_ids=[exp_id])
            # The correction carries as much weight as all replayed examples together.
            batch[0] = Example(example.pair, weight=float(max(1, len(batch) - 1)))
            result = learner.step(batch, learning_rate=c.correction_learning_rate, penalty=self.methods.penalty,
                                  masks=masks)
            skipped += result.skipped
            if not result.skipped:
                self.methods.after_step(result.example_losses)
            steps += 1
            margin = min(learner.token_margins(example))
        loss_after = self._losses([example])[0]
        if steps and self._adapter_finite():
            edits = self.methods.end_task(self.methods.task(task, [example], [exp_id], [loss_after]), learner)
            if edits:
                learner.assign(edits)
                margin = min(learner.token_margins(example))
        version, message = self._publish_if_healthy(steps, skipped, reason=f"correction (preference {pref_id})")
        if version is not None:
            self.store.mark_learned([exp_id], [_finite_or_none(loss_after)])
        learned = margin >= c.correction_margin and version is not None
        if not learned and not message:
            message = (f"the good response is not yet the greedy answer after {steps} steps (margin {margin:.2f}); "
                       "raise correction_max_steps or correction_learning_rate")
        return CorrectionReport(steps=steps, skipped_steps=skipped, loss_before=loss_before, loss_after=loss_after,
                                min_margin=margin, learned=learned, version=version,
                                seconds=time.perf_counter() - start, preference_id=pref_id, message=message)

    def _losses(self, examples: Sequence[Example], chunk: int = 16) -> list[float]:
        learner = self._get_learner()
        out: list[float] = []
        for i in range(0, len(examples), chunk):
            out.extend(learner.example_losses(examples[i:i + chunk]).tolist())
        return out

    def _publish_if_healthy(self, steps: int, skipped: int, reason: str) -> tuple[AdapterVersion | None, str]:
        """Publish the learner's adapter unless training produced nothing usable; then restore the last good one."""
        healthy = self._adapter_finite()
        if steps == 0:
            return None, "already learned: the served version answers as asked, nothing published"
        if skipped == steps or not healthy:
            self._restore_last_good()
            message = (f"all {steps} steps had a non-finite loss or gradient" if healthy else
                       "training produced non-finite adapter weights")
            log.warning("%s: update skipped, version %s keeps serving", message,
                        self._current.version if self._current else "base")
            return None, message + "; update skipped, the previous version keeps serving"
        return self._publish(reason), ""

    def _adapter_finite(self) -> bool:
        return all(bool(p.isfinite().all()) for p in self._get_learner().lora_parameters().values())

    def _restore_last_good(self) -> None:
        learner = self._get_learner()
        if self._current is not None:
            learner.load_adapter(Path(self._current.path))
            return
        for name, param in learner.model.named_parameters():
            if param.requires_grad and "lora_B" in name:
                param.data.zero_()
            elif param.requires_grad and not param.isfinite().all():
                param.data.normal_(0, 0.01)

    def _publish(self, reason: str) -> AdapterVersion:
        number = self._next_version
        path = self._get_learner().save_adapter(self.work_dir / "adapters" / f"v{number}")
        return self._serve(number, path, reason, parent=self._current.version if self._current else None)

    def _serve(self, number: int, path: Path, reason: str, parent: int | None,
               created_at: float | None = None) -> AdapterVersion:
        handle = self.engine.new_handle(self._namespace, number, str(path))
        self.engine.publish(handle)  # raises PublishError; the previous version keeps serving
        previous, self._current = self._current, handle
        if previous is not None:
            self.engine.retire(previous)
        version = AdapterVersion(version=number, name=handle.name, path=str(path),
                                 created_at=created_at or time.time(), parent=parent, reason=reason)
        self.versions.append(version)
        self._next_version = number + 1
        (self.work_dir / "adapters" / "versions.json").write_text(
            json.dumps([v.to_dict() for v in self.versions], indent=2))
        log.info("published %s (%s)", handle.name, reason)
        return version

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

    def _restore(self, path: Path, manifest: dict[str, Any]) -> None:
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
        self.versions = [AdapterVersion(**(v.to_dict() | {"path": str(self.work_dir / "adapters" /
                                                                      f"v{v.version}")})) for v in saved
                         if v.version != current]
        if current is not None:
            target = next(v for v in saved if v.version == current)
            learner.load_adapter(self.work_dir / "adapters" / f"v{current}")
            self._serve(current, self.work_dir / "adapters" / f"v{current}", target.reason, target.parent,
                        created_at=target.created_at)
            self.versions.sort(key=lambda v: v.version)
        self._next_version = int(manifest["next_version"])

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


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


__all__ = ["ContinualLLM"]
