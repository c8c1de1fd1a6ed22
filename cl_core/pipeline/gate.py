"""The promotion gate: rules from configuration, a decision with its reasons.

The gate answers one question — is this candidate adapter good enough to replace the one being served? — from
numbers the evaluation step measured. It is pure (no I/O, no MLflow), so the Prefect task, the CI command and the
tests all get the same answer from the same numbers.

Inputs are two flat mappings of metric name -> value, one per model, with the names that `evaluation.py` produces
(`heldout_exact`, `corrections_exact`, `replay_exact` / `_contains`, `probe_exact` / `_contains`, `*_logprob`). The
`champion` mapping is the model served now; before any adapter was promoted the caller passes the base model's
numbers the same way. `None` means nothing to compare against: only the absolute rule (corrections) can then show
that the candidate is better. Derived values (`heldout_gain`, `retention_drop`, `probe_regression`,
`forgetting`) are always computed here from the two mappings, never trusted from the input, so a stale derived
number can never pass a candidate.

A rule whose metric is absent is skipped with a stated reason (a batch without held-out records has no held-out
score), but a candidate is only promoted when at least one "gain" rule (held-out gain or corrections) was actually
evaluated and passed: absence of evidence of harm is not evidence of improvement.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cl_core.errors import ConfigError

# Metrics measured per model by the evaluation step.
MEASURED_METRICS: tuple[str, ...] = (
    "heldout_exact", "heldout_logprob", "corrections_exact", "probe_exact", "probe_logprob", "replay_exact",
    "replay_logprob",
)
# Metrics computed here from a candidate/champion pair.
DERIVED_METRICS: tuple[str, ...] = ("heldout_gain", "retention_drop", "probe_regression", "forgetting")

_TOLERANCE = 1e-9

GAIN_CHECKS: frozenset[str] = frozenset({"heldout_gain", "corrections_exact"})


class GateConfigError(ConfigError):
    """The gate rules (a `gate:` section of the pipeline config) are invalid; the message names the fix."""


@dataclass(frozen=True)
class GateRules:
    """Thresholds of the promotion gate. A threshold set to `None` turns that rule off.

    Differences are fractions of exact-match accuracy (0.05 = five points).
    """

    min_heldout_gain: float | None = 0.0
    """candidate − champion held-out exact match must be at least this (a gain rule)."""
    min_corrections_exact: float | None = 0.5
    """fraction of this batch's corrections the candidate answers as corrected (a gain rule; needs no champion)."""
    max_retention_drop: float | None = 0.05
    """champion − candidate exact match on replayed earlier data must be at most this."""
    max_probe_regression: float | None = 0.05
    """champion − candidate exact match on the retention probes must be at most this."""
    require_metrics: tuple[str, ...] = ()
    """metrics that must be present: `name` for the candidate, `champion.name` for the champion."""

    def __post_init__(self) -> None:
        for name, low, high in (("min_heldout_gain", -1.0, 1.0), ("min_corrections_exact", 0.0, 1.0),
                                ("max_retention_drop", -1.0, 1.0), ("max_probe_regression", -1.0, 1.0)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise GateConfigError(f"gate.{name} must be a number or null (rule off), got {value!r}")
            if not math.isfinite(value) or not low <= value <= high:
                raise GateConfigError(f"gate.{name} must be a finite number in [{low}, {high}], got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.min_heldout_gain is None and self.min_corrections_exact is None:
            raise GateConfigError("gate: both gain rules (min_heldout_gain, min_corrections_exact) are off, so no "
                                  "candidate could ever show it is better; set at least one of them")
        required = self.require_metrics
        if isinstance(required, str) or not all(isinstance(m, str) for m in required):
            raise GateConfigError(f"gate.require_metrics must be a list of metric names, got {required!r}")
        for metric in required:
            base = metric.removeprefix("champion.")
            if base not in MEASURED_METRICS:
                raise GateConfigError(f"gate.require_metrics: unknown metric {metric!r}; known: "
                                      f"{', '.join(MEASURED_METRICS)} (prefix `champion.` for the champion's)")
        object.__setattr__(self, "require_metrics", tuple(required))

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any] | None) -> GateRules:
        """Rules from the `gate:` section of a YAML config; `None` or `{}` gives the defaults."""
        if section is None:
            return cls()
        if not isinstance(section, Mapping):
            raise GateConfigError(f"gate: expected a mapping of rule -> threshold, got {type(section).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(section) - set(known))
        if unknown:
            raise GateConfigError(f"gate: unknown key(s) {', '.join(map(str, unknown))}; known keys: "
                                  f"{', '.join(known)}")
        values = dict(section)
        if "require_metrics" in values:
            required = values["require_metrics"]
            if required is None:
                values["require_metrics"] = ()
            elif isinstance(required, list | tuple):
                values["require_metrics"] = tuple(required)
            else:
                raise GateConfigError(f"gate.require_metrics must be a list of metric names, got {required!r}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["require_metrics"] = list(self.require_metrics)
        return data


def load_rules(path: str | Path | None) -> GateRules:
    """Rules from the `gate:` section of a YAML file (e.g. infra/pipeline.yaml); defaults when `path` is None."""
    if path is None:
        return GateRules()
    import yaml

    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise GateConfigError(f"rules file {path} does not exist; pass an existing YAML file with a `gate:` "
                              "section, or leave it out for the default rules") from None
    except yaml.YAMLError as exc:
        raise GateConfigError(f"rules file {path} is not valid YAML: {exc}") from None
    if not isinstance(document, Mapping) or "gate" not in document:
        raise GateConfigError(f"rules file {path} has no top-level `gate:` section; add one, e.g.\n"
                              "gate:\n  min_heldout_gain: 0.0\n  max_retention_drop: 0.05")
    return GateRules.from_mapping(document["gate"])


@dataclass(frozen=True)
class GateCheck:
    """One rule applied: the value it saw, the threshold, and why it passed, failed or was skipped."""

    name: str
    value: float | None
    threshold: float | None
    passed: bool
    reason: str
    skipped: bool = False

    @property
    def status(self) -> str:
        return "skipped" if self.skipped else ("pass" if self.passed else "FAIL")


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict: `passed`, every check, and the reasons a person reads (failures first when rejected)."""

    passed: bool
    checks: list[GateCheck]
    reasons: list[str]
    derived: dict[str, float] = field(default_factory=dict)
    rules: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        """`passed` or `rejected`: the value of the `gate` tag on a registered version."""
        return "passed" if self.passed else "rejected"

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "checks": [asdict(check) for check in self.checks],
            "derived": dict(self.derived),
            "rules": dict(self.rules),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateDecision:
        """Inverse of `to_dict` (e.g. a decision read back from the registry)."""
        if not isinstance(data.get("passed"), bool):
            raise ValueError(f"a gate decision needs a boolean `passed`, got {data.get('passed')!r}")
        checks = [GateCheck(**check) for check in data.get("checks", [])]
        return cls(passed=data["passed"], checks=checks, reasons=list(data.get("reasons", [])),
                   derived=dict(data.get("derived", {})), rules=dict(data.get("rules", {})))

    def to_markdown(self) -> str:
        """A table for a Prefect artifact or an MLflow run page."""
        head = "**Gate: passed**" if self.passed else "**Gate: rejected**"
        lines = [head, "", "| check | value | threshold | result | reason |", "|---|---|---|---|---|"]
        for check in self.checks:
            lines.append(f"| {check.name} | {_fmt(check.value)} | {_fmt(check.threshold)} | {check.status} | "
                         f"{check.reason.replace('|', '/')} |")
        lines += ["", *(f"- {reason}" for reason in self.reasons)]
        return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _numbers(metrics: Mapping[str, float] | None, who: str) -> dict[str, float] | None:
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        raise TypeError(f"{who} metrics must be a mapping of metric name -> number, got {type(metrics).__name__}")
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{who} metric {key!r} must be a number, got {value!r}")
        out[str(key)] = float(value)
    return out


def retention_metric(group: str, candidate: Mapping[str, float], champion: Mapping[str, float] | None) -> str:
    """`<group>_contains` when both sides have it, else `<group>_exact`."""
    contains = f"{group}_contains"
    if contains in candidate and champion is not None and contains in champion:
        return contains
    return f"{group}_exact"


def derive(candidate: Mapping[str, float], champion: Mapping[str, float] | None) -> dict[str, float]:
    """Derived comparison values from the two metric mappings (only those whose inputs are present).

    `forgetting` is the worst drop on previously known material: max(retention_drop, probe_regression).
    Gains are measured by exact match; retention by `contains` where it was measured (the reference fact, e.g.
    "Paris", is still in the answer: a rephrased sentence is not forgetting), else by exact match.
    """
    if champion is None:
        return {}
    derived: dict[str, float] = {}
    for name, metric, sign in (("heldout_gain", "heldout_exact", 1.0),
                               ("retention_drop", retention_metric("replay", candidate, champion), -1.0),
                               ("probe_regression", retention_metric("probe", candidate, champion), -1.0)):
        if metric in candidate and metric in champion:
            derived[name] = sign * (candidate[metric] - champion[metric])
    drops = [derived[n] for n in ("retention_drop", "probe_regression") if n in derived]
    if drops:
        derived["forgetting"] = max(drops)
    return derived


def decide(candidate: Mapping[str, float], champion: Mapping[str, float] | None, rules: GateRules) -> GateDecision:
    """Apply `rules` to the candidate's and champion's metrics; see the module docstring for the semantics."""
    cand = _numbers(candidate, "candidate")
    champ = _numbers(champion, "champion")
    if cand is None:
        raise TypeError("candidate metrics are required (a mapping of metric name -> number)")
    # Derived values are recomputed, never taken from the input.
    for name in DERIVED_METRICS:
        cand.pop(name, None)
        if champ is not None:
            champ.pop(name, None)
    derived = derive(cand, champ)
    checks: list[GateCheck] = []

    bad = [f"candidate {k} = {v}" for k, v in cand.items() if not math.isfinite(v)]
    bad += [f"champion {k} = {v}" for k, v in (champ or {}).items() if not math.isfinite(v)]
    if bad:
        checks.append(GateCheck("finite_metrics", None, None, False,
                                f"non-finite metric(s): {', '.join(bad)}; evaluation is broken, nothing to trust"))

    for metric in rules.require_metrics:
        source, base, who = (champ, metric.removeprefix("champion."), "champion") if metric.startswith(
            "champion.") else (cand, metric, "candidate")
        present = source is not None and base in source
        checks.append(GateCheck(f"require:{metric}", None, None, present,
                                f"{who} {base} is present" if present else f"{who} {base} is required but missing"))

    no_champ = "no champion (nor base-model) numbers to compare against"

    def relative(name: str, metric: str, threshold: float | None, at_least: bool) -> None:
        if threshold is None:
            checks.append(GateCheck(name, None, None, True, "rule off in config", skipped=True))
            return
        if champ is None:
            checks.append(GateCheck(name, None, threshold, True, f"skipped: {no_champ}", skipped=True))
            return
        missing = [w for w, m in (("candidate", cand), ("champion", champ)) if metric not in m]
        if missing:
            checks.append(GateCheck(name, None, threshold, True,
                                    f"skipped: no {metric} for the {' and '.join(missing)} (none in this batch)",
                                    skipped=True))
            return
        value = derived[name]
        detail = f"{metric} candidate {cand[metric]:.4g} vs champion {champ[metric]:.4g}"
        checks.append(_threshold_check(name, value, threshold, at_least, detail))

    relative("heldout_gain", "heldout_exact", rules.min_heldout_gain, at_least=True)
    if rules.min_corrections_exact is None:
        checks.append(GateCheck("corrections_exact", None, None, True, "rule off in config", skipped=True))
    elif "corrections_exact" not in cand:
        checks.append(GateCheck("corrections_exact", None, rules.min_corrections_exact, True,
                                "skipped: no corrections_exact for the candidate (no corrections in this batch)",
                                skipped=True))
    else:
        checks.append(_threshold_check("corrections_exact", cand["corrections_exact"], rules.min_corrections_exact,
                                       True, "fraction of this batch's corrections answered as corrected"))
    relative("retention_drop", retention_metric("replay", cand, champ), rules.max_retention_drop, at_least=False)
    relative("probe_regression", retention_metric("probe", cand, champ), rules.max_probe_regression, at_least=False)

    if not any(c.name in GAIN_CHECKS and not c.skipped for c in checks):
        checks.append(GateCheck("evidence_of_gain", None, None, False,
                                "rejected: nothing shows the candidate is better (neither held-out gain nor "
                                "corrections could be evaluated)"))

    passed = all(c.passed for c in checks)
    reasons = [c.reason for c in checks if (not c.skipped if passed else not c.passed)]
    return GateDecision(passed=passed, checks=checks, reasons=reasons, derived=derived, rules=rules.to_dict())


def _threshold_check(name: str, value: float, threshold: float, at_least: bool, detail: str) -> GateCheck:
    if not math.isfinite(value):
        return GateCheck(name, value, threshold, False, f"{name} is {value} ({detail})")
    # Exact-match scores are ratios of counts: 0.80 - 0.75 is 0.05000000000000004 in floats, and a candidate
    # exactly at the threshold must pass, so compare with a tolerance far below one example's weight.
    ok = value >= threshold - _TOLERANCE if at_least else value <= threshold + _TOLERANCE
    op = (">=" if ok else "<") if at_least else ("<=" if ok else ">")
    return GateCheck(name, value, threshold, ok, f"{name} {value:.4g} {op} {threshold:.4g} ({detail})")
