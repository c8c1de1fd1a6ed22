"""Shared fixtures: a tiny random Llama built once per session, and one vLLM engine per serving mode."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import TINY_MAX_LEN, build_tiny_model, tiny_config


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def other_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture, different weights: a different base model."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-other") / "model", seed=1)


def _engine(model_dir: Path, mode: str):
    from cl_core.engine import EngineSettings, VLLMEngine

    return VLLMEngine(EngineSettings(model_path=str(model_dir), serving_mode=mode, dtype="float32",
                                     max_model_len=TINY_MAX_LEN, max_lora_rank=8, kv_cache_gib=0.1,
                                     max_loras=2 if mode == "lora" else 1))


@pytest.fixture(scope="session")
def lora_engine(tiny_model_dir: Path) -> Iterator[object]:
    engine = _engine(tiny_model_dir, "lora")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def merged_engine(tiny_model_dir: Path) -> Iterator[object]:
    engine = _engine(tiny_model_dir, "merged")
    yield engine
    engine.shutdown()


@pytest.fixture
def make_model(tiny_model_dir: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable]:
    """`make_model(mode="lora", **config_changes)` -> a ContinualLLM on the session's engine for that mode."""
    from cl_core import ContinualLLM

    made = []

    def factory(mode: str = "lora", **changes: object):
        engine = request.getfixturevalue(f"{mode}_engine")
        work = tmp_path / f"m{len(made)}"
        model = ContinualLLM(tiny_config(tiny_model_dir, work, serving_mode=mode, **changes), engine=engine)
        made.append(model)
        return model

    yield factory
    for model in made:
        model.close()
