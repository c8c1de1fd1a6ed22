import pytest

from cl_core import ModelNotFoundError
from cl_core.models import model_fingerprint, resolve_model


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_broken_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelNotFoundError, match="broken config.json"):
        resolve_model(str(tmp_path))


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="no weights"):
        resolve_model(str(tmp_path))


def test_hub_ids_pass_through():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_fingerprint_tells_same_architecture_different_weights_apart(tiny_model_dir, other_tiny_model_dir):
    assert model_fingerprint(str(tiny_model_dir)) == model_fingerprint(str(tiny_model_dir))
    assert model_fingerprint(str(tiny_model_dir)) != model_fingerprint(str(other_tiny_model_dir))
