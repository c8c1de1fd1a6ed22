"""Every error the project raises on purpose derives from `ContinualError`, so one `except ContinualError` catches
them all; where callers catch a builtin (ValueError, LookupError, RuntimeError) that stays a second base."""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest

from cl_core.errors import ConfigError, ContinualError

ROOT = Path(__file__).resolve().parents[2]
BUILTIN_EXCEPTIONS = {name for name, value in vars(builtins).items()
                      if isinstance(value, type) and issubclass(value, BaseException)}
# Not errors: a private signal that stops a forward pass once the wanted hidden states are captured.
CONTROL_FLOW = {"cl_core/bank/embedder.py:_StopForward"}


def _rooted_only_in_builtins(source: str, where: str = "<source>") -> list[str]:
    """Classes whose every base is a builtin exception (so `except ContinualError` would miss them)."""
    found = []
    for node in ast.walk(ast.parse(source, where)):
        if isinstance(node, ast.ClassDef) and node.bases:
            bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
            if len(bases) == len(node.bases) and set(bases) <= BUILTIN_EXCEPTIONS:
                found.append(node.name)
    return found


def test_no_project_error_is_rooted_only_in_a_builtin_exception() -> None:
    found = {f"{path.relative_to(ROOT)}:{name}" for package in ("cl_core", "flows", "tasks")
             for path in sorted((ROOT / package).rglob("*.py"))
             for name in _rooted_only_in_builtins(path.read_text(), str(path))}
    assert "cl_core/errors.py:ContinualError" in found  # the scan does see what it looks for
    assert found - {"cl_core/errors.py:ContinualError"} - CONTROL_FLOW == set()


def test_the_scan_catches_a_new_stray_error() -> None:
    source = ("class Stray(RuntimeError):\n    pass\nclass Fine(ContinualError, RuntimeError):\n    pass\n"
              "class Plain:\n    pass\nclass Other(Stray):\n    pass\n")
    assert _rooted_only_in_builtins(source) == ["Stray"]


def _error(module: str, name: str) -> type:
    import importlib

    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("module", "name", "builtin"), [
    ("cl_core.pipeline.gate", "GateConfigError", ValueError),
    ("cl_core.pipeline.registry", "RegistryUnavailable", RuntimeError),
    ("cl_core.pipeline.registry", "VersionNotFound", LookupError),
    ("cl_core.pipeline.cli", "UsageError", Exception),
    ("cl_core.stack.service", "StackError", RuntimeError),
    ("cl_core.stack.service", "PortInUseError", RuntimeError),
    ("cl_core.gateway.app", "GatewayError", Exception),
    ("cl_core.serving.client", "LoRARankTooLarge", ValueError),
    ("cl_core.data.s3", "S3Unavailable", ConnectionError),
])
def test_rerooted_errors_keep_the_builtin_their_callers_catch(module: str, name: str, builtin: type) -> None:
    error = _error(module, name)
    assert issubclass(error, ContinualError) and issubclass(error, builtin)


def test_gate_and_rank_errors_are_config_errors() -> None:
    assert issubclass(_error("cl_core.pipeline.gate", "GateConfigError"), ConfigError)
    assert issubclass(_error("cl_core.serving.client", "LoRARankTooLarge"), ConfigError)
