"""Experience storage: a durable, bounded database of experiences, feedback and preference pairs."""

from cl_core.store.sqlite_store import Experience, ExperienceStore, PreferencePair

__all__ = ["Experience", "ExperienceStore", "PreferencePair"]
