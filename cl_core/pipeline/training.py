"""Train a candidate adapter from a validated batch, continuing from the champion's full state.

The champion's checkpoint (registered in MLflow with its adapter) holds everything learning needs to continue
without forgetting: the adapter, the experience store (replay memory, priorities, preference pairs), the EWC
Fisher information and anchor, and the optimizer. A run restores it, adds the batch, trains, and writes the
candidate's checkpoint; nothing is shared between runs except through the registry, so a worker can be a fresh
pod. The first run (no champion yet) starts from the bare base model.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_core.continual import ContinualLLM
from cl_core.engine import DetachedEngine
from cl_core.errors import ConfigError, NothingToLearnError
from cl_core.models import model_fingerprint, resolve_model
from cl_core.pipeline.bank import BankCandidate, bank_candidate
from cl_core.pipeline.config import PipelineConfig, training_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QA:
    """A question and the answer the served model should give (what evaluation asks through vLLM)."""

    prompt: str
    answer: str
    task: str = "default"


@dataclass
class TrainingOutcome:
    """What a training run produced and what evaluation needs to judge it."""

    checkpoint_dir: Path
    adapter_dir: Path
    version: int
    parent_version: int | None
    base_model: str
    base_fingerprint: str
    heldout: list[QA]
    corrections: list[QA]
    replayed: list[QA]
    stats: dict[str, float] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)
    bank: BankCandidate | None = None
    """With a bank (`training.num_adapters` > 1): every adapter's version and which ones this round changed."""


