"""Errors of cl_core. Each names what went wrong and how to fix it; all derive from `ContinualError`."""


class ContinualError(Exception):
    """Base class of every error cl_core raises on purpose."""


class ConfigError(ContinualError, ValueError):
    """A configuration value is invalid (names the field, the value and what is allowed)."""


class InvalidInputError(ContinualError, ValueError):
    """A request argument is invalid: empty or over-long prompt, wrong type, bad reward..."""


class ModelNotFoundError(ContinualError, FileNotFoundError):
    """The base model path or id cannot be resolved to a usable model."""


class NothingToLearnError(ContinualError):
    """`learn()` found no new experiences to train on."""


class CheckpointError(ContinualError):
    """A checkpoint cannot be written or loaded (unwritable path, other base model, damaged files)."""


class PublishError(ContinualError):
    """A new adapter version could not be published into the engine; the previous one keeps serving."""


class ServingUnavailableError(ContinualError):
    """An inference call reached a model that trains detached from serving (no engine in this process)."""
