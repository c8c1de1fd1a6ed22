"""`olora`: O-LoRA, orthogonal subspaces for the adapters of successive tasks (Wang et al. 2023).

Like `progressive`, each task trains its own rank block while earlier blocks stay frozen and in use. On top, the
new block's input subspace (the rows of its lora_A) is pushed to be orthogonal to those of all earlier tasks:

    penalty = olora_lambda * sum_layers sum_{earlier blocks b} sum |A_b A_t^T|

so the new task writes into directions of the input that earlier tasks do not read, which is where interference
comes from. The paper reports O-LoRA at 75.8 average accuracy vs 80.0 multitask on T5-large (sequential LoRA 43.7).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from cl_core.methods.base import register_method
from cl_core.methods.blocks import is_lora_a
from cl_core.methods.progressive import ProgressiveAdapters


@register_method("olora")
class OrthogonalLoRA(ProgressiveAdapters):
    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        if self.current is None or self.current == 0 or self.settings.olora_lambda == 0:
            return None
        r = self.settings.lora_rank
        start, end = self.current * r, (self.current + 1) * r
        total = None
        for name, tensor in params.items():
            if not is_lora_a(name):
                continue
            earlier = tensor[:start].detach()  # frozen anyway; detach keeps the graph small
            overlap = (earlier @ tensor[start:end].T).abs().sum()
            total = overlap if total is None else total + overlap
        return None if total is None else self.settings.olora_lambda * total
