"""Pure metric functions of the pipeline's evaluation step, on fixed inputs."""

from __future__ import annotations

import pytest

from cl_core.errors import InvalidInputError
from cl_core.pipeline.evaluation import (
    EvalItem,
    EvaluationReport,
    ItemResult,
    as_items,
    contains_match,
    derive,
    exact_match,
    load_probes,
    score_item,
    summarize,
)
from cl_core.pipeline.gate import GateRules, decide


@pytest.mark.parametrize(("output", "reference", "exact"), [
    ("Paris", "Paris", True),
    ("  paris. ", "Paris", True),
    ("PARIS!?", "paris", True),
    ("The capital of France is Paris.", "the capital of france is paris", True),
    ("Paris is nice", "Paris", False),
    ("", "Paris", False),
    ("3", "3.", True),
    ("3 apples", "3", False),
])
def test_exact_match(output, reference, exact):
    assert exact_match(output, reference) is exact


@pytest.mark.parametrize(("output", "target", "hit"), [
    ("The capital of France is Paris.", "Paris", True),
    ("the capital is PARIS", "paris.", True),
    ("The capital of France is Lyon.", "Paris", False),
    ("anything", "   ", False),
])
def test_contains_match(output, target, hit):
    assert contains_match(output, target) is hit


def _result(kind: str, exact: bool, logprob: float, contains: bool | None = None) -> ItemResult:
    item = EvalItem(f"q-{kind}-{logprob}", "a", kind)
    return ItemResult(item, "a" if exact else "b", exact, exact if contains is None else contains, logprob, 3)


def test_summarize_per_group_and_absent_groups():
    results = [_result("heldout", True, -0.5), _result("heldout", False, -1.5), _result("heldout", True, -1.0),
               _result("probe", False, -2.0, contains=True)]
    metrics = summarize(results)
    assert metrics == pytest.approx({
        "heldout_exact": 2 / 3, "heldout_contains": 2 / 3, "heldout_logprob": -1.0, "heldout_n": 3.0,
        "probe_exact": 0.0, "probe_contains": 1.0, "probe_logprob": -2.0, "probe_n": 1.0,
    })
    assert not any(name.startswith(("replay", "corrections")) for name in metrics)  # absent, not 0
    assert summarize([]) == {}


def test_score_item_uses_the_fact_for_contains():
    item = EvalItem("What is the capital of France?", "The capital of France is Paris.", "probe", fact="Paris")
    rephrased = score_item(item, "Paris is the capital of France.", -0.25, 8)
    assert (rephrased.exact, rephrased.contains, rephrased.logprob, rephrased.n_tokens) == (False, True, -0.25, 8)
    same = score_item(item, "The capital of France is Paris", -0.1, 8)
    assert same.exact and same.contains
    no_fact = score_item(EvalItem("q", "blue", "heldout"), "It is blue.", -1.0, 1)
    assert not no_fact.exact and no_fact.contains


def test_derive_matches_the_gate_and_adds_logprob_siblings():
    candidate = {"heldout_exact": 0.8, "heldout_logprob": -0.4, "replay_exact": 0.7, "replay_logprob": -0.9,
                 "probe_exact": 1.0, "probe_logprob": -0.3, "corrections_exact": 1.0}
    champion = {"heldout_exact": 0.5, "heldout_logprob": -1.4, "replay_exact": 0.9, "replay_logprob": -0.6,
                "probe_exact": 1.0, "probe_logprob": -0.2, "corrections_exact": 0.0}
    derived = derive(candidate, champion)
    assert derived == pytest.approx({
        "heldout_gain": 0.3, "retention_drop": 0.2, "probe_regression": 0.0, "forgetting": 0.2,
        "heldout_gain_logprob": 1.0, "retention_drop_logprob": 0.3, "probe_regression_logprob": 0.1,
        "forgetting_logprob": 0.3,
    })
    assert str(derived["probe_regression"]) == "0.0"  # never "-0.0" in a report
    gate = decide(candidate, champion, GateRules())
    assert gate.derived == {k: pytest.approx(v) for k, v in derived.items() if not k.endswith("_logprob")}


