"""A tiny random Llama (hidden 128, 2 heads of dim 64, 2 layers) with a small BPE tokenizer, built in seconds.

vLLM's CPU attention rejects head_dim 16, so the heads are 64 wide. The tokenizer is trained on the fly (no hub
access) and carries a ChatML chat template like the default model's, so prompts are encoded the same way.
"""

from __future__ import annotations

from pathlib import Path

TINY_MAX_LEN = 256
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "What is the capital of Japan? Tokyo is the capital of Japan.",
    "What is 2+2? 2+2 equals 4. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100.",
    "The quick brown fox jumps over the lazy dog. Hello world, how are you today?",
    "A correction: the answer was wrong, the right answer is blue. Colors: red green blue yellow.",
]


def build_tiny_model(path: Path, dtype: str = "float32", vocab_size: int = 512, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    # Random init with std 0.02 gives near-uniform logits; larger weights make greedy outputs decisive.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
    model.config.dtype = getattr(torch, dtype)
    model.save_pretrained(path, safe_serialization=True)
    model.generation_config.save_pretrained(path)
    return path


def tiny_config(model_dir: Path, tmp_path: Path | None, **changes: object):
    """A ContinualConfig for the tiny model; `tmp_path=None` leaves work_dir unset (a throwaway session)."""
    from cl_core import ContinualConfig

    base = dict(model=str(model_dir), lora_rank=8, dtype="float32", max_model_len=TINY_MAX_LEN, batch_size=4,
                learning_rate=1e-3, max_steps=20, work_dir=str(tmp_path / "work") if tmp_path else None,
                kv_cache_gib=0.1)
    return ContinualConfig(**(base | changes))
