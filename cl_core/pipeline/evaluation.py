"""Candidate vs champion, measured through vLLM: what is measured is what would be served.

Both adapters are asked the same questions on the same server (the candidate under its own name, the champion under
the stable name, or the bare `base` model before the first promotion), in four groups:

- `heldout`: labelled records of this batch kept out of training -> did the candidate learn the new data?
- `corrections`: the users' corrections it was trained on -> does the served model now answer as corrected?
- `probe`: retention probes, general knowledge the base model answers right (`probes.json`) -> nothing broken?
- `replay`: earlier learned experiences -> did it forget what earlier rounds taught?

Per group and model: `{group}_exact` (greedy answer == reference after `normalize_answer`: strip, casefold, drop
trailing punctuation), `{group}_contains` (the item's fact, or its reference, appears in the greedy answer),
`{group}_logprob` (mean over items of the mean per-token log-probability of the reference answer given the
prompt, teacher-forced: it moves before greedy answers flip, so small regressions show early) and `{group}_n`.
A group without items is absent from the metrics, never 0: "not measured" must not read as "all wrong".

Derived values (`heldout_gain`, `retention_drop`, `probe_regression`, `forgetting`) are the gate's own
`cl_core.pipeline.gate.derive` (one definition), plus their log-probability siblings (`*_logprob`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from cl_core.errors import InvalidInputError
from cl_core.pipeline.gate import derive as gate_derive
from cl_core.serving.client import VLLMServer, load_tokenizer
from cl_core.streams.task import normalize_answer

log = logging.getLogger(__name__)

GROUPS: tuple[str, ...] = ("heldout", "corrections", "probe", "replay")
DEFAULT_MAX_TOKENS = 48
PROBES_FILE = "probes.json"


@dataclass(frozen=True)
class EvalItem:
    """One question with the answer the served model should give.

    `kind` is the group it is reported in (`heldout`, `corrections`, `probe`, `replay`, or any other name).
    `fact` is the short part that must appear for a contains-match (e.g. "Paris" in "The capital of France is
    Paris."); without it the whole reference is looked for.
    """

    prompt: str
    answer: str
    kind: str = "heldout"
    fact: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "answer", "kind"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InvalidInputError(f"EvalItem.{name} must be non-empty text, got {value!r}")
        if self.fact is not None and (not isinstance(self.fact, str) or not self.fact.strip()):
            raise InvalidInputError(f"EvalItem.fact must be non-empty text or None, got {self.fact!r}")


@dataclass(frozen=True)
class ItemResult:
    """How one model did on one item."""

    item: EvalItem
    output: str
    exact: bool
    contains: bool
    logprob: float
    n_tokens: int
    served: str = ""
    """The served name that answered (with a bank: the routed adapter version, or `base`)."""


# --- pure metric functions -----------------------------------------------------------------------------------
def exact_match(output: str, reference: str) -> bool:
    """The whole greedy answer is the reference, up to whitespace, case and trailing punctuation."""
    return normalize_answer(output) == normalize_answer(reference)


def contains_match(output: str, target: str) -> bool:
    """The target (normalized) appears somewhere in the (normalized) answer."""
    needle = normalize_answer(target)
    return bool(needle) and needle in normalize_answer(output)


def score_item(item: EvalItem, output: str, logprob: float, n_tokens: int, served: str = "") -> ItemResult:
    return ItemResult(item=item, output=output, exact=exact_match(output, item.answer),
                      contains=contains_match(output, item.fact or item.answer), logprob=float(logprob),
                      n_tokens=int(n_tokens), served=served)


def summarize(results: Iterable[ItemResult]) -> dict[str, float]:
    """Per group (item kind): `_exact` and `_contains` accuracies, `_logprob` (mean of per-item mean token
    log-probabilities: every item weighs the same, whatever its length) and `_n`. Groups without items are absent."""
    groups: dict[str, list[ItemResult]] = {}
    for result in results:
        groups.setdefault(result.item.kind, []).append(result)
    metrics: dict[str, float] = {}
    for kind, rows in groups.items():
        metrics[f"{kind}_exact"] = sum(r.exact for r in rows) / len(rows)
        metrics[f"{kind}_contains"] = sum(r.contains for r in rows) / len(rows)
        metrics[f"{kind}_logprob"] = sum(r.logprob for r in rows) / len(rows)
        metrics[f"{kind}_n"] = float(len(rows))
    return metrics


def derive(candidate: Mapping[str, float], champion: Mapping[str, float] | None) -> dict[str, float]:
    """The gate's derived values (exact match) plus the same comparisons on reference log-probabilities.

    `heldout_gain_logprob` = candidate − champion; `retention_drop_logprob` and `probe_regression_logprob` =
    champion − candidate (positive = worse), in nats per token; `forgetting_logprob` is the larger drop.
    """
    derived = gate_derive(candidate, champion)
    if champion is None:
        return derived
    for name, metric, sign in (("heldout_gain_logprob", "heldout_logprob", 1.0),
                               ("retention_drop_logprob", "replay_logprob", -1.0),
                               ("probe_regression_logprob", "probe_logprob", -1.0)):
        if metric in candidate and metric in champion:
            derived[name] = sign * (candidate[metric] - champion[metric])
    drops = [derived[n] for n in ("retention_drop_logprob", "probe_regression_logprob") if n in derived]
    if drops:
        derived["forgetting_logprob"] = max(drops)
    return {name: value + 0.0 for name, value in derived.items()}  # + 0.0: no "-0.000" in reports


def as_items(kind: str, values: Iterable[Any]) -> list[EvalItem]:
    """Items of one group from EvalItems, objects with `.prompt` and `.answer` (e.g. the trainer's QA records),
    dicts with "prompt" and "answer" (and optional "fact"), or (prompt, answer) pairs. The group is `kind`."""
    items = []
    for i, value in enumerate(values or ()):
        if isinstance(value, EvalItem):
            items.append(EvalItem(value.prompt, value.answer, kind, value.fact))
        elif isinstance(value, Mapping):
            if "prompt" not in value or "answer" not in value:
                raise InvalidInputError(f"{kind}[{i}] needs 'prompt' and 'answer' keys, got {sorted(value)}")
            items.append(EvalItem(value["prompt"], value["answer"], kind, value.get("fact")))
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            items.append(EvalItem(value[0], value[1], kind))
        elif hasattr(value, "prompt") and hasattr(value, "answer"):
            items.append(EvalItem(value.prompt, value.answer, kind, getattr(value, "fact", None)))
        else:
            raise InvalidInputError(f"{kind}[{i}] must be an EvalItem, a (prompt, answer) pair, a dict or an "
                                    f"object with .prompt and .answer; got {type(value).__name__}")
    return items


def load_probes() -> list[EvalItem]:
    """The packaged retention probes (`cl_core/pipeline/probes.json`), as `probe` items."""
    data = json.loads(resources.files("cl_core.pipeline").joinpath(PROBES_FILE).read_text(encoding="utf-8"))
    return as_items("probe", data["probes"])


# --- through a server --------------------------------------------------------------------------------------------
def evaluate_items(server: str | VLLMServer, tokenizer: Any, model_name: str | Sequence[str],
                   items: Sequence[EvalItem], max_tokens: int = DEFAULT_MAX_TOKENS) -> list[ItemResult]:
    """Ask `model_name` every item (greedy chat) and score the reference answers' log-probabilities.

    `model_name` is one served name for all items, or one per item (a bank: each item goes to the adapter its
    router picks, or to `base`). `max_tokens` is raised to fit the longest reference (+4 tokens), so a long
    reference is never cut short and marked wrong for that reason alone.
    """
    items = list(items)
    if not items:
        return []
    if not isinstance(server, VLLMServer):
        with VLLMServer(server) as client:
            return evaluate_items(client, tokenizer, model_name, items, max_tokens)
    names = [model_name] * len(items) if isinstance(model_name, str) else list(model_name)
    if len(names) != len(items) or not all(isinstance(n, str) and n for n in names):
        raise InvalidInputError(f"model_name must be one served name or one per item ({len(items)}), got "
                                f"{len(names)} names")
    tokenizer = load_tokenizer(tokenizer)
    longest = max(len(tokenizer(item.answer, add_special_tokens=False)["input_ids"]) for item in items)
    results: list[ItemResult | None] = [None] * len(items)
    for name in dict.fromkeys(names):
        chosen = [i for i, n in enumerate(names) if n == name]
        group = [items[i] for i in chosen]
        outputs = server.chat(name, [item.prompt for item in group], max_tokens=max(max_tokens, longest + 4))
        refs = server.reference_logprobs(name, tokenizer, [(item.prompt, item.answer) for item in group])
        for i, item, output, ref in zip(chosen, group, outputs, refs, strict=True):
            results[i] = score_item(item, output, ref.mean, ref.n_tokens, served=name)
    return [r for r in results if r is not None]


def evaluate(server: str | VLLMServer, tokenizer: Any, model_name: str, items: Sequence[EvalItem],
             max_tokens: int = DEFAULT_MAX_TOKENS) -> dict[str, float]:
    """Per-group metrics of `model_name` on `items` (see the module docstring for the names)."""
    return summarize(evaluate_items(server, tokenizer, model_name, items, max_tokens))


@dataclass
class EvaluationReport:
    """Metrics of the candidate and the champion on the same items, and the derived comparisons.

    `candidate` / `champion` use the plain names the gate reads (`heldout_exact`, ...); `metrics` is one flat dict
    for MLflow: the candidate's under plain names, the champion's as `champion.<name>`, plus the derived values.
    """

    candidate_name: str
    champion_name: str
    candidate: dict[str, float]
    champion: dict[str, float]
    derived: dict[str, float]
    candidate_results: list[ItemResult] = field(default_factory=list, repr=False)
    champion_results: list[ItemResult] = field(default_factory=list, repr=False)
    seconds: float = 0.0

    @property
    def metrics(self) -> dict[str, float]:
        flat = dict(self.candidate)
        flat.update({f"champion.{name}": value for name, value in self.champion.items()})
        flat.update(self.derived)
        return flat

    def to_dict(self) -> dict[str, Any]:
        return {"candidate_name": self.candidate_name, "champion_name": self.champion_name,
                "candidate": self.candidate, "champion": self.champion, "derived": self.derived,
                "seconds": self.seconds}

    def to_markdown(self, examples: int = 5) -> str:
        """A table a person reads in the Prefect UI, then the items that explain the numbers."""
        lines = [f"| metric | candidate `{self.candidate_name}` | champion `{self.champion_name}` | Δ |",
                 "|---|---:|---:|---:|"]
        kinds = [k for k in GROUPS if f"{k}_n" in self.candidate]
        kinds += sorted({name[:-2] for name in self.candidate if name.endswith("_n")} - set(kinds))
        for kind in kinds:
            n = int(self.candidate[f"{kind}_n"])
            for measure in ("exact", "contains", "logprob"):
                name = f"{kind}_{measure}"
                cand, champ = self.candidate.get(name), self.champion.get(name)
                delta = "" if cand is None or champ is None else f"{cand - champ:+.3f}"
                lines.append(f"| {kind} {measure} (n={n}) | {_fmt(cand)} | {_fmt(champ)} | {delta} |")
        absent = [k for k in GROUPS if k not in kinds]
        if absent:
            lines.append("")
            lines.append(f"Not measured (no items): {', '.join(absent)}.")
        if self.derived:
            lines += ["", "| derived | value |", "|---|---:|"]
            lines += [f"| {name} | {value:+.3f} |" for name, value in self.derived.items()]
        lines += self._examples(examples)
        lines += ["", f"Evaluated through vLLM in {self.seconds:.1f} s."]
        return "\n".join(lines)

    def _examples(self, limit: int) -> list[str]:
        out: list[str] = []
        missed = [r for r in self.candidate_results if r.item.kind == "corrections" and not r.exact]
        if missed:
            out += ["", f"Corrections the candidate does not answer as corrected ({len(missed)}):", "",
                    "| prompt | corrected answer | candidate answered |", "|---|---|---|"]
            out += [f"| {_cell(r.item.prompt)} | {_cell(r.item.answer)} | {_cell(r.output)} |" for r in missed[:limit]]
        champion_right = {(r.item.kind, r.item.prompt) for r in self.champion_results if r.exact}
        lost = [r for r in self.candidate_results if r.item.kind in ("probe", "replay") and not r.exact
                and (r.item.kind, r.item.prompt) in champion_right]
        if lost:
            out += ["", f"Answered right by the champion, wrong by the candidate ({len(lost)}):", "",
                    "| group | prompt | reference | candidate answered |", "|---|---|---|---|"]
            out += [f"| {r.item.kind} | {_cell(r.item.prompt)} | {_cell(r.item.answer)} | {_cell(r.output)} |"
                    for r in lost[:limit]]
        return out


@dataclass(frozen=True)
class RoutedModel:
    """A bank as evaluation sees it: a label for reports and, per prompt, the served name the router picks."""

    label: str
    names_for: Callable[[Sequence[str]], list[str]]


def _names(model: str | RoutedModel, items: Sequence[EvalItem]) -> str | list[str]:
    return model if isinstance(model, str) else model.names_for([item.prompt for item in items])


def _label(model: str | RoutedModel) -> str:
    return model if isinstance(model, str) else model.label


def compare(server: str | VLLMServer, tokenizer: Any, candidate: str | RoutedModel,
            champion: str | RoutedModel = "base", heldout: Iterable[Any] = (), corrections: Iterable[Any] = (),
            probes: Iterable[Any] = (), replayed: Iterable[Any] = (),
            max_tokens: int = DEFAULT_MAX_TOKENS) -> EvaluationReport:
    """Evaluate the candidate and the champion (a served name, "base" before the first promotion, or a routed
    bank) on the same items through the same server; empty groups are left out of both sides."""
    if _label(candidate) == _label(champion):
        raise InvalidInputError(f"candidate and champion are the same name '{_label(candidate)}': load the "
                                "candidate under its own name first")
    if not isinstance(server, VLLMServer):
        with VLLMServer(server) as client:
            return compare(client, tokenizer, candidate, champion, heldout, corrections, probes, replayed, max_tokens)
    tokenizer = load_tokenizer(tokenizer)  # once for both sides
    items = (as_items("heldout", heldout) + as_items("corrections", corrections) + as_items("probe", probes)
             + as_items("replay", replayed))
    start = time.perf_counter()
    log.info("evaluating %s and %s on %d items through %s", _label(candidate), _label(champion), len(items),
             server.base_url)
    cand_results = evaluate_items(server, tokenizer, _names(candidate, items), items, max_tokens)
    log.info("%s evaluated in %.0f s", _label(candidate), time.perf_counter() - start)
    champ_results = evaluate_items(server, tokenizer, _names(champion, items), items, max_tokens)
    cand, champ = summarize(cand_results), summarize(champ_results)
    return EvaluationReport(candidate_name=_label(candidate), champion_name=_label(champion), candidate=cand,
                            champion=champ,
                            derived=derive(cand, champ), candidate_results=cand_results,
                            champion_results=champ_results, seconds=time.perf_counter() - start)


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return "nan" if math.isnan(value) else f"{value:.3f}"


def _cell(text: str, limit: int = 80) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"
