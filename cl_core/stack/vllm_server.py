"""vLLM's OpenAI-compatible server (`vllm serve`) with LoRA on and runtime adapter loading enabled.

The base model is served as `base` (the environment contract); adapters are loaded at run time through
`/v1/load_lora_adapter` (needs `VLLM_ALLOW_RUNTIME_LORA_UPDATING`) and the prefix cache is reset through
`/reset_prefix_cache` (a dev-mode endpoint: `VLLM_SERVER_DEV_MODE=1`). The KV cache size is given in bytes
(`--kv-cache-memory-bytes`; on CPU the legacy `VLLM_CPU_KVCACHE_SPACE` would override it in whole GiB, so it is not
set). On machines with at most 4 cores no core is reserved for vLLM's scheduler, as the in-process engine does
(`cl_core.engine.vllm_engine`): reserving one of two cores halves throughput.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cl_core.stack.service import Service, http_ok

SERVED_MODEL_NAME = "base"


class VLLMServer(Service):
    """`vllm serve MODEL --served-model-name base --enable-lora ...`; healthy when /health and /v1/models answer."""

    name = "vllm"
    port_env = "CL_VLLM_PORT"
    start_timeout = 300.0
    stop_grace = 15.0

    def __init__(self, state_dir: Path, port: int, model: str, dtype: str = "bfloat16", max_model_len: int = 2048,
                 max_lora_rank: int = 16, max_loras: int = 4, kv_cache_gib: float = 1.0,
                 extra_args: tuple[str, ...] = ()) -> None:
        super().__init__(state_dir, port)
        self.model = model
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self.max_loras = max_loras
        self.kv_cache_gib = kv_cache_gib
        self.extra_args = extra_args

    def prepare(self) -> None:
        local = Path(self.model)
        if self.model.startswith(("/", ".", "~")) and not (local.expanduser() / "config.json").is_file():
            raise FileNotFoundError(f"vLLM model directory {self.model} has no config.json: set CL_VLLM_MODEL "
                                    "(or --vllm-model) to a Hugging Face model directory")

    def environment(self) -> dict[str, str]:
        env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_SERVER_DEV_MODE": "1",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
        small_cpu = _cpu_only() and len(os.sched_getaffinity(0)) <= 4
        if small_cpu and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        return env

    def command(self) -> list[str]:
        return [
            # `python -m` rather than the `vllm` script: that one asks for the `vllm` distribution's version,
            # which fails when the installed distribution is `vllm-cpu`
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--served-model-name", SERVED_MODEL_NAME, "--dtype", self.dtype, "--max-model-len",
            str(self.max_model_len), "--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
            "--max-loras", str(self.max_loras), "--kv-cache-memory-bytes", str(int(self.kv_cache_gib * 2**30)),
            *self.extra_args,
        ]

    @property
    def openai_url(self) -> str:
        """The OpenAI base URL (`.../v1`); `url` is the server root (what `CL_VLLM_URLS` lists)."""
        return f"{self.url}/v1"

    def healthy(self) -> bool:
        if not http_ok(f"{self.url}/health"):
            return False
        try:
            import httpx

            models = httpx.get(f"{self.url}/v1/models", timeout=2.0).json()
        except Exception:
            return False
        return any(m.get("id") == SERVED_MODEL_NAME for m in models.get("data", []))


def _cpu_only() -> bool:
    """No CUDA device visible (checked without importing torch: the CLI should start fast)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return True
    return not any(Path("/dev").glob("nvidia[0-9]*"))
