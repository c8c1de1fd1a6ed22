"""ContinualLLM trains, versions and checkpoints adapters with no vLLM in the process (the pipeline's train task)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_model import tiny_config

from cl_core import ContinualLLM
from cl_core.engine import DetachedEngine
from cl_core.errors import ServingUnavailableError


def test_detached_training_checkpoints_and_resumes(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_model_dir, tmp_path, anti_forgetting=("ewc", "replay"))
    model = ContinualLLM(config, engine=DetachedEngine.for_config(config))
    for i in range(8):
        model.add_experience(f"question {i}", f"answer {i}", task="a")
    report = model.learn()
    assert report.version is not None and report.version.version == 1
    assert (Path(report.version.path) / "adapter_model.safetensors").exists()
    correction = model.learn_from_correction("What color?", "red", "blue")
    assert correction.version is not None and correction.version.parent == 1
    assert model.engine.published[-1].name == correction.version.name
    model.save_checkpoint(tmp_path / "ckpt")
    model.close()

    restored = ContinualLLM.load_checkpoint(tmp_path / "ckpt", engine=DetachedEngine.for_config(config),
                                            work_dir=str(tmp_path / "restored"))
    assert restored.current_version.version == 2
    assert (tmp_path / "ckpt" / "methods").is_dir()  # the EWC Fisher travels with the checkpoint
    assert restored.store.count() == 9  # 8 experiences + the correction
    restored.close()


def test_inference_on_a_detached_model_says_where_to_ask(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_model_dir, tmp_path)
    model = ContinualLLM(config, engine=DetachedEngine.for_config(config))
    try:
        for call in (lambda: model.generate("hi"), lambda: model.score("hi", "there"), lambda: model.embed("hi")):
            with pytest.raises(ServingUnavailableError, match="vLLM server"):
                call()
    finally:
        model.close()