def is_heldout(record_id: str, fraction: float) -> bool:
    """Deterministic split by record id: the same record is held out in every run and on every machine."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(record_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_batch(records: Sequence[Any], heldout_fraction: float) -> tuple[list[Any], list[QA]]:
    """Training records and held-out questions. Only labelled records are held out: they measure the new task's
    gain on examples the candidate never saw. Corrections are all trained on (users check those exact facts)."""
    train, heldout = [], []
    for record in records:
        if record.kind == "label" and is_heldout(record.id, heldout_fraction):
            heldout.append(QA(record.prompt, record.response, record.task))
        else:
            train.append(record)
    return train, heldout


def load_anchor_prompts(spec: str | None) -> list[str]:
    """The anchor prompts named by `training.anchors` ("default", a JSON path, or None)."""
    import json

    if spec is None:
        return []
    path = Path(__file__).with_name("anchors.json") if spec == "default" else Path(spec)
    try:
        prompts = json.loads(path.read_text())["prompts"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"training.anchors: cannot read anchor prompts from {path} ({exc}); give a JSON file "
                          '{"prompts": ["...", ...]}, "default", or null') from exc
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError(f"training.anchors: {path} must hold a non-empty list of non-empty prompt strings")
    return prompts


def train_candidate(config: PipelineConfig, records: Sequence[Any], work_dir: Path,
                    champion_checkpoint: Path | None, parent_version: int | None,
                    anchors: Sequence[tuple[str, str]] = (),
                    version_floor: dict[str, int] | None = None,
                    on_progress: Callable[[dict[str, Any]], None] | None = None) -> TrainingOutcome:
    """Continue the champion's learning on `records` (validated `ExperienceRecord`s) and save the candidate.

    `anchors` ((prompt, answer the served model gives) pairs) start a new lineage: they are learned first as task
    "anchor" (a near no-op for the weights, since they are the model's own answers), which puts them in the
    replay memory and gives EWC a Fisher of the model's general behaviour before the first real batch.

    `version_floor` (a bank: adapter -> highest lineage version any registered candidate used) makes this
    round's versions new everywhere, so a served name never stands for two sets of weights.

    Raises `NothingToLearnError` when the batch has nothing to train on (e.g. only already ingested records or
    only negative ratings): the pipeline then ends the run without a candidate.
    """
    threads = training_threads(config.training.threads, config.endpoints.vllm_urls)
    with torch_threads(threads):
        log.info("training with %d CPU thread(s) (training.threads=%s)", threads, config.training.threads)
        return _train(config, records, work_dir, champion_checkpoint, parent_version, anchors, version_floor or {},
                      on_progress)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` for the block (it is process-wide), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(config: PipelineConfig, records: Sequence[Any], work_dir: Path, champion_checkpoint: Path | None,
           parent_version: int | None, anchors: Sequence[tuple[str, str]],
           version_floor: dict[str, int], on_progress: Callable[[dict[str, Any]], None] | None) -> TrainingOutcome:
    started = time.perf_counter()
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    continual = config.training.continual.replace(work_dir=str(work_dir / "model"))
    engine = DetachedEngine.for_config(continual)
    if champion_checkpoint is not None:
        model = ContinualLLM.load_checkpoint(champion_checkpoint, engine=engine,
                                             **continuing_overrides(champion_checkpoint, continual))
    else:
        model = ContinualLLM(continual, engine=engine)
    model.bank.raise_version_floor(version_floor)
    model.on_progress = on_progress
    try:
        anchor_steps = 0
        if anchors and model.bank.is_bank:
            # A bank keeps what the model knew by routing it to the base model; anchors would only open an
            # "anchor" adapter that nothing should ever be routed to.
            log.info("bank of adapters: %d anchor prompts not rehearsed (out-of-scope prompts reach the base)",
                     len(anchors))
        elif anchors and champion_checkpoint is None:
            model.store.add_many([{"prompt": p, "response": a, "task": "anchor", "metadata": {"kind": "anchor"}}
                                  for p, a in anchors])
            log.info("rehearsing %d anchor answers of the served model (task 0 for replay and EWC)", len(anchors))
            anchor_steps = model.learn(epochs=1).steps
        replayed = [QA(e.prompt, e.response, e.task) for e in
                    model.store.sample(config.evaluation.replay_probes, "uniform", learned_only=True)]
        train, heldout = split_batch(records, config.evaluation.heldout_fraction)
        known = model.store.metadata_values("record_id", [r.id for r in train])
        fresh = [r for r in train if r.id not in known]
        margin_driven = config.training.correction_rounds
        corrections = [r for r in fresh if r.kind == "correction"]
        _ingest(model, [r for r in fresh if r.kind != "correction" or not margin_driven])
        report = None
        if model.store.count(pending_only=True):
            log.info("training on %d new records (%d already learned by the champion, %d held out), %d epoch(s)",
                     len(fresh), len(train) - len(fresh), len(heldout), config.training.epochs)
            try:
                report = model.learn(epochs=config.training.epochs)
            except NothingToLearnError:  # only negative ratings: kept for preference learning, not imitated
                report = None
        if report is None and not corrections:
            raise NothingToLearnError(f"nothing new to train on: {len(train) - len(fresh)} of {len(train)} "
                                      "records were already learned by the champion, the rest are negative ratings")
        fixed = 0
        if margin_driven:
            # A correction is trained until it is the greedy answer with `correction_margin` to spare, and no
            # further: epochs over a handful of facts drive their loss to ~0 and drag neighbouring knowledge along
            # (measured: "the capital of Russia is St. Petersburg" after ten capital corrections).
            for i, r in enumerate(corrections, 1):
                exp_id = _ingest_correction(model, r)
                if model.correction_margin(r.prompt, r.chosen, task=r.task) < continual.correction_margin:
                    log.info("correction %d/%d: reinforcing %r -> %r", i, len(corrections), r.prompt[:60],
                             r.chosen[:60])
                    model.reinforce_correction(exp_id)
                    fixed += 1
                else:
                    model.store.mark_learned([exp_id])
        version = model.current_version
        if version is None or (parent_version is not None and report is None and not fixed):
            raise NothingToLearnError("the champion already answers every new record as asked; nothing changed")
        checkpoint = model.save_checkpoint(work_dir / "checkpoint")
        log.info("candidate trained in %.0f s (learner version %d)", time.perf_counter() - started, version.version)
        stats = {"records": len(records), "trained_records": len(fresh), "already_learned": len(train) - len(fresh),
                 "heldout_records": len(heldout), "corrections": len(corrections), "correction_rounds": fixed,
                 "steps": report.steps if report else 0, "skipped_steps": report.skipped_steps if report else 0,
                 "replayed_examples": report.num_replayed if report else 0,
                 "loss_before": _finite(report.loss_before) if report else None,
                 "loss_after": _finite(report.loss_after) if report else None, "anchor_steps": anchor_steps,
                 "train_seconds": round(time.perf_counter() - started, 2),
                 "store_size": model.store.count()}
        model_path = resolve_model(continual.model)
        bank = bank_candidate(checkpoint, continual.model, champion_checkpoint) if model.bank.is_bank else None
        if bank is not None:
            stats |= {"adapters": len(bank.lineage_versions), "adapters_trained": len(bank.changed)}
            log.info("bank: %d adapter(s), trained this round: %s", len(bank.lineage_versions),
                     ", ".join(bank.changed) or "none")
        adapter_dir = checkpoint / "adapters" if bank is not None else checkpoint / "adapters" / f"v{version.version}"
        return TrainingOutcome(checkpoint_dir=checkpoint, adapter_dir=adapter_dir,
                               version=version.version, parent_version=parent_version, base_model=continual.model,
                               base_fingerprint=model_fingerprint(model_path), heldout=heldout,
                               corrections=[QA(r.prompt, r.chosen, r.task) for r in corrections],
                               replayed=replayed, stats=stats, tasks=sorted({r.task for r in fresh}), bank=bank)
    finally:
        model.close()


# What an adapter *is* (its shape and its methods' state) cannot change while continuing it; everything else in
# `training:` (learning rates, steps, batch size, replay ratio, EWC strength...) applies from the next run on.
# (The base model is checked by `load_checkpoint` itself, by weight fingerprint.)
STRUCTURAL_FIELDS = ("lora_rank", "lora_alpha", "target_modules", "anti_forgetting", "max_tasks", "num_adapters",
                     "replay_strategy")


def continuing_overrides(checkpoint: Path, continual: Any) -> dict[str, Any]:
    """The config changes a run applies to the champion's checkpoint; a structural change is refused."""
    import json

    saved = json.loads((Path(checkpoint) / "config.json").read_text())
    wanted = continual.to_dict()
    changed = [f"{k}: {saved.get(k)!r} -> {wanted[k]!r}" for k in STRUCTURAL_FIELDS
               if _norm(saved.get(k)) != _norm(wanted[k])]
    if changed:
        raise ConfigError(
            "training config changes what the champion's adapter is (" + "; ".join(changed) + "). An adapter "
            "cannot change shape or methods while it keeps learning: revert these fields, or start a new lineage "
            "(a new model_name in the pipeline config) that trains from the base model.")
    return {k: v for k, v in wanted.items() if k not in STRUCTURAL_FIELDS and k not in ("model", "store_path")}


def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _ingest(model: ContinualLLM, records: Sequence[Any]) -> None:
    """Store the batch for `learn()`. Each row remembers its S3 record id, so a record seen again (a retried run)
    is never added twice."""
    rows = []
    for r in records:
        if r.kind == "correction":
            _ingest_correction(model, r)
        else:
            rows.append({"prompt": r.prompt, "response": r.response, "reward": r.reward, "task": r.task,
                         "metadata": _meta(r)})
    model.store.add_many(rows)


def _ingest_correction(model: ContinualLLM, r: Any) -> int:
    """A correction is an experience of its chosen answer (top priority, never imitated wrong) and a preference
    pair (chosen over rejected) for preference learning."""
    exp_id = model.store.add(r.prompt, r.chosen, reward=1.0, task=r.task, kind="correction", metadata=_meta(r))
    model.store.add_preference(r.prompt, r.chosen, r.rejected, task=r.task, experience_id=exp_id)
    return exp_id


def _meta(r: Any) -> dict[str, Any]:
    return {"record_id": r.id, "kind": r.kind, "source": r.source or ""}


def _finite(value: float) -> float | None:
    return round(float(value), 5) if value is not None and math.isfinite(value) else None
