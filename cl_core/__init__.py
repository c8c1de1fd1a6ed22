"""cl_core: continual learning for LLMs served by vLLM.

    from cl_core import ContinualLLM, ContinualConfig
    model = ContinualLLM(ContinualConfig(lora_rank=16))
    model.learn_from_correction(prompt=..., bad_response=..., good_response=...)

Importing cl_core is cheap: vLLM and torch load when a model is created.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cl_core.config import ContinualConfig
from cl_core.errors import (
    CheckpointError,
    ConfigError,
    ContinualError,
    InvalidInputError,
    ModelNotFoundError,
    NothingToLearnError,
    PublishError,
)
from cl_core.reports import AdapterVersion, CorrectionReport, LearnReport, RetentionReport, ScoreResult

if TYPE_CHECKING:
    from cl_core.continual import ContinualLLM
    from cl_core.store import ExperienceStore

__all__ = [
    "AdapterVersion", "CheckpointError", "ConfigError", "ContinualConfig", "ContinualError", "ContinualLLM",
    "CorrectionReport", "ExperienceStore", "InvalidInputError", "LearnReport", "ModelNotFoundError",
    "NothingToLearnError", "PublishError", "RetentionReport", "ScoreResult",
]


def __getattr__(name: str) -> Any:
    # Lazy: `import cl_core` must not pull in torch/vllm (config validation and CLIs start fast).
    if name == "ContinualLLM":
        from cl_core.continual import ContinualLLM

        return ContinualLLM
    if name == "ExperienceStore":
        from cl_core.store import ExperienceStore

        return ExperienceStore
    raise AttributeError(f"module 'cl_core' has no attribute {name!r}")
