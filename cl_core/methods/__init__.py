"""Anti-forgetting methods, one file each, registered by name and combinable as a list (`MethodSet`)."""

from cl_core.methods.base import (
    AntiForgettingMethod,
    ExampleSource,
    LearnerView,
    MethodSettings,
    TaskContext,
    available_methods,
    make_method,
    register_method,
)
from cl_core.methods.combined import MethodSet

__all__ = ["AntiForgettingMethod", "ExampleSource", "LearnerView", "MethodSet", "MethodSettings", "TaskContext",
           "available_methods", "make_method", "register_method"]
