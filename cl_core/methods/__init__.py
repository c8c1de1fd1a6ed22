"""Anti-forgetting methods, one file each, registered by name (`METHODS`) and combinable as a list (`MethodSet`).

A new method is one module in this package: a class derived from `AntiForgettingMethod`, decorated with
`@register_method("name")`. The registry imports every module here on its first lookup, and `ContinualConfig`
checks `anti_forgetting` names (and `per_task_blocks`) against it.
"""

from cl_core.methods.base import (
    METHODS,
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

__all__ = ["METHODS", "AntiForgettingMethod", "ExampleSource", "LearnerView", "MethodSet", "MethodSettings",
           "TaskContext", "available_methods", "make_method", "register_method"]
