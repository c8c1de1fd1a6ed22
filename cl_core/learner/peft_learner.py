"""The learner: a PyTorch + PEFT copy of the served architecture, on the same base weights, that trains LoRA.

vLLM has no backward pass, so training happens here and the result is exported in PEFT format, which vLLM loads
as-is (lora mode) or folds into its weights (merged mode). The parity tests check that the two compute the same
log-probabilities for the same adapter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cl_core.prompting import EncodedPair

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One training example: an encoded (prompt, response) and its weight in the loss."""

    pair: EncodedPair
    weight: float = 1.0


@dataclass(frozen=True)
class StepResult:
    loss: float
    skipped: bool
    reason: str = ""
    penalty: float = 0.0
    example_losses: tuple[float, ...] = ()


PenaltyFn = Callable[[Mapping[str, torch.Tensor]], "torch.Tensor | None"]


@dataclass(frozen=True)
class LearnerSettings:
    model_path: str
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    learning_rate: float = 1e-4
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "float32"
    """"float32", or "bfloat16": matmuls of the training loss in bf16 autocast (weights and optimizer stay fp32)."""


class LoRALearner:
    """Trains one LoRA adapter on a frozen base model; saves versions in PEFT format."""

    def __init__(self, settings: LearnerSettings) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.settings = settings
        self.device = _pick_device(settings.device)
        torch.manual_seed(settings.seed)
        self._rng = random.Random(settings.seed)
        base = AutoModelForCausalLM.from_pretrained(settings.model_path, dtype=torch.float32)
        base.to(self.device)
        lora = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                          target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")
        self.model = get_peft_model(base, lora)
        self.model.eval()
        self.optimizer = torch.optim.AdamW(self._trainable(), lr=settings.learning_rate, weight_decay=0.0)
        self.steps_done = 0
        self._sketch: tuple[int, torch.Tensor, torch.Tensor] | None = None

    # --- training -------------------------------------------------------------------------------------------
    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def loss(self, examples: Sequence[Example]) -> torch.Tensor:
        """Weighted mean over examples of each example's mean token NLL on its response."""
        return _weighted_mean(self.example_losses(examples, grad=True), examples)

    def example_losses(self, examples: Sequence[Example], grad: bool = False) -> torch.Tensor:
        """Mean response-token NLL per example (teacher forcing).

        The batch is left-padded so every response ends at the last position, and only the positions that
        predict response tokens go through the LM head (`logits_to_keep`): with a 49k vocabulary the head is
        about a fifth of a small model's compute, and the prompt positions never need it.
        """
        input_ids, labels, attention = self._batch(examples)
        keep = max(len(e.pair.response_ids) for e in examples) + 1
        with torch.set_grad_enabled(grad), self._autocast():
            logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=_positions(attention),
                                logits_to_keep=keep).logits[:, :-1].float()
            targets = labels[:, -(keep - 1):]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                                    reduction="none")
            mask = (targets != -100).float()
            return (nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def step(self, examples: Sequence[Example], learning_rate: float | None = None,
             penalty: PenaltyFn | None = None, masks: Mapping[str, torch.Tensor] | None = None) -> StepResult:
        """One optimizer step. A non-finite loss or gradient skips the update and leaves the weights untouched.

        `penalty` (an anti-forgetting term on the LoRA weights) is added to the loss. `masks` (bool, True = may
        change) freeze parts of the adapter: their gradients are zeroed and, because AdamW's moments could still
        move them, their values are restored bit-exactly after the step.
        """
        self.model.train()
        try:
            self.optimizer.zero_grad(set_to_none=True)
            per_example = self.example_losses(examples, grad=True)
            loss = _weighted_mean(per_example, examples)
            extra = penalty(self.lora_parameters()) if penalty is not None else None
            total = loss if extra is None else loss + extra
            losses = tuple(float(x) for x in per_example.detach())
            extra_value = 0.0 if extra is None else float(extra.detach())
            if not torch.isfinite(total):
                return StepResult(float(loss.detach()), True, "non-finite loss", extra_value, losses)
            total.backward()
            params = self.lora_parameters()
            frozen = {}
            for name, mask in (masks or {}).items():
                param = params[name]
                if param.grad is not None:
                    param.grad.mul_(mask)
                frozen[name] = (param.detach().clone(), mask)
            norm = torch.nn.utils.clip_grad_norm_(self._trainable(), self.settings.max_grad_norm)
            if not torch.isfinite(norm):
                self.optimizer.zero_grad(set_to_none=True)
                return StepResult(float(loss.detach()), True, "non-finite gradient", extra_value, losses)
            lr = self.settings.learning_rate if learning_rate is None else learning_rate
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            with torch.no_grad():
                for name, (before, mask) in frozen.items():
                    params[name].copy_(torch.where(mask, params[name], before))
            self.steps_done += 1
            return StepResult(float(loss.detach()), False, "", extra_value, losses)
        finally:
            self.model.eval()

    # --- what anti-forgetting methods and replay strategies may ask (read-only) -----------------------------
    def lora_parameters(self) -> dict[str, torch.Tensor]:
        """The trainable LoRA tensors by PEFT name (live: for penalties; never write them from outside)."""
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def squared_gradients(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Mean over examples of each one's squared loss gradient: the empirical diagonal Fisher (for EWC)."""
        params = self.lora_parameters()
        total = {name: torch.zeros_like(p) for name, p in params.items()}
        for example in examples:
            grads = torch.autograd.grad(self.loss([example]), list(params.values()), allow_unused=True)
            for name, grad in zip(params, grads, strict=True):
                if grad is not None:
                    total[name] += grad.detach().pow(2)
        return {name: value / max(1, len(examples)) for name, value in total.items()}

    def embeddings(self, examples: Sequence[Example]) -> torch.Tensor:
        """Mean last hidden state over each example's prompt+response, from the frozen base (adapter off), so
        embeddings of different rounds stay comparable (herding replay)."""
        input_ids, _, attention = self._batch(examples)
        with torch.no_grad(), self.model.disable_adapter():
            hidden = self.model(input_ids=input_ids, attention_mask=attention, position_ids=_positions(attention),
                                output_hidden_states=True, logits_to_keep=1).hidden_states[-1].float()
        mask = attention[..., None].float()
        return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).cpu()

    def gradient_sketches(self, examples: Sequence[Example], dim: int = 256) -> torch.Tensor:
        """Each example's LoRA gradient, count-sketched to `dim` numbers (random bucket and sign per weight,
        fixed per learner), so gradient-diversity replay compares directions without storing full gradients."""
        params = self.lora_parameters()
        if self._sketch is None or self._sketch[0] != dim:
            size = sum(p.numel() for p in params.values())
            generator = torch.Generator().manual_seed(self.settings.seed + 7)
            buckets = torch.randint(0, dim, (size,), generator=generator)
            signs = torch.randint(0, 2, (size,), generator=generator).float() * 2 - 1
            self._sketch = (dim, buckets.to(self.device), signs.to(self.device))
        _, buckets, signs = self._sketch
        rows = []
        for example in examples:
            grads = torch.autograd.grad(self.loss([example]), list(params.values()), allow_unused=True)
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                              for g, p in zip(grads, params.values(), strict=True)])
            rows.append(torch.zeros(dim, device=self.device).index_add_(0, buckets, flat * signs).cpu())
        return torch.stack(rows) if rows else torch.zeros((0, dim))

    def assign(self, values: Mapping[str, torch.Tensor]) -> None:
        """Set some LoRA tensors (e.g. PackNet's pruned weights), keeping their optimizer state."""
        params = self.lora_parameters()
        unknown = set(values) - set(params)
        if unknown:
            raise ValueError(f"not LoRA parameters of this learner: {sorted(unknown)[:3]}")
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))

    def token_margins(self, example: Example) -> list[float]:
        """Per response token: log-prob of the target minus the best other token, under teacher forcing.

        All margins > 0 means greedy decoding reproduces the response exactly.
        """
        input_ids, labels, attention = self._batch([example])
        with torch.no_grad():
            logp = self.model(input_ids=input_ids, attention_mask=attention).logits[0, :-1].float().log_softmax(-1)
        targets = labels[0, 1:]
        margins = []
        for pos in torch.nonzero(targets != -100).flatten().tolist():
            row = logp[pos].clone()
            target = int(targets[pos])
            best = float(row[target])
            row[target] = -math.inf
            margins.append(best - float(row.max()))
        return margins

    def generate_greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_token_id: int | None,
                        chunk: int = 16) -> list[list[int]]:
        """The adapter's greedy continuation of each encoded prompt (new token ids, up to and including the first
        `eos_token_id`), for methods that rehearse the model's own answers (`neighbourhood`). Read-only: the
        weights and the optimizer are untouched."""
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  eos_token_id=eos_token_id, pad_token_id=0 if eos_token_id is None else eos_token_id)
        out: list[list[int]] = []
        for i in range(0, len(prompts), chunk):
            rows = [list(p) for p in prompts[i:i + chunk]]
            length = max(len(r) for r in rows)
            input_ids = torch.zeros((len(rows), length), dtype=torch.long)
            attention = torch.zeros((len(rows), length), dtype=torch.long)
            for row, ids in enumerate(rows):  # left-padded, like training batches
                input_ids[row, length - len(ids):] = torch.tensor(ids)
                attention[row, length - len(ids):] = 1
            with torch.no_grad(), self._autocast():
                generated = self.model.generate(input_ids=input_ids.to(self.device),
                                                attention_mask=attention.to(self.device), generation_config=config)
            for tokens in generated[:, length:].tolist():
                if eos_token_id is not None and eos_token_id in tokens:
                    tokens = tokens[:tokens.index(eos_token_id) + 1]
                out.append(tokens)
        return out

    def token_logprobs(self, input_ids: Sequence[int]) -> list[float]:
        """Log-probability of each token given the previous ones (NaN at position 0), like vLLM's prompt logprobs."""
        ids = torch.tensor([list(input_ids)], device=self.device)
        with torch.no_grad():
            logp = self.model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        picked = logp.gather(1, ids[0, 1:, None])[:, 0]
        return [math.nan, *picked.tolist()]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.settings.precision == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _batch(self, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded ids, labels (-100 outside the response) and attention mask."""
        pad = 0
        length = max(len(e.pair.input_ids) for e in examples)
        input_ids = torch.full((len(examples), length), pad, dtype=torch.long)
        labels = torch.full((len(examples), length), -100, dtype=torch.long)
        attention = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            ids = example.pair.input_ids
            start = length - len(ids)
            input_ids[row, start:] = torch.tensor(ids)
            labels[row, start + len(example.pair.prompt_ids):] = torch.tensor(example.pair.response_ids)
            attention[row, start:] = 1
        return input_ids.to(self.device), labels.to(self.device), attention.to(self.device)

    def shuffled(self, items: Sequence[Any]) -> list[Any]:
        items = list(items)
        self._rng.shuffle(items)
        return items

    # --- adapters and state ---------------------------------------------------------------------------------
    def save_adapter(self, path: Path) -> Path:
        """Write the current LoRA in PEFT format to `path` atomically (temp dir renamed into place)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        self.model.save_pretrained(tmp, safe_serialization=True)
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = self.settings.model_path
        config_path.write_text(json.dumps(config, indent=2))
        os.replace(tmp, path)
        return path

    def load_adapter(self, path: Path) -> None:
        """Set the LoRA weights to a saved version (same rank and targets)."""
        from peft import set_peft_model_state_dict

        weights = load_file(str(Path(path) / "adapter_model.safetensors"), device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"adapter at {path} does not fit this learner: unexpected {result.unexpected_keys[:3]}")

    def lora_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.model.named_parameters() if p.requires_grad}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Optimizer state as tensors (safetensors) plus JSON metadata: no pickle."""
        names = {id(p): name for name, p in self.model.named_parameters() if p.requires_grad}
        tensors: dict[str, torch.Tensor] = {}
        steps: dict[str, float] = {}
        for param, state in self.optimizer.state.items():
            name = names[id(param)]
            for key, value in state.items():
                if key == "step":
                    steps[name] = float(value)
                else:
                    tensors[f"{name}::{key}"] = value.detach().cpu().contiguous()
        meta = {"steps_done": self.steps_done, "param_steps": steps,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups],
                "rng": list(self._rng.getstate()[1]), "rng_version": self._rng.getstate()[0]}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer.state.clear()
        for name, step in meta["param_steps"].items():
            state: dict[str, Any] = {"step": torch.tensor(step)}
            for key in tensors:
                if key.startswith(f"{name}::"):
                    state[key.split("::", 1)[1]] = tensors[key].to(self.device)
            self.optimizer.state[params[name]] = state
        for group, saved in zip(self.optimizer.param_groups, meta["param_groups"], strict=True):
            group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items()})
        self.steps_done = int(meta["steps_done"])
        self._rng.setstate((meta["rng_version"], tuple(meta["rng"]), None))

    def save_state(self, directory: Path) -> None:
        tensors, meta = self.state_dict()
        save_file(tensors, str(Path(directory) / "optimizer.safetensors"))
        (Path(directory) / "learner.json").write_text(json.dumps(meta))

    def load_state(self, directory: Path) -> None:
        tensors = load_file(str(Path(directory) / "optimizer.safetensors"))
        meta = json.loads((Path(directory) / "learner.json").read_text())
        self.load_state_dict(tensors, meta)


def _weighted_mean(per_example: torch.Tensor, examples: Sequence[Example]) -> torch.Tensor:
    weights = torch.tensor([e.weight for e in examples], dtype=per_example.dtype, device=per_example.device)
    return (per_example * weights).sum() / weights.sum().clamp_min(1e-8)


def _positions(attention: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding must not shift positions)."""
    return (attention.cumsum(-1) - 1).clamp_min(0)


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("ContinualConfig.device='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(device)
