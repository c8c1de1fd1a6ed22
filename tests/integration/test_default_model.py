"""The embedded default model end to end: prepare, serve, correct a wrong fact, keep unrelated knowledge."""

import pytest

from cl_core import ContinualConfig
from cl_core.demo import run_demo
from cl_core.models import default_model_dir, prepare_default_model

pytestmark = [pytest.mark.integration, pytest.mark.default_model]


def test_default_model_is_prepared_and_verified():
    path = prepare_default_model()
    assert path == default_model_dir()
    manifest = (path / "cl_core_model.json").read_text()
    assert "Paris" in manifest


def test_demo_correction_sticks_and_unrelated_knowledge_is_kept():
    result = run_demo(ContinualConfig(max_model_len=1024))
    assert result.before and "Ankara" not in result.before
    assert result.correction_stuck, result.after
    assert result.version == 1
    assert result.retention_kept, result.retention
    japan = next(p for p in result.retention if "Japan" in str(p["question"]))
    assert "Tokyo" in str(japan["after"])
    # The reference answers stay likely, not just the greedy text.
    for probe in result.retention:
        assert float(probe["ref_logprob_after"]) > float(probe["ref_logprob_before"]) - 0.5
