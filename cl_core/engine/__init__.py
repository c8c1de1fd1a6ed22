"""The inference side: vLLM. `vllm_engine` is the only module of cl_core that imports vllm."""

from cl_core.engine.vllm_engine import AdapterHandle, EngineSettings, Generation, VLLMEngine

__all__ = ["AdapterHandle", "EngineSettings", "Generation", "VLLMEngine"]
