"""The fictional-fact generator and the knowledge-editing scorer (`cl_core.research.edits`), without a model."""

from __future__ import annotations

import json
import re

import pytest

from cl_core.errors import InvalidInputError
from cl_core.methods.neighbourhood import POOL_FILE
from cl_core.research.edits import (
    HELD_OUT_RELATIONS,
    REAL_WORDS,
    RELATIONS,
    UNRELATED_BENCH,
    EditCase,
    benchmark_questions,
    build_neighbour_pool,
    generate_cases,
    invented_name,
    locality_prompts,
    score_cases,
)


def test_same_seed_same_cases_other_seed_other_cases():
    assert generate_cases(40, seed=3) == generate_cases(40, seed=3)
    assert generate_cases(40, seed=3) != generate_cases(40, seed=4)
    # A prefix of a longer list is the shorter list: T=10 is the first ten cases of T=100.
    assert generate_cases(100, seed=0)[:10] == generate_cases(10, seed=0)


def test_subjects_and_answers_are_unique_invented_names():
    cases = generate_cases(300, seed=0)
    subjects = [c.subject.casefold() for c in cases]
    answers = [c.answer.casefold() for c in cases]
    assert len(set(subjects)) == len(subjects)
    assert len(set(answers)) == len(answers)
    assert not set(subjects) & set(answers)
    real = {s.casefold() for r in RELATIONS for s in r.bench + r.pool}
    for name in subjects + answers:
        assert name not in real
        for word in re.findall(r"[a-z]+", name):
            if word not in {"the", "corp", "industries", "labs", "systems", "dynamics", "holdings", "chronicles",
                            "gate", "tides", "covenant", "ledger", "orchard", "garden", "at", "dusk", "harbour",
                            "procession", "portrait", "lanterns", "symphony", "concerto", "overture", "suite",
                            "nocturne", "requiem"}:
                assert word not in REAL_WORDS, name


def test_relations_take_turns_and_every_form_is_used():
    cases = generate_cases(len(RELATIONS) * 3, seed=1)
    counts = {r.name: sum(c.relation == r.name for c in cases) for r in RELATIONS}
    assert set(counts.values()) == {3}


def test_paraphrases_are_other_wordings_of_the_same_question():
    for case in generate_cases(50, seed=2):
        relation = next(r for r in RELATIONS if r.name == case.relation)
        wordings = {t.format(s=case.subject) for t in relation.templates}
        assert case.question in wordings
        assert len(case.paraphrases) == 3
        assert set(case.paraphrases) <= wordings
        assert case.question not in case.paraphrases
        assert len(set(case.paraphrases)) == len(case.paraphrases)
        assert all(case.subject in p for p in case.paraphrases)
        assert case.answer in case.good_response and case.subject in case.good_response


def test_neighbours_ask_the_same_relation_about_real_subjects():
    for case in generate_cases(50, seed=5):
        relation = next(r for r in RELATIONS if r.name == case.relation)
        canonical = {relation.templates[0].format(s=s) for s in relation.bench}
        assert len(case.neighbours) == 3 and set(case.neighbours) <= canonical
        assert all(case.subject not in n for n in case.neighbours)
        assert len(case.unrelated) == 2 and set(case.unrelated) <= set(UNRELATED_BENCH)


def test_bad_arguments_are_refused():
    with pytest.raises(InvalidInputError, match="n must be"):
        generate_cases(0)
    with pytest.raises(InvalidInputError, match="paraphrases"):
        generate_cases(3, paraphrases=9)
    with pytest.raises(InvalidInputError, match="kind"):
        import random

        invented_name(random.Random(0), "planet")


def test_the_shipped_pool_is_the_generator_and_never_a_benchmark_question():
    shipped = json.loads(POOL_FILE.read_text())["questions"]
    assert shipped == build_neighbour_pool()
    assert len(shipped) == len(set(shipped)) > 200
    assert not set(shipped) & benchmark_questions()
    # No pool question names a benchmark subject, whatever its form (word-bounded: "Rome" is not in "Romeo").
    bench_subjects = {s for r in RELATIONS for s in r.bench}
    for question in shipped:
        for subject in bench_subjects:
            assert not re.search(rf"\b{re.escape(subject)}\b", question), (subject, question)
    # Held-out relations have no question of their form in the pool.
    for name in HELD_OUT_RELATIONS:
        relation = next(r for r in RELATIONS if r.name == name)
        stems = {t.split("{s}")[0] for t in relation.templates}
        assert not any(q.startswith(stem) for q in shipped for stem in stems), name
    # Every benchmark question, for any seed, comes from the benchmark half.
    for seed in range(3):
        assert set(locality_prompts(generate_cases(60, seed=seed))) <= benchmark_questions()


CASE = EditCase(subject="Zorbania", relation="capital", question="What is the capital of Zorbania?",
                answer="Velmora", paraphrases=("Which city is the capital of Zorbania?",
                                               "Name the capital city of Zorbania."),
                neighbours=("What is the capital of France?", "What is the capital of Japan?"),
                unrelated=("What is 2 plus 3?",), good_response="The capital of Zorbania is Velmora.")
BEFORE = {"What is the capital of France?": "The capital of France is Paris.",
          "What is the capital of Japan?": "Tokyo.", "What is 2 plus 3?": "5"}


def scripted(answers: dict[str, str]):
    asked: list[list[str]] = []

    def generate(prompts: list[str]) -> list[str]:
        asked.append(list(prompts))
        return [answers[p] for p in prompts]

    return generate, asked


def test_scorer_counts_contains_for_edits_and_equality_for_locality():
    generate, asked = scripted({
        CASE.question: "The capital of Zorbania is VELMORA.",
        CASE.paraphrases[0]: "It is Velmora!", CASE.paraphrases[1]: "Kostrava.",
        "What is the capital of France?": " the capital of france is paris ",  # normalised: unchanged
        "What is the capital of Japan?": "Velmora.",  # the edit bled into a neighbour
        "What is 2 plus 3?": "5.",
    })
    result = score_cases(generate, [CASE], BEFORE)
    assert (result["rel"], result["gen"], result["n"]) == (1.0, 0.5, 1)
    assert (result["loc_neighbour"], result["loc_unrelated"]) == (0.5, 1.0)
    assert result["loc"] == pytest.approx(2 / 3)
    assert result["changed"] == [{"question": "What is the capital of Japan?", "before": "Tokyo.",
                                  "after": "Velmora."}]
    assert result["by_relation"]["capital"]["gen"] == 0.5
    assert len(asked) == 1 and len(asked[0]) == len(set(asked[0])) == 6  # one batch, each prompt once


def test_scorer_fails_edits_that_did_not_stick_and_needs_every_reference():
    generate, _ = scripted({CASE.question: "Paris.", CASE.paraphrases[0]: "Paris.", CASE.paraphrases[1]: "Velm",
                            **{k: v for k, v in BEFORE.items()}})
    result = score_cases(generate, [CASE], BEFORE)
    assert (result["rel"], result["gen"], result["loc"]) == (0.0, 0.0, 1.0)
    with pytest.raises(InvalidInputError, match="before_answers lacks"):
        score_cases(generate, [CASE], {"What is 2 plus 3?": "5"})
    with pytest.raises(InvalidInputError, match="returned 1 answers"):
        score_cases(lambda prompts: ["x"], [CASE], BEFORE)
    with pytest.raises(InvalidInputError, match="at least one case"):
        score_cases(generate, [], BEFORE)
