"""Prompts that belong to no adapter: what calibrates a router's "none fits" threshold.

A router that only ever saw in-scope prompts cannot know where its scope ends; given prompts that must reach the
base model, it can set its threshold so that they do (e.g. 99% of them) while keeping as many in-scope prompts as
possible. The packaged set (`builtin`) is the general-knowledge question pool that the `neighbourhood` method
rehearses (`cl_core/methods/neighbourhood_pool.json`: real-world questions of many forms and general requests;
its real subjects are disjoint from the corrections benchmark's). A JSON file of prompts can replace it, and
`none` turns calibration off (the router's own default threshold applies).
"""

from __future__ import annotations

import json
from pathlib import Path

from cl_core.errors import ConfigError

BUILTIN = "builtin"
NONE = "none"
BUILTIN_FILE = Path(__file__).resolve().parents[1] / "methods" / "neighbourhood_pool.json"


def load_calibration_prompts(source: str) -> list[str]:
    """The out-of-scope prompts named by `router_calibration` (`builtin`, `none`, or a JSON file path holding a
    list of strings or `{"questions": [...]}`)."""
    if source == NONE:
        return []
    path = BUILTIN_FILE if source == BUILTIN else Path(source).expanduser()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"router_calibration={source!r}: cannot read {path} as JSON ({exc}); give 'builtin', "
                          "'none' or a JSON file holding a list of prompts") from exc
    prompts = data.get("questions", data.get("prompts")) if isinstance(data, dict) else data
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError(f"router_calibration={source!r}: {path} must hold a non-empty list of prompt strings")
    return list(dict.fromkeys(prompts))


__all__ = ["BUILTIN", "NONE", "load_calibration_prompts"]
