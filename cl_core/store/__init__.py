"""Experience storage: a durable, bounded database of experiences, feedback, labels and preference pairs, with
proportional priority sampling through an in-memory sum-tree."""

from cl_core.store.priorities import (
    PriorityFunction,
    Recency,
    get_priority_function,
    priority_names,
    register,
    uncertainty,
)
from cl_core.store.schema import SCHEMA_VERSION, STATUSES
from cl_core.store.sqlite_store import SAMPLING, Experience, ExperienceStore, Label, MixedBatch, PreferencePair

__all__ = [
    "SAMPLING", "SCHEMA_VERSION", "STATUSES", "Experience", "ExperienceStore", "Label", "MixedBatch",
    "PreferencePair", "PriorityFunction", "Recency", "get_priority_function", "priority_names", "register",
    "uncertainty",
]
