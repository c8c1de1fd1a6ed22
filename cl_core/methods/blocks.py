"""Rank blocks: how per-task methods (progressive, O-LoRA, PackNet) carve one LoRA adapter into task parts.

An adapter of rank `lora_rank * max_tasks` is a sum of `max_tasks` rank-`lora_rank` adapters: block k is rows
`k*r:(k+1)*r` of every `lora_A` (shape [R, in]) and the same columns of every `lora_B` (shape [out, R]). PEFT
initialises A randomly and B to zero, so an untrained block adds nothing, and vLLM serves the whole sum as one
ordinary LoRA (scale alpha/R, with alpha grown by the same factor so each block keeps the usual scale).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def is_lora_a(name: str) -> bool:
    return ".lora_A." in name


def is_lora_b(name: str) -> bool:
    return ".lora_B." in name


def partner(name: str) -> str:
    """The lora_B name of a lora_A parameter and back."""
    return name.replace(".lora_A.", ".lora_B.") if is_lora_a(name) else name.replace(".lora_B.", ".lora_A.")


def rank_of(name: str, tensor: torch.Tensor) -> int:
    """Total rank R of the adapter a LoRA tensor belongs to."""
    return tensor.shape[0] if is_lora_a(name) else tensor.shape[1]


def component_mask(name: str, tensor: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """Bool mask over `tensor` that is True on the given rank components (a bool vector of length R)."""
    if is_lora_a(name):
        return components[:, None].expand_as(tensor)
    if is_lora_b(name):
        return components[None, :].expand_as(tensor)
    return torch.ones_like(tensor, dtype=torch.bool)


def block_components(total_rank: int, block: int, block_rank: int, device: torch.device) -> torch.Tensor:
    components = torch.zeros(total_rank, dtype=torch.bool, device=device)
    components[block * block_rank:(block + 1) * block_rank] = True
    return components


def block_masks(params: Mapping[str, torch.Tensor], block: int, block_rank: int) -> dict[str, torch.Tensor]:
    """Masks that let only rank block `block` of every LoRA tensor change."""
    masks = {}
    for name, tensor in params.items():
        components = block_components(rank_of(name, tensor), block, block_rank, tensor.device)
        masks[name] = component_mask(name, tensor, components)
    return masks
