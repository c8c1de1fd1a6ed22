"""The training side: a PEFT LoRA learner on the base weights vLLM serves."""

from cl_core.learner.peft_learner import Example, LearnerSettings, LoRALearner, StepResult

__all__ = ["Example", "LearnerSettings", "LoRALearner", "StepResult"]
