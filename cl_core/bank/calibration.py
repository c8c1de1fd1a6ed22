"""Prompts that belong to no adapter: what calibrates a router's "none fits" threshold.

A router that only ever saw in-scope prompts cannot know where its scope ends; given prompts that must reach the
base model, it can set its threshold so that they do (e.g. 99% of them) while keeping as many in-scope prompts as
possible. The packaged set (`builtin`) is the general-knowledge question pool that the `neighbourhood` method
rehearses (`cl_core/methods/neighbourhood_pool.json`: real-world questions of many forms and general requests;
its real subjects are disjoint from the corrections benchmark's). A JSON file of prompts can replace it, and
`none` turns calibration off (the router's own default threshold applies).
"""

from __future__ import annotations

from pathlib import Path

from cl_core.prompting import read_prompt_list

BUILTIN = "builtin"
NONE = "none"
BUILTIN_FILE = Path(__file__).resolve().parents[1] / "methods" / "neighbourhood_pool.json"


def load_calibration_prompts(source: str) -> list[str]:
    """The out-of-scope prompts named by `router_calibration` (`builtin`, `none`, or a JSON file path holding a
    list of strings or `{"questions": [...]}`)."""
    if source == NONE:
        return []
    path = BUILTIN_FILE if source == BUILTIN else Path(source).expanduser()
    return read_prompt_list(path, f"router_calibration={source!r}", "'builtin', 'none' or a JSON file",
                            what="prompts", keys=("questions", "prompts"))


__all__ = ["BUILTIN", "NONE", "load_calibration_prompts"]
