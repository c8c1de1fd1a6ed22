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


# --- gate rules: parsed with the rest of the config, before any training -------------------------------------------
def test_gate_rules_are_parsed_when_the_config_is_loaded() -> None:
    from cl_core.pipeline.gate import GateRules

    default = PipelineConfig.load()
    assert isinstance(default.gate, GateRules) and default.gate.max_probe_regression == 0.05
    off = PipelineConfig.load(gate={"max_probe_regression": None})
    assert off.gate.max_probe_regression is None
    assert off.gate.min_corrections_exact == GateRules().min_corrections_exact  # the override replaces the section


@pytest.mark.parametrize(("gate", "message"), [
    ({"max_probe_regresion": 0.1}, r"pipeline\.yaml: gate: unknown key\(s\) max_probe_regresion; known keys: "),
    ({"max_retention_drop": "a lot"}, r"gate\.max_retention_drop must be a number"),
    ({"min_heldout_gain": None, "min_corrections_exact": None}, "both gain rules"),
    ({"require_metrics": ["heldout_exakt"]}, "unknown metric 'heldout_exakt'"),
    (["max_probe_regression"], "expected a mapping"),
])
def test_a_bad_gate_rule_fails_at_load_naming_the_key(gate: object, message: str) -> None:
    from cl_core.pipeline.gate import GateConfigError

    with pytest.raises(GateConfigError, match=message) as info:
        PipelineConfig.load(gate=gate)
    assert isinstance(info.value, ConfigError)


def test_a_gate_section_in_yaml_is_parsed_and_null_means_the_defaults(tmp_path) -> None:
    from cl_core.pipeline.gate import GateRules

    path = tmp_path / "pipeline.yaml"
    path.write_text("gate:\n  min_heldout_gain: 0.02\n  require_metrics: [heldout_exact]\n")
    rules = PipelineConfig.load(path).gate
    assert (rules.min_heldout_gain, rules.require_metrics) == (0.02, ("heldout_exact",))
    path.write_text("gate:\n")
    assert PipelineConfig.load(path).gate == GateRules()
    path.write_text("gate:\n  max_retention_drop: 2\n")
    with pytest.raises(ConfigError, match=f"{path}: gate.max_retention_drop must be a finite number"):
        PipelineConfig.load(path)


def test_a_config_built_directly_with_a_gate_mapping_gets_rules() -> None:
    import dataclasses

    from cl_core.pipeline.gate import GateRules

    config = PipelineConfig.load()
    built = dataclasses.replace(config, gate={"max_retention_drop": 0.1})
    assert built.gate == GateRules(max_retention_drop=0.1)
    with pytest.raises(ConfigError, match="unknown key"):
        dataclasses.replace(config, gate={"typo": 1})
