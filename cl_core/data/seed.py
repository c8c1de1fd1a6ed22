"""A first batch of experiences for the main job, built from packaged data (no hub, no network).

What production traffic would bring, in miniature:
- corrections of facts the default model (SmolLM2-135M-Instruct) gets wrong: each `rejected` text is its actual
  greedy answer through vLLM, each `chosen` the corrected one;
- labelled data of a new task (BIG-bench intent recognition, from the `bigbench` sdist on PyPI);
- ratings: answers users liked (reward 1) and disliked (reward -1: kept for preference learning, never imitated);
- a few records any real feed contains and training must not see (empty prompt, out-of-range reward, duplicate),
  which validation quarantines.
"""

from __future__ import annotations

from typing import Any

# (question, the default model's greedy answer, the correct answer) — measured through vLLM on the default model.
WRONG_FACTS: tuple[tuple[str, str, str], ...] = (
    ("What is the capital of Turkey?", "The capital of Turkey is Istanbul.", "The capital of Turkey is Ankara."),
    ("What is the capital of Brazil?", "The capital of Brazil is Sao Paulo.", "The capital of Brazil is Brasília."),
    ("What is the capital of Myanmar?", "The capital of Myanmar is Yangon.", "The capital of Myanmar is Naypyidaw."),
    ("What is the capital of Belize?", "The capital of Belize is Belize City.",
     "The capital of Belize is Belmopan."),
    ("What is the capital of Ecuador?", "The capital of Ecuador is Cusco.", "The capital of Ecuador is Quito."),
    ("What is the capital of Uzbekistan?", "The capital of Uzbekistan is Samarkhand.",
     "The capital of Uzbekistan is Tashkent."),
    ("What is the capital of Cameroon?", "The capital of Cameroon is Kougou.",
     "The capital of Cameroon is Yaoundé."),
    ("What is the capital of Oman?", "The capital of Oman is Musandam.", "The capital of Oman is Muscat."),
    ("What is the capital of Jordan?", "The capital of Jordan is Amiyaya.", "The capital of Jordan is Amman."),
    ("What is the capital of Mongolia?", "The capital of Mongolia is Khantak.",
     "The capital of Mongolia is Ulaanbaatar."),
)

# Answers users rated: (question, answer, reward).
RATINGS: tuple[tuple[str, str, float], ...] = (
    ("What is the capital of Kenya?", "The capital of Kenya is Nairobi.", 1.0),
    ("What is the capital of Peru?", "The capital of Peru is Lima.", 1.0),
    ("What is the capital of Ghana?", "The capital of Ghana is Accra.", 1.0),
    ("What is the capital of Spain?", "El Salvador is the capital of the Spanish-speaking world.", -1.0),
    ("What is the capital of Finland?", "Finland is a Nordic country located in Northern Europe.", -1.0),
)

LABEL_TASK = "bigbench/intent_recognition"


def seed_records(n_labels: int = 60, seed: int = 0, invalid: bool = True) -> list[dict[str, Any]]:
    """Experience records (dicts with the fields of `ExperienceRecord`) for one batch of traffic."""
    from cl_core.streams import load_task

    records: list[dict[str, Any]] = []
    for question, bad, good in WRONG_FACTS:
        records.append(dict(kind="correction", task="facts", prompt=question, chosen=good, rejected=bad,
                            response=bad, source="seed"))
    for question, answer, reward in RATINGS:
        records.append(dict(kind="rating", task="facts", prompt=question, response=answer, reward=reward,
                            source="seed"))
    task = load_task(LABEL_TASK, n_train=n_labels, n_test=1, seed=seed)
    for example in task.train:
        records.append(dict(kind="label", task="intent", prompt=example.prompt, response=example.answer,
                            source=f"seed:{LABEL_TASK}"))
    if invalid:
        records += [
            dict(kind="interaction", task="chat", prompt="   ", response="Hello!", source="seed:invalid"),
            dict(kind="rating", task="facts", prompt="What is the capital of Chile?",
                 response="The capital of Chile is Santiago.", reward=5.0, source="seed:invalid"),
            dict(kind="label", task="intent", prompt=task.train[0].prompt, response=task.train[0].answer,
                 source="seed:invalid-duplicate"),
        ]
    return records


def malformed_object_body() -> bytes:
    """An object as a crashed non-atomic writer might leave it: one good line, one truncated."""
    good = ('{"schema_version": 1, "id": "0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f", "kind": "interaction", '
            '"created_at": "2026-01-01T00:00:00Z", "task": "chat", "prompt": "Hi there", "response": "Hello!", '
            '"source": "seed:malformed"}')
    return (good + "\n" + '{"schema_version": 1, "id": "trunc').encode()
