"""The pipeline's bank bundle: what one registered version of a bank holds, and how served names stay unique."""

import json
from pathlib import Path

import pytest

from cl_core.bank.manifest import BankManifest, ManifestAdapter
from cl_core.errors import CheckpointError
from cl_core.pipeline.bank import bank_candidate, load_bundle, version_floor, write_bundle


def _checkpoint(root: Path, lineages: dict[str, int], router: str = "embedding") -> Path:
    """A bank checkpoint's files as `ContinualLLM.save_checkpoint` writes them (adapter files are stand-ins)."""
    root.mkdir(parents=True)
    entries = []
    for name, version in lineages.items():
        for v in range(1, version + 1):
            (root / "adapters" / name / f"v{v}").mkdir(parents=True)
            (root / "adapters" / name / f"v{v}" / "adapter_model.safetensors").write_text(f"{name} v{v}")
        entries.append({"name": name, "status": "active", "next_version": version + 1, "current_version": version,
                        "versions": []})
    (root / "bank" / "router").mkdir(parents=True)
    (root / "bank" / "router" / "router.json").write_text("{}")
    (root / "manifest.json").write_text(json.dumps({"format": 1, "bank": {"router": router, "lineages": entries}}))
    return root


def test_a_candidate_knows_which_adapters_its_round_changed(tmp_path):
    champion = _checkpoint(tmp_path / "champion", {"facts": 2, "intent": 1})
    candidate = bank_candidate(_checkpoint(tmp_path / "candidate", {"facts": 2, "intent": 3, "new": 1}), "m",
                               champion)
    assert candidate.changed == ("intent", "new")
    assert bank_candidate(tmp_path / "candidate", "m", None).changed == ("facts", "intent", "new")


def test_the_bundle_holds_the_serving_version_of_every_adapter_and_the_router(tmp_path):
    candidate = bank_candidate(_checkpoint(tmp_path / "ckpt", {"facts": 2, "intent": 1}), "base-model", None)
    manifest = write_bundle(candidate, tmp_path / "bundle", metadata={"model_name": "m"})
    assert {a.name: a.version for a in manifest.adapters} == {"facts": 2, "intent": 1}
    loaded = load_bundle(tmp_path / "bundle")
    assert Path(loaded.adapter("facts").path) == (tmp_path / "bundle" / "facts").absolute()
    assert (Path(loaded.adapter("facts").path) / "adapter_model.safetensors").read_text() == "facts v2"
    assert Path(loaded.router_dir).is_dir() and loaded.metadata["model_name"] == "m"
    assert loaded.served_names("continual") == {"facts": "continual-facts@v2", "intent": "continual-intent@v1"}
    write_bundle(candidate, tmp_path / "bundle")  # rewriting replaces it whole
    assert not list(tmp_path.glob(".bundle.tmp*"))


def test_version_floor_is_the_highest_version_any_bundle_used():
    a = BankManifest("m", "embedding", None, (ManifestAdapter("facts", 3, "x"), ManifestAdapter("intent", 1, "y")))
    b = BankManifest("m", "embedding", None, (ManifestAdapter("facts", 2, "x"),))
    assert version_floor([a, b]) == {"facts": 3, "intent": 1}
    assert version_floor([]) == {}


def test_a_single_adapter_checkpoint_is_not_a_bank(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "versions": []}))
    with pytest.raises(CheckpointError, match="not a bank checkpoint"):
        bank_candidate(tmp_path, "m", None)
