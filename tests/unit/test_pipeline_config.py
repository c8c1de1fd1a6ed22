"""The pipeline config: training threads (a learner sharing its cores with vLLM must not stall both)."""

from __future__ import annotations

import pytest
import torch

from cl_core.errors import ConfigError
from cl_core.pipeline.config import PipelineConfig, training_threads
from cl_core.pipeline.training import torch_threads


@pytest.mark.parametrize("urls", [["http://127.0.0.1:8000"], ["http://localhost:8000/v1"],
                                  ["http://vllm-0.internal:8000", "http://127.0.0.2:8001"], ["http://[::1]:8000"],
                                  ["http://0.0.0.0:8000"]])
def test_auto_leaves_half_the_cores_to_a_vllm_server_on_this_machine(urls: list[str]) -> None:
    assert training_threads("auto", urls, cores=8) == 4
    assert training_threads("auto", urls, cores=2) == 1
    assert training_threads("auto", urls, cores=1) == 1


def test_auto_uses_every_core_when_vllm_runs_elsewhere() -> None:
    assert training_threads("auto", ["http://vllm-0.internal:8000", "https://10.0.0.5:8000"], cores=8) == 8


def test_an_explicit_count_is_used_as_given() -> None:
    assert training_threads(3, ["http://127.0.0.1:8000"], cores=8) == 3


def test_the_default_config_trains_with_auto_threads() -> None:
    assert PipelineConfig.load().training.threads == "auto"
    assert PipelineConfig.load(training={"threads": 2}).training.threads == 2


@pytest.mark.parametrize("bad", [0, -1, "two", 1.5, True])
def test_bad_thread_settings_name_the_field_and_the_fix(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"training\.threads must be \"auto\" or an integer"):
        PipelineConfig.load(training={"threads": bad})


def test_torch_threads_are_restored_after_training() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("a failed round")
    assert torch.get_num_threads() == before
