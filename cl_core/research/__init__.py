"""Research tools: forgetting experiments over task sequences, their results and plots."""

from cl_core.research.forgetting import ExperimentResult, ForgettingExperiment

__all__ = ["ExperimentResult", "ForgettingExperiment"]
