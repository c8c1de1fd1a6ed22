"""`ewc`: online Elastic Weight Consolidation over the LoRA weights.

Kirkpatrick et al. (2017) penalise moving weights that mattered for earlier tasks, weighted by the diagonal of the
Fisher information. The online form (Schwarz et al. 2018, "Progress & Compress") keeps ONE running Fisher,
`F <- gamma * F + F_task`, and one anchor (the weights after the last task), so memory stays constant however many
tasks or learning rounds pass: the form that suits a model that keeps learning in production.

    penalty = ewc_lambda / 2 * sum_i F_i * (theta_i - theta*_i)^2

F is the empirical Fisher: the mean over up to `ewc_samples` of the task's examples of each example's squared loss
gradient.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch

from cl_core.methods.base import AntiForgettingMethod, LearnerView, TaskContext, register_method


@register_method("ewc")
class OnlineEWC(AntiForgettingMethod):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.consolidations = 0
        self._rng = random.Random(self.settings.seed)

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        if not self.fisher or self.settings.ewc_lambda == 0:
            return None
        total = sum((self.fisher[name] * (params[name] - self.anchor[name]).pow(2)).sum() for name in self.fisher)
        return 0.5 * self.settings.ewc_lambda * total

    def end_task(self, task: TaskContext, learner: LearnerView) -> None:
        examples = list(task.examples)
        if len(examples) > self.settings.ewc_samples:
            examples = self._rng.sample(examples, self.settings.ewc_samples)
        if not examples:
            return None
        fisher = learner.squared_gradients(examples)
        gamma = self.settings.ewc_gamma
        for name, value in fisher.items():
            old = self.fisher.get(name)
            self.fisher[name] = value if old is None else gamma * old + value
        self.anchor = {name: p.detach().clone() for name, p in learner.lora_parameters().items()}
        self.consolidations += 1
        return None

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"fisher::{k}": v for k, v in self.fisher.items()}
        tensors |= {f"anchor::{k}": v for k, v in self.anchor.items()}
        state = self._rng.getstate()
        return tensors, {"consolidations": self.consolidations, "rng": [state[0], list(state[1]), state[2]]}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.fisher = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("fisher::")}
        self.anchor = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("anchor::")}
        self.consolidations = int(meta["consolidations"])
        version, internal, gauss = meta["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
