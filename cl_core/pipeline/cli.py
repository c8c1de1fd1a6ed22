"""Command line of the pipeline: `python -m cl_core.pipeline <command>`.

Each command is a `add_<command>_parser(subparsers)` that sets `func` (args -> exit code); add new ones to
`COMMANDS`. Heavy imports (MLflow) happen inside the command, so `--help` and usage errors are instant.

Exit codes (what CI systems act on): 0 success / gate passed, 1 gate failed, 2 usage error, bad configuration or
unreachable service.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cl_core.errors import ContinualError

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


class UsageError(ContinualError):
    """Bad input the user can fix; printed without a traceback, exit code 2."""


def add_gate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "gate", help="CI promotion gate: does a registered candidate beat the champion? (exit 0 pass, 1 fail)",
        description="Read a candidate and the champion from the MLflow registry, apply the promotion rules and "
                    "exit 0 when the candidate passes, 1 when it fails (reasons printed), 2 on usage errors or "
                    "when the registry cannot be reached.")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking server (default: $MLFLOW_TRACKING_URI, then http://127.0.0.1:5000)")
    p.add_argument("--model", default="continual-adapter", help="registered model name (default: %(default)s)")
    p.add_argument("--candidate", default="challenger", help="alias or version number (default: %(default)s)")
    p.add_argument("--champion", default="champion",
                   help="alias or version number (default: %(default)s). When the alias is not set yet (nothing "
                        "promoted), the base-model numbers logged with the candidate are the baseline.")
    p.add_argument("--champion-metrics", choices=["auto", "run"], default="auto",
                   help="auto (default): when the candidate was evaluated against this very champion version "
                        "(its parent_version), use the champion numbers measured in that same evaluation (same "
                        "data); otherwise, and with `run`, use the champion's own run's candidate.* metrics")
    p.add_argument("--rules", default=None,
                   help="YAML file with a top-level `gate:` section (e.g. infra/pipeline.yaml); default rules "
                        "when left out")
    p.add_argument("--json", action="store_true", help="print the decision as JSON instead of a table")
    p.add_argument("--json-out", metavar="PATH", default=None,
                   help="also write the decision JSON to PATH (a CI artifact)")
    p.add_argument("--markdown-out", metavar="PATH", default=None,
                   help="also append the decision as markdown to PATH (e.g. $GITHUB_STEP_SUMMARY)")
    p.add_argument("--attempts", type=int, default=4, help="tries per registry call before giving up (default 4)")
    p.set_defaults(func=run_gate)


COMMANDS: list[Callable[[Any], None]] = [add_gate_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cl_core.pipeline",
                                     description="The continual-learning pipeline's commands.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


# ------------------------------------------------------------------------------------------------------- gate
def run_gate(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from cl_core.pipeline.gate import GateConfigError, decide, load_rules
    from cl_core.pipeline.registry import AdapterRegistry, RegistryUnavailable, VersionNotFound

    if args.attempts < 1:
        raise UsageError("--attempts must be at least 1")
    try:
        rules = load_rules(args.rules)
        registry = AdapterRegistry(args.tracking_uri, model_name=args.model, max_attempts=args.attempts)
        candidate_version = registry.resolve(args.candidate)
        candidate = registry.get(candidate_version)
        champion_version, champion, source = _champion_metrics(registry, candidate, args.champion,
                                                               args.champion_metrics)
    except (GateConfigError, VersionNotFound, ValueError, RegistryUnavailable) as exc:
        raise UsageError(str(exc)) from None
    except MlflowException as exc:
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "(default)")
        raise UsageError(f"MLflow at {uri} refused the request: {exc.message}") from None

    decision = decide(candidate.metrics_of("candidate"), champion, rules)
    notes = []
    if not candidate.metrics_of("candidate"):
        notes.append(f"version {candidate_version} has no candidate.* metrics: it was registered without an "
                     "evaluation")
    context = {"tracking_uri": registry.tracking_uri, "model": registry.model_name,
               "candidate": {"ref": args.candidate, "version": candidate_version,
                             "url": registry.version_url(candidate_version)},
               "champion": {"ref": args.champion, "version": champion_version,
                            "url": registry.version_url(champion_version) if champion_version else None},
               "champion_metrics": source, "notes": notes}
    report = {**decision.to_dict(), **context}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown_out:
        with open(args.markdown_out, "a") as out:
            out.write(_markdown(decision, context))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_decision(decision, context)
    return EXIT_OK if decision.passed else EXIT_FAILED


def _champion_metrics(registry: Any, candidate: Any, ref: str, mode: str) -> tuple[int | None, Any, str]:
    """(champion version, its metrics or None, where they came from) for the gate."""
    from cl_core.pipeline.registry import VersionNotFound

    logged = candidate.metrics_of("champion")
    try:
        champion_version = registry.resolve(ref)
    except VersionNotFound:
        if ref.isdigit():
            raise
        # No champion yet (nothing promoted): the candidate's evaluation measured the base model as the champion.
        if logged:
            return None, logged, (f"alias {ref!r} not set: baseline numbers logged with candidate "
                                  f"v{candidate.version} (champion.* metrics of its run)")
        return None, None, f"alias {ref!r} not set and no baseline numbers logged: no comparison"
    if champion_version == candidate.version:
        raise ValueError(f"candidate and champion are the same version ({champion_version}); nothing to compare")
    if mode == "auto" and logged and candidate.tags.get("parent_version") == str(champion_version):
        return champion_version, logged, (f"head-to-head: champion v{champion_version} measured in candidate "
                                          f"v{candidate.version}'s evaluation (same data)")
    own = registry.get(champion_version).metrics_of("candidate")
    return champion_version, own or None, f"champion v{champion_version}'s own run (its candidate.* metrics)"


def _print_decision(decision: Any, context: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=False, width=max(100, Console().width))
    champion = context["champion"]
    champ_text = f"v{champion['version']}" if champion["version"] else "no champion"
    verdict = "[bold green]PASSED[/]" if decision.passed else "[bold red]REJECTED[/]"
    console.print(f"gate {verdict}: {context['model']} candidate v{context['candidate']['version']} "
                  f"({context['candidate']['ref']}) vs {champ_text} at {context['tracking_uri']}")
    console.print(f"champion metrics: {context['champion_metrics']}")
    table = Table(show_edge=False)
    for column in ("check", "value", "threshold", "result", "reason"):
        table.add_column(column, overflow="fold")
    for check in decision.checks:
        style = {"pass": "green", "FAIL": "bold red", "skipped": "dim"}[check.status]
        table.add_row(check.name, _fmt(check.value), _fmt(check.threshold), f"[{style}]{check.status}[/]",
                      check.reason)
    console.print(table)
    console.print("reasons:" if decision.passed else "rejected because:")
    for reason in [*decision.reasons, *context["notes"]]:
        console.print(f"  - {reason}", markup=False)
    if context["candidate"]["url"]:
        console.print(f"candidate: {context['candidate']['url']}", markup=False)


def _markdown(decision: Any, context: dict[str, Any]) -> str:
    champion = context["champion"]
    champ_text = f"v{champion['version']}" if champion["version"] else "no champion"
    candidate = context["candidate"]
    link = f"[v{candidate['version']}]({candidate['url']})" if candidate["url"] else f"v{candidate['version']}"
    head = (f"### Promotion gate: {context['model']} candidate {link} vs {champ_text}\n\n"
            f"Champion metrics: {context['champion_metrics']}\n\n")
    notes = "".join(f"- {note}\n" for note in context["notes"])
    return head + decision.to_markdown() + notes + "\n"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"
