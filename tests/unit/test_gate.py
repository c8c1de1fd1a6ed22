"""The promotion gate as a table of cases: each rule passing, failing, skipped; no gain evidence; NaN; no champion."""

from __future__ import annotations

import json
import math

import pytest

from cl_core.pipeline.gate import GateConfigError, GateDecision, GateRules, decide, derive, load_rules

CHAMPION = {"heldout_exact": 0.50, "corrections_exact": 0.0, "replay_exact": 0.80, "probe_exact": 0.90,
            "heldout_logprob": -1.2, "probe_logprob": -0.4, "replay_logprob": -0.6}
GOOD = {"heldout_exact": 0.60, "corrections_exact": 0.75, "replay_exact": 0.78, "probe_exact": 0.90,
        "heldout_logprob": -1.0, "probe_logprob": -0.42, "replay_logprob": -0.61}


def changed(base: dict, **changes: float | None) -> dict:
    out = dict(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


# (id, candidate, champion, rules, passed, {check name: status}, text that must appear in the reasons)
CASES = [
    ("all pass", GOOD, CHAMPION, {}, True,
     {"heldout_gain": "pass", "corrections_exact": "pass", "retention_drop": "pass", "probe_regression": "pass"},
     "heldout_gain 0.1 >= 0"),
    ("heldout gain below threshold", changed(GOOD, heldout_exact=0.45), CHAMPION, {}, False,
     {"heldout_gain": "FAIL", "corrections_exact": "pass"}, "heldout_gain -0.05 < 0"),
    ("heldout gain demanded higher", GOOD, CHAMPION, {"min_heldout_gain": 0.2}, False,
     {"heldout_gain": "FAIL"}, "heldout_gain 0.1 < 0.2"),
    ("too few corrections", changed(GOOD, corrections_exact=0.25), CHAMPION, {}, False,
     {"corrections_exact": "FAIL", "heldout_gain": "pass"}, "corrections_exact 0.25 < 0.5"),
    ("retention drop too big", changed(GOOD, replay_exact=0.70), CHAMPION, {}, False,
     {"retention_drop": "FAIL"}, "retention_drop 0.1 > 0.05"),
    ("probe regression too big", changed(GOOD, probe_exact=0.80), CHAMPION, {}, False,
     {"probe_regression": "FAIL"}, "probe_regression 0.1 > 0.05"),
    ("no held-out data: skipped, corrections carry the gain", changed(GOOD, heldout_exact=None),
     changed(CHAMPION, heldout_exact=None), {}, True, {"heldout_gain": "skipped", "corrections_exact": "pass"},
     "corrections_exact 0.75 >= 0.5"),
    ("no corrections: skipped, held-out carries the gain", changed(GOOD, corrections_exact=None), CHAMPION, {}, True,
     {"corrections_exact": "skipped", "heldout_gain": "pass"}, "heldout_gain"),
    ("no replay or probes: retention rules skipped", changed(GOOD, replay_exact=None, probe_exact=None), CHAMPION,
     {}, True, {"retention_drop": "skipped", "probe_regression": "skipped"}, "heldout_gain"),
    ("champion lacks the metric: skipped", GOOD, changed(CHAMPION, probe_exact=None), {}, True,
     {"probe_regression": "skipped"}, "heldout_gain"),
    ("no gain rule evaluable -> reject", changed(GOOD, heldout_exact=None, corrections_exact=None), CHAMPION, {},
     False, {"heldout_gain": "skipped", "corrections_exact": "skipped", "evidence_of_gain": "FAIL"},
     "nothing shows the candidate is better"),
    ("held-out rule off and no corrections -> reject", changed(GOOD, corrections_exact=None), CHAMPION,
     {"min_heldout_gain": None}, False, {"heldout_gain": "skipped", "evidence_of_gain": "FAIL"},
     "nothing shows the candidate is better"),
    ("NaN candidate metric -> reject", changed(GOOD, heldout_exact=math.nan), CHAMPION, {}, False,
     {"finite_metrics": "FAIL", "heldout_gain": "FAIL"}, "candidate heldout_exact = nan"),
    ("inf in an unused champion metric -> reject", GOOD, changed(CHAMPION, replay_logprob=-math.inf), {}, False,
     {"finite_metrics": "FAIL", "heldout_gain": "pass"}, "champion replay_logprob = -inf"),
    ("no champion: corrections decide", GOOD, None, {}, True,
     {"heldout_gain": "skipped", "corrections_exact": "pass", "retention_drop": "skipped"},
     "corrections_exact 0.75 >= 0.5"),
    ("no champion and no corrections -> reject", changed(GOOD, corrections_exact=None), None, {}, False,
     {"heldout_gain": "skipped", "evidence_of_gain": "FAIL"}, "nothing shows the candidate is better"),
    ("required metric missing -> reject", changed(GOOD, probe_exact=None), CHAMPION,
     {"require_metrics": ["probe_exact", "champion.replay_exact"]}, False,
     {"require:probe_exact": "FAIL", "require:champion.replay_exact": "pass"}, "candidate probe_exact is required"),
    ("required champion metric missing -> reject", GOOD, changed(CHAMPION, replay_exact=None),
     {"require_metrics": ["champion.replay_exact"]}, False, {"require:champion.replay_exact": "FAIL"},
     "champion replay_exact is required but missing"),
    ("retention rule off", changed(GOOD, replay_exact=0.1), CHAMPION, {"max_retention_drop": None}, True,
     {"retention_drop": "skipped"}, "heldout_gain"),
    ("stale derived values in the input are ignored", changed(GOOD, heldout_exact=0.4, heldout_gain=0.9),
     CHAMPION, {}, False, {"heldout_gain": "FAIL"}, "heldout_gain -0.1 < 0"),
    ("exactly at the thresholds passes", changed(GOOD, heldout_exact=0.5, corrections_exact=0.5, replay_exact=0.75,
                                                   probe_exact=0.85), CHAMPION, {}, True,
     {"heldout_gain": "pass", "corrections_exact": "pass", "retention_drop": "pass", "probe_regression": "pass"},
     "retention_drop"),
]


@pytest.mark.parametrize(("candidate", "champion", "rules", "passed", "statuses", "reason"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_decide(candidate, champion, rules, passed, statuses, reason):
    decision = decide(candidate, champion, GateRules.from_mapping(rules))
    by_name = {check.name: check for check in decision.checks}
    assert decision.passed is passed
    for name, status in statuses.items():
        assert by_name[name].status == status, (name, by_name[name])
    assert any(reason in r for r in decision.reasons), decision.reasons
    if not passed:  # a rejection lists only what failed
        assert decision.reasons == [c.reason for c in decision.checks if not c.passed]
    for check in decision.checks:
        if check.skipped:
            assert check.passed and check.reason


def test_derived_values_and_forgetting():
    derived = derive(changed(GOOD, probe_exact=0.8), CHAMPION)
    assert derived["heldout_gain"] == pytest.approx(0.10)
    assert derived["retention_drop"] == pytest.approx(0.02)
    assert derived["probe_regression"] == pytest.approx(0.10)
    assert derived["forgetting"] == pytest.approx(0.10)
    assert derive(GOOD, None) == {}
    assert "forgetting" not in derive({"heldout_exact": 1.0}, {"heldout_exact": 0.0})


def test_decision_round_trips_and_renders():
    decision = decide(changed(GOOD, replay_exact=0.5), CHAMPION, GateRules())
    data = json.loads(json.dumps(decision.to_dict()))
    assert data["verdict"] == "rejected" and data["derived"]["retention_drop"] == pytest.approx(0.3)
    assert GateDecision.from_dict(data) == decision
    markdown = decision.to_markdown()
    assert "**Gate: rejected**" in markdown and "| retention_drop | 0.3 | 0.05 | FAIL |" in markdown


@pytest.mark.parametrize(("section", "message"), [
    ({"min_gain": 0.1}, "unknown key(s) min_gain; known keys: min_heldout_gain, min_corrections_exact"),
    ({"max_retention_drop": "a lot"}, "gate.max_retention_drop must be a number"),
    ({"min_corrections_exact": 1.5}, "gate.min_corrections_exact must be a finite number in [0.0, 1.0]"),
    ({"max_probe_regression": math.nan}, "gate.max_probe_regression must be a finite number"),
    ({"min_heldout_gain": None, "min_corrections_exact": None}, "both gain rules"),
    ({"require_metrics": "heldout_exact"}, "must be a list of metric names"),
    ({"require_metrics": ["accuracy"]}, "unknown metric 'accuracy'; known: heldout_exact"),
    (["min_heldout_gain"], "expected a mapping"),
])
def test_rules_validation(section, message):
    with pytest.raises(GateConfigError) as info:
        GateRules.from_mapping(section)
    assert message in str(info.value)


def test_rules_from_yaml(tmp_path):
    assert load_rules(None) == GateRules()
    path = tmp_path / "pipeline.yaml"
    path.write_text("s3: {bucket: x}\ngate:\n  min_heldout_gain: 0.02\n  max_probe_regression: null\n"
                    "  require_metrics: [heldout_exact]\n")
    rules = load_rules(path)
    assert rules.min_heldout_gain == 0.02 and rules.max_probe_regression is None
    assert rules.require_metrics == ("heldout_exact",) and rules.max_retention_drop == 0.05
    (tmp_path / "nogate.yaml").write_text("s3: {bucket: x}\n")
    with pytest.raises(GateConfigError, match="no top-level `gate:` section"):
        load_rules(tmp_path / "nogate.yaml")
    with pytest.raises(GateConfigError, match="does not exist"):
        load_rules(tmp_path / "missing.yaml")


def test_bad_metric_types_are_named():
    with pytest.raises(TypeError, match="candidate metric 'heldout_exact' must be a number"):
        decide({"heldout_exact": "0.5"}, None, GateRules())


def test_retention_is_judged_by_the_fact_when_contains_was_measured():
    """A rephrased answer that still holds the fact ("3 times 3 is 9." for "3 times 3 is actually 9.") is not
    forgetting; a lost fact is."""
    champion = {"probe_exact": 1.0, "probe_contains": 1.0, "corrections_exact": 0.0}
    rephrased = {"probe_exact": 0.5, "probe_contains": 1.0, "corrections_exact": 1.0}
    lost = {"probe_exact": 0.5, "probe_contains": 0.5, "corrections_exact": 1.0}
    rules = GateRules.from_mapping({"max_probe_regression": 0.05})
    assert decide(rephrased, champion, rules).passed
    decision = decide(lost, champion, rules)
    assert not decision.passed and "probe_contains" in " ".join(decision.reasons)
