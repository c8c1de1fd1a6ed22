"""vLLM worker extension: fold a LoRA adapter into the served base weights in place (`merged` serving mode).

vLLM mixes this class into its worker (`worker_extension_cls`), so `collective_rpc("cl_merge_adapter", ...)` runs
it next to the model, in the engine process, with no restart. Only the adapter's A/B matrices cross the process
boundary (a few MB, read from the adapter directory); the base weights of the touched layers are read once from
the model's safetensors and cached, so every merge is `W = W_base + scale * B @ A` computed exactly, never an
accumulation of bf16 round-off, and merging `None` restores the pristine base.

vLLM fuses projections (`q/k/v_proj` -> `qkv_proj`, `gate/up_proj` -> `gate_up_proj`, per the model's
`packed_modules_mapping`), and its CPU backend repacks each linear weight for oneDNN and drops the plain tensor,
so after writing a weight the layer's GEMM is dispatched again. Tensor parallelism > 1 is not supported here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

PEFT_PREFIX = "base_model.model."


class MergedAdapterExtension:
    """Methods added to every vLLM worker; state lives in `self._cl_merge` (base weight cache, merged set)."""

    def cl_merge_adapter(self, adapter_dir: str | None, base_model_dir: str) -> int:
        """Serve `base + adapter` (or the pristine base when `adapter_dir` is None); returns layers rewritten."""
        from vllm.distributed import get_tensor_model_parallel_world_size
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
        from vllm.platforms import current_platform

        if get_tensor_model_parallel_world_size() != 1:
            raise RuntimeError("merged serving mode supports tensor_parallel_size=1 only; use serving_mode='lora'")
        state = self.__dict__.setdefault("_cl_merge", {"base": {}, "merged": set(), "files": None})
        model = self.model_runner.get_model()
        modules = dict(model.named_modules())
        lora, scale = _lora_factors(adapter_dir) if adapter_dir else ({}, 1.0)
        packed: dict[str, list[str]] = dict(getattr(model, "packed_modules_mapping", {}) or {})
        fused_of = {sub: (fused, i) for fused, subs in packed.items() for i, sub in enumerate(subs)}

        targets: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for hf_name, factors in lora.items():
            prefix, leaf = hf_name.rsplit(".", 1)
            fused, _ = fused_of.get(leaf, (leaf, 0))
            vllm_name = f"{prefix}.{fused}"
            if vllm_name not in modules:
                raise RuntimeError(f"adapter module {hf_name} has no counterpart {vllm_name} in the served model; "
                                   "merged mode cannot serve this adapter, use serving_mode='lora'")
            targets.setdefault(vllm_name, {})[leaf] = factors

        for vllm_name in set(targets) | state["merged"]:
            layer = modules[vllm_name]
            leaf = vllm_name.rsplit(".", 1)[1]
            subs = packed.get(leaf, [leaf])
            base = state["base"].get(vllm_name)
            if base is None:
                base = self._cl_read_base(state, base_model_dir, vllm_name, subs)
                state["base"][vllm_name] = base
            parts = targets.get(vllm_name, {})
            weight = base.clone()
            start = 0
            for sub, rows in zip(subs, _row_sizes(base, subs, parts), strict=True):
                if sub in parts:
                    b, a = parts[sub]
                    # One fused kernel: base + scale * B @ A, accumulated in fp32, rounded once to the served dtype.
                    torch.addmm(base[start:start + rows], b.to(base.dtype), a.to(base.dtype), alpha=scale,
                                out=weight[start:start + rows])
                start += rows
            if current_platform.is_cpu():
                layer.weight = torch.nn.Parameter(weight, requires_grad=False)
                dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
            else:
                layer.weight.data.copy_(weight.to(layer.weight.device))
        state["merged"] = set(targets)
        return len(targets)

    def _cl_read_base(self, state: dict[str, Any], base_model_dir: str, vllm_name: str,
                      subs: list[str]) -> torch.Tensor:
        if state["files"] is None:
            state["files"] = _tensor_index(Path(base_model_dir))
        prefix = vllm_name.rsplit(".", 1)[0]
        dtype = self.model_runner.model_config.dtype
        tensors = []
        for sub in subs:
            key = f"{prefix}.{sub}.weight"
            path = state["files"].get(key)
            if path is None:
                raise RuntimeError(f"base weight {key} not found in {base_model_dir}")
            with safe_open(path, framework="pt") as handle:
                tensors.append(handle.get_tensor(key).to(dtype))
        return torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0]


def _row_sizes(base: torch.Tensor, subs: list[str], parts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    """Rows of each sub-projection in a fused weight: from the LoRA B where known, the rest shared equally."""
    known = {sub: parts[sub][0].shape[0] for sub in subs if sub in parts}
    unknown = [sub for sub in subs if sub not in known]
    rest = (base.shape[0] - sum(known.values())) // len(unknown) if unknown else 0
    sizes = [known.get(sub, rest) for sub in subs]
    if sum(sizes) != base.shape[0]:
        raise RuntimeError(f"cannot split fused weight of {base.shape[0]} rows into {subs}: give every "
                           "sub-projection of a fused layer a LoRA (target all of q/k/v and gate/up)")
    return sizes


def _tensor_index(model_dir: Path) -> dict[str, str]:
    index: dict[str, str] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                index[key] = str(path)
    return index


def _lora_factors(adapter_dir: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """(B, A) per adapted module, keyed by the module's Hugging Face name, and the LoRA scale."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    rank = config["r"]
    scale = config["lora_alpha"] / (rank ** 0.5 if config.get("use_rslora") else rank)
    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    factors = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        name = key.split(".lora_A.")[0]
        name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        factors[name] = (weights[key.replace(".lora_A.", ".lora_B.")], a)
    return factors, float(scale)
