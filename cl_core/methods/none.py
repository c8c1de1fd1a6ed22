"""`none`: plain sequential fine-tuning, the baseline every anti-forgetting method is measured against."""

from __future__ import annotations

from cl_core.methods.base import AntiForgettingMethod, register_method


@register_method("none")
class NoProtection(AntiForgettingMethod):
    """Changes nothing: every hook keeps its neutral default."""
