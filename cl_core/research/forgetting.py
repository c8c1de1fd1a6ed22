"""`ForgettingExperiment`: learn a sequence of tasks one after another and measure what is forgotten.

The model learns task 1, then task 2, ... through the same path production learning uses (experiences go into the
experience store, `learn()` trains with the configured anti-forgetting methods and publishes into vLLM), and after
each task every task's test set is scored through vLLM. That gives the forgetting matrix `matrix[i][j]` = score on
task i after learning task j, from which `cl_core.metrics` computes AA, BWT, FWT and forgetting. With
`multitask_upper_bound=True` a fresh adapter is also trained on all tasks jointly with the same total step budget:
the reference a continual method is judged against.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cl_core.errors import InvalidInputError
from cl_core.metrics import summarize
from cl_core.streams import Task, load_task

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass
class ExperimentResult:
    """Everything a forgetting experiment measured; `to_json` is what the DVC stages and plots read."""

    tasks: list[str]
    methods: list[str]
    matrix: list[list[float]]
    initial_scores: list[float]
    metrics: dict[str, float]
    multitask_scores: dict[str, float] | None = None
    train_seconds: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps_per_task: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    losses: list[dict[str, float]] = field(default_factory=list)

    @property
    def multitask_average(self) -> float | None:
        if not self.multitask_scores:
            return None
        return sum(self.multitask_scores.values()) / len(self.multitask_scores)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["multitask_average"] = self.multitask_average
        return data

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ExperimentResult:
        data = json.loads(Path(path).read_text())
        data.pop("multitask_average", None)
        return cls(**data)


class ForgettingExperiment:
    """Sequential learning of `task_sequence` on `model`, scored after each task.

    `model` is a fresh `ContinualLLM` (its adapter is trained in place). Tasks are `cl_core.streams.Task` objects
    or registry names (built with `n_train`/`n_test`/`seed`). `steps_per_task` optimizer steps are taken per task
    (`None`: the model's `max_steps`).
    """

    def __init__(self, model: Any, task_sequence: Sequence[Task | str], eval_after_each_task: bool = True,
                 steps_per_task: int | None = None, multitask_upper_bound: bool = False, n_train: int = 200,
                 n_test: int = 50, seed: int = 0, progress: Progress | None = None) -> None:
        if isinstance(task_sequence, (str, Task)) or not task_sequence:
            raise InvalidInputError("task_sequence must be a non-empty list of tasks or task names")
        self.tasks = [t if isinstance(t, Task) else load_task(t, n_train=n_train, n_test=n_test, seed=seed)
                      for t in task_sequence]
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise InvalidInputError(f"task_sequence lists a task twice: {names}")
        for task in self.tasks:
            if not task.train or not task.test:
                raise InvalidInputError(f"task {task.name!r} needs both train and test examples")
        if steps_per_task is not None and (not isinstance(steps_per_task, int) or steps_per_task < 1):
            raise InvalidInputError(f"steps_per_task must be a positive integer, got {steps_per_task!r}")
        self.model = model
        self.eval_after_each_task = eval_after_each_task
        self.steps_per_task = steps_per_task or model.config.max_steps
        self.multitask_upper_bound = multitask_upper_bound
        self.progress = progress or (lambda message: log.info(message))

    def run(self) -> ExperimentResult:
        start = time.perf_counter()
        n = len(self.tasks)
        initial = self._evaluate(self.model, "before training")
        matrix = [[math.nan] * n for _ in range(n)]
        train_seconds, eval_seconds, losses = [], [], []
        for j, task in enumerate(self.tasks):
            t0 = time.perf_counter()
            report = self._train(self.model, [task])
            train_seconds.append(time.perf_counter() - t0)
            losses.append({"task": task.name, "loss_before": report.loss_before, "loss_after": report.loss_after,
                           "steps": report.steps, "replayed": report.num_replayed})
            self.progress(f"learned {task.name} ({j + 1}/{n}): {report.steps} steps, loss {report.loss_before:.3f}"
                          f" -> {report.loss_after:.3f} in {train_seconds[-1]:.0f}s")
            if self.eval_after_each_task or j == n - 1:
                t0 = time.perf_counter()
                scores = self._evaluate(self.model, f"after {task.name}")
                eval_seconds.append(time.perf_counter() - t0)
                for i in range(n):
                    matrix[i][j] = scores[i]
        metrics = _metrics(matrix, initial) if self.eval_after_each_task else {
            "average_accuracy": sum(row[-1] for row in matrix) / n}
        multitask = self._multitask() if self.multitask_upper_bound else None
        if multitask is not None:
            metrics["multitask_average_accuracy"] = sum(multitask.values()) / n
        return ExperimentResult(
            tasks=[t.name for t in self.tasks], methods=list(self.model.config.anti_forgetting_methods),
            matrix=matrix, initial_scores=initial, metrics=metrics, multitask_scores=multitask,
            train_seconds=train_seconds, eval_seconds=eval_seconds, seconds=time.perf_counter() - start,
            steps_per_task=self.steps_per_task, config=self.model.config.to_dict(), losses=losses)

    # --- internals ------------------------------------------------------------------------------------------
    def _train(self, model: Any, tasks: Sequence[Task], steps: int | None = None) -> Any:
        records = [dict(prompt=ex.prompt, response=ex.answer, task=task.name) for task in tasks for ex in task.train]
        if len(tasks) > 1:  # joint training: one shuffled task group, not a sequence of tasks
            records = [dict(r, task="multitask") for r in records]
        model.store.add_many(records)
        steps = steps or self.steps_per_task
        per_step = model.config.batch_size
        epochs = max(1, math.ceil(steps * per_step / len(records)))
        return model.learn(epochs=epochs, max_steps=steps)

    def _evaluate(self, model: Any, when: str) -> list[float]:
        report = model.evaluate_retention(self.tasks)
        scores = [report.scores[t.name] for t in self.tasks]
        self.progress(f"scores {when}: " + ", ".join(f"{t.name}={s:.2f}" for t, s in zip(self.tasks, scores,
                                                                                           strict=True)))
        return scores

    def run_multitask(self) -> dict[str, float]:
        """Train `model` on all tasks jointly (shuffled together, `steps_per_task * len(tasks)` steps: the same
        budget as the sequence) and score every task: the multitask upper bound, on its own."""
        t0 = time.perf_counter()
        self._train(self.model, self.tasks, steps=self.steps_per_task * len(self.tasks))
        self.progress(f"multitask upper bound trained in {time.perf_counter() - t0:.0f}s")
        scores = self._evaluate(self.model, "multitask")
        return {t.name: s for t, s in zip(self.tasks, scores, strict=True)}

    def _multitask(self) -> dict[str, float]:
        """The multitask upper bound on a fresh adapter beside the sequential one, on the same engine."""
        from cl_core.continual import ContinualLLM

        config = self.model.config.replace(work_dir=None, store_path=None, anti_forgetting="none")
        with ContinualLLM(config, engine=self.model.engine) as joint:
            scores = ForgettingExperiment(joint, self.tasks, steps_per_task=self.steps_per_task,
                                          progress=self.progress).run_multitask()
        self.model.reactivate()  # in merged mode the joint adapter was folded into the shared engine
        return scores


def _metrics(matrix: list[list[float]], initial: list[float]) -> dict[str, float]:
    return summarize(matrix, initial_scores=initial) if len(matrix) > 1 else {
        "average_accuracy": matrix[0][0], "backward_transfer": 0.0, "forgetting": 0.0,
        "forward_transfer": 0.0}
