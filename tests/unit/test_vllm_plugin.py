"""The vLLM plugin that keeps base-model rows of a mixed LoRA batch free of any adapter's delta (vLLM-CPU ops)."""

import importlib.metadata

import torch

from cl_core.engine import vllm_plugin


def _ops():
    from vllm.lora.ops.torch_ops import lora_ops

    vllm_plugin.register()
    return lora_ops


def test_the_plugin_is_registered_with_vllm():
    names = {e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert "cl_core.engine.vllm_plugin:register" in names


def test_rows_without_a_lora_get_no_delta_and_valid_rows_are_unchanged():
    ops = _ops()
    torch.manual_seed(0)
    tokens, hidden, rank, slots = 4, 8, 2, 2
    x = torch.randn(tokens, hidden)
    lora_a = torch.randn(slots, 1, rank, hidden)
    lora_b = torch.randn(slots, 1, hidden, rank)
    indices = torch.tensor([0, -1, 1, -1])
    shrunk = torch.full((tokens, rank), 7.0)
    ops.bgmv_shrink(x, lora_a, shrunk, indices, 1.0)
    assert torch.equal(shrunk[1], torch.zeros(rank)) and torch.equal(shrunk[3], torch.zeros(rank))
    assert torch.allclose(shrunk[0], lora_a[0, 0] @ x[0]) and torch.allclose(shrunk[2], lora_a[1, 0] @ x[2])
    out = torch.ones(tokens, hidden)
    ops.bgmv_expand(torch.randn(tokens, rank), lora_b, out, indices, add_inputs=True)
    assert torch.equal(out[1], torch.ones(hidden)) and torch.equal(out[3], torch.ones(hidden))
    assert not torch.equal(out[0], torch.ones(hidden))
    sliced = torch.ones(tokens, 2 * hidden)
    ops.bgmv_expand_slice(torch.randn(tokens, rank), lora_b, sliced, indices, hidden, hidden, add_inputs=True)
    assert torch.equal(sliced[1], torch.ones(2 * hidden)) and not torch.equal(sliced[0], torch.ones(2 * hidden))
    # sgmv (prefill) goes through the same ops: base rows stay base there too.
    prefill = torch.full((tokens, rank), 7.0)
    ops.sgmv_shrink(x, lora_a, prefill, torch.tensor([0, 2]), torch.tensor([2, 2]), torch.tensor([0, -1]), 2, 2,
                    tokens, 1.0)
    assert torch.equal(prefill[2:], torch.zeros(2, rank)) and not torch.equal(prefill[:2], torch.zeros(2, rank))


def test_register_is_idempotent():
    ops = _ops()
    first = ops.bgmv_shrink
    vllm_plugin.register()
    assert ops.bgmv_shrink is first
