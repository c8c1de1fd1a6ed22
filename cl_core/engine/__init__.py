"""The inference side: vLLM. `vllm_engine` is the only module of cl_core that imports vllm."""

from cl_core.engine.detached import DetachedEngine
from cl_core.engine.vllm_engine import AdapterHandle, EngineBase, EngineSettings, Generation, VLLMEngine

__all__ = ["AdapterHandle", "DetachedEngine", "EngineBase", "EngineSettings", "Generation", "VLLMEngine"]
