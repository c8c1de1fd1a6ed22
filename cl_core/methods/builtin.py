"""Imports the methods shipped with cl_core so that their `@register_method` runs."""

from cl_core.methods import ewc, l2, neighbourhood, none, olora, packnet, progressive, replay  # noqa: F401