def test_derive_without_champion_or_groups():
    assert derive({"heldout_exact": 1.0}, None) == {}
    only_probes = derive({"probe_exact": 0.5, "probe_logprob": -1.0}, {"probe_exact": 1.0, "probe_logprob": -0.5})
    assert only_probes == pytest.approx({"probe_regression": 0.5, "forgetting": 0.5,
                                         "probe_regression_logprob": 0.5, "forgetting_logprob": 0.5})
    assert derive({"heldout_exact": 1.0}, {"replay_exact": 1.0}) == {}  # nothing measured on both sides


def test_as_items_accepts_the_shapes_the_pipeline_has():
    from cl_core.pipeline.training import QA

    items = as_items("replay", [EvalItem("p1", "a1", "heldout", fact="a"), ("p2", "a2"),
                                {"prompt": "p3", "answer": "a3", "fact": "3"}, QA("p4", "a4", "intent")])
    assert [(i.prompt, i.answer, i.kind, i.fact) for i in items] == [
        ("p1", "a1", "replay", "a"), ("p2", "a2", "replay", None), ("p3", "a3", "replay", "3"),
        ("p4", "a4", "replay", None)]
    assert as_items("heldout", None) == []
    with pytest.raises(InvalidInputError, match=r"corrections\[0\] needs 'prompt' and 'answer'"):
        as_items("corrections", [{"prompt": "p"}])
    with pytest.raises(InvalidInputError, match=r"probe\[0\] must be"):
        as_items("probe", [42])
    with pytest.raises(InvalidInputError, match="EvalItem.answer must be non-empty"):
        EvalItem("p", "  ")


def test_packaged_probes():
    probes = load_probes()
    assert 12 <= len(probes) <= 16
    assert all(p.kind == "probe" and p.fact and p.fact in p.answer for p in probes)
    assert len({p.prompt for p in probes}) == len(probes)
    assert any("France" in p.prompt for p in probes) and any("color" in p.prompt for p in probes)


def _report() -> EvaluationReport:
    fixed = EvalItem("Capital of Turkey?", "Ankara.", "corrections")
    probe = EvalItem("Capital of France?", "Paris.", "probe")
    cand = [ItemResult(fixed, "Istanbul.", False, False, -2.0, 2),
            ItemResult(probe, "Lyon.", False, False, -1.0, 2)]
    champ = [ItemResult(fixed, "Istanbul.", False, False, -3.0, 2), ItemResult(probe, "Paris.", True, True, -0.5, 2)]
    c, h = summarize(cand), summarize(champ)
    return EvaluationReport("continual@v2", "continual", c, h, derive(c, h), cand, champ, seconds=1.5)


def test_report_metrics_are_flat_and_named_for_mlflow():
    metrics = _report().metrics
    assert metrics["corrections_exact"] == 0.0 and metrics["champion.probe_exact"] == 1.0
    assert metrics["probe_regression"] == 1.0 and metrics["forgetting"] == 1.0
    assert "heldout_exact" not in metrics and "champion.heldout_exact" not in metrics
    assert all(isinstance(v, float) for v in metrics.values())


def test_report_markdown_explains_the_numbers():
    text = _report().to_markdown()
    assert "| metric | candidate `continual@v2` | champion `continual` | Δ |" in text
    assert "| probe exact (n=1) | 0.000 | 1.000 | -1.000 |" in text
    assert "| corrections logprob (n=1) | -2.000 | -3.000 | +1.000 |" in text
    assert "Not measured (no items): heldout, replay." in text
    assert "| probe_regression | +1.000 |" in text
    assert "| Capital of Turkey? | Ankara. | Istanbul. |" in text  # the correction that did not stick
    assert "| probe | Capital of France? | Paris. | Lyon. |" in text  # lost by the candidate
