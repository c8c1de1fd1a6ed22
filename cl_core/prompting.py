"""One encoding of (prompt, response) pairs, shared by vLLM and the learner.

Parity between what the learner trains and what vLLM serves starts here: both sides turn a user prompt into the
same token ids (the model's chat template when it has one) and append the response tokens the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl_core.errors import ConfigError, InvalidInputError


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of a chat-formatted prompt and of the response that follows it."""

    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def check_text(name: str, value: Any) -> str:
    """Reject non-strings and empty/whitespace-only text with an error naming the argument."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise InvalidInputError(f"{name} is empty: give non-empty text")
    return value


def format_prompt(tokenizer: Any, prompt: str) -> str:
    """The text the model sees for a user prompt: its chat template with a generation prompt, if it has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    # The chat template already contains the special tokens; adding BOS again would shift every position.
    add_special = not getattr(tokenizer, "chat_template", None)
    return list(tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=add_special)["input_ids"])


def encode_pair(tokenizer: Any, prompt: str, response: str, add_eos: bool = True) -> EncodedPair:
    """Encode a prompt and its response; `add_eos` ends the response so generation learns to stop there."""
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        response_ids.append(int(tokenizer.eos_token_id))
    return EncodedPair(encode_prompt(tokenizer, prompt), response_ids)


def read_prompt_list(path: Path, setting: str, choices: str, what: str = "questions",
                     keys: Sequence[str] = ("questions",)) -> list[str]:
    """The prompts of a JSON file holding a list of strings (or an object with one of `keys`), de-duplicated in
    order. `setting` (e.g. "neighbourhood_pool='x.json'") and `choices` ("'builtin' or a JSON file") name what the
    user set and what they may give in the error."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{setting}: cannot read {path} as JSON ({exc}); give {choices} holding a list of "
                          f"{what}") from exc
    items = next((data[k] for k in keys if k in data), None) if isinstance(data, dict) else data
    if not isinstance(items, list) or not items or not all(isinstance(q, str) and q.strip() for q in items):
        raise ConfigError(f"{setting}: {path} must hold a non-empty list of {what[:-1]} strings "
                          f"(or {{\"{keys[0]}\": [...]}})")
    return list(dict.fromkeys(items))
