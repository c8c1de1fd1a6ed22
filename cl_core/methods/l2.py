"""`l2`: an L2 pull towards the weights left by the previous task.

The simplest regulariser (EWC with an identity Fisher): every LoRA weight is penalised for moving away from its
value at the last task boundary, `l2_lambda / 2 * ||theta - theta_ref||^2`. Cheap and a useful baseline: when EWC
does not beat it, the Fisher is not buying anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cl_core.methods.base import AntiForgettingMethod, LearnerView, TaskContext, register_method


@register_method("l2")
class L2ToReference(AntiForgettingMethod):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reference: dict[str, torch.Tensor] = {}

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        if not self.reference or self.settings.l2_lambda == 0:
            return None
        total = sum((params[name] - ref).pow(2).sum() for name, ref in self.reference.items())
        return 0.5 * self.settings.l2_lambda * total

    def end_task(self, task: TaskContext, learner: LearnerView) -> None:
        self.reference = {name: p.detach().clone() for name, p in learner.lora_parameters().items()}
        return None

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return dict(self.reference), {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.reference = dict(tensors)
