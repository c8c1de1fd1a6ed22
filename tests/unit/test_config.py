import math

import pytest

from cl_core import ConfigError, ContinualConfig

BAD_VALUES = [
    ("lora_rank", 0), ("lora_rank", -4), ("lora_rank", 2.5), ("lora_rank", True), ("lora_rank", 1024),
    ("lora_alpha", -1.0), ("lora_dropout", 1.0), ("target_modules", ()), ("num_adapters", 0),
    ("num_adapters", 2.5), ("adapter_routing", "random"), ("router_calibration", ""), ("learning_mode", "sometimes"),
    ("update_frequency", 0), ("batch_size", 0), ("learning_rate", 0.0), ("learning_rate", math.nan),
    ("learning_rate", "1e-4"), ("max_steps", 0), ("anti_forgetting", "magic"), ("anti_forgetting", ()),
    ("anti_forgetting", ("none", "replay")), ("ewc_lambda", -0.1), ("replay_ratio", 1.0), ("replay_ratio", -0.1),
    ("buffer_size", 0), ("priority_function", "vibes"), ("serving_mode", "fast"), ("dtype", "int8"),
    ("max_model_len", 8), ("seed", -1), ("kv_cache_gib", 0), ("device", "tpu"), ("model", ""), ("model", 3),
    ("enforce_eager", "yes"), ("anti_forgetting", ("olora", "packnet")), ("anti_forgetting", ("ewc", "ewc")),
    ("ewc_gamma", 0.0), ("ewc_gamma", 1.5), ("ewc_samples", 0), ("l2_lambda", -1.0), ("olora_lambda", math.inf),
    ("max_tasks", 0), ("replay_strategy", "best"), ("replay_memory", 0),
]


def test_defaults_are_valid_and_use_the_embedded_model():
    config = ContinualConfig()
    assert config.model == "smollm2-135m-instruct"
    assert config.serving_mode == "lora"
    assert config.effective_lora_alpha == 2 * config.lora_rank


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_value_names_field_and_value(field, value):
    with pytest.raises(ConfigError) as info:
        ContinualConfig(**{field: value})
    message = str(info.value)
    assert f"ContinualConfig.{field}=" in message
    assert "invalid" in message


def test_a_bank_is_accepted_in_lora_mode_and_refused_in_merged_mode():
    assert ContinualConfig(num_adapters=4, adapter_routing="task_id").num_adapters == 4
    with pytest.raises(ConfigError, match="serving_mode='lora'"):
        ContinualConfig(num_adapters=2, serving_mode="merged")


def test_unknown_router_lists_the_registered_ones():
    with pytest.raises(ConfigError, match="task_id"):
        ContinualConfig(num_adapters=2, adapter_routing="random")


def test_choice_errors_list_allowed_values():
    with pytest.raises(ConfigError, match="allowed values: lora, merged"):
        ContinualConfig(serving_mode="fast")


@pytest.mark.parametrize("method", ["ewc", "l2", "packnet", "progressive", "olora"])
def test_every_method_combines_with_replay(method):
    config = ContinualConfig(anti_forgetting=[method, "replay"], lora_rank=8, max_tasks=4)
    blocks = 4 if method in ("packnet", "progressive", "olora") else 1
    assert config.rank_blocks == blocks
    assert config.adapter_rank == 8 * blocks


def test_per_task_blocks_must_fit_vllms_largest_rank():
    with pytest.raises(ConfigError, match="max_tasks.*512"):
        ContinualConfig(anti_forgetting="olora", lora_rank=256, max_tasks=4)


def test_list_inputs_are_normalized_and_round_trip():
    config = ContinualConfig(anti_forgetting=["replay"], target_modules=["q_proj", "v_proj"], lora_rank=4)
    assert config.anti_forgetting_methods == ("replay",)
    again = ContinualConfig.from_dict(config.to_dict())
    assert again == config


def test_unknown_fields_are_named():
    with pytest.raises(ConfigError, match="unknown ContinualConfig field.*lora_rnak"):
        ContinualConfig().replace(lora_rnak=8)
    with pytest.raises(ConfigError, match="bogus"):
        ContinualConfig.from_dict({"bogus": 1})


def test_replace_validates():
    with pytest.raises(ConfigError, match="batch_size"):
        ContinualConfig().replace(batch_size=-1)
