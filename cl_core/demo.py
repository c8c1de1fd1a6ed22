"""The demo: a question the model gets wrong, a correction, live learning, and proof nothing else broke.

Runs on the embedded default model. Exit code 0 only if the correction stuck and every retention probe still
gives its answer; both checks use the served greedy answer and the vLLM log-probability of the reference answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from cl_core.config import ContinualConfig

# (question, wrong answers a small model tends to give, the correction). The first one the model gets wrong is used.
CORRECTIONS = [
    ("What is the capital of Turkey?", "Ankara", "The capital of Turkey is Ankara."),
    ("What is the largest planet in the solar system?", "Jupiter",
     "The largest planet in the solar system is Jupiter."),
    ("What is the square root of 81?", "9", "The square root of 81 is 9."),
]
# Unrelated knowledge the default model answers stably (greedy, bf16, any batch composition seen).
RETENTION_PROBES = [
    ("What is the capital of Japan?", "Tokyo", "The capital of Japan is Tokyo."),
    ("What is the capital of France?", "Paris", "The capital of France is Paris."),
    ("What is the capital of Italy?", "Rome", "The capital of Italy is Rome."),
    ("What is the capital of Germany?", "Berlin", "The capital of Germany is Berlin."),
]


@dataclass
class DemoResult:
    question: str
    before: str
    after: str
    correction_stuck: bool
    version: int | None
    retention: list[dict[str, object]] = field(default_factory=list)

    @property
    def retention_kept(self) -> bool:
        return all(bool(p["kept"]) for p in self.retention)


def run_demo(config: ContinualConfig | None = None, console: Console | None = None) -> DemoResult:
    """Run the whole demo and return what happened (the CLI turns it into an exit code)."""
    from cl_core.continual import ContinualLLM

    console = console or Console()
    config = config or ContinualConfig(max_model_len=1024)
    with console.status("starting vLLM on the base model (first start takes ~30 s)..."):
        model = ContinualLLM(config)
    try:
        console.print(f"[bold]engine ready[/]: {model.model_path} ({config.serving_mode} mode)")
        questions = [q for q, _, _ in CORRECTIONS] + [q for q, _, _ in RETENTION_PROBES]
        answers = dict(zip(questions, model.generate(questions, max_tokens=32), strict=True))
        before_scores = {q: model.score(q, ref).mean_logprob for q, _, ref in RETENTION_PROBES}
        wrong = next(((q, key, good) for q, key, good in CORRECTIONS if key not in answers[q]), None)
        if wrong is None:
            console.print("[yellow]the model already answers every demo question correctly; nothing to correct[/]")
            return DemoResult("", "", "", True, None)
        question, key, good = wrong
        console.print(f"\n[bold]1. A question it gets wrong[/]\n  Q: {question}\n  A: [red]{answers[question]}[/]")
        console.print(f"\n[bold]2. A user corrects it[/]\n  -> [green]{good}[/]")
        with console.status("3. learning from the correction (LoRA on the learner, vLLM keeps serving)..."):
            report = model.learn_from_correction(prompt=question, bad_response=answers[question],
                                                 good_response=good)
        console.print(f"\n[bold]3. Learned[/] in {report.steps} steps, {report.seconds:.1f} s: loss "
                      f"{report.loss_before:.3f} -> {report.loss_after:.3f}, token margin {report.min_margin:.2f}")
        version = report.version.name if report.version else "none (nothing published)"
        console.print(f"[bold]4. Published[/] {version} into the running engine (no restart)")
        after = model.generate(question, max_tokens=32)
        stuck = key in after
        console.print(f"\n[bold]5. Asked again[/] (served by {after.adapter_name})\n  Q: {question}\n  A: "
                      f"[{'green' if stuck else 'red'}]{after}[/]")
        table = Table(title="6. Unrelated knowledge, before -> after")
        for column in ("question", "before", "after", "logprob of reference (mean/token)", "kept"):
            table.add_column(column)
        result = DemoResult(question, answers[question], str(after), stuck,
                            report.version.version if report.version else None)
        after_answers = model.generate([q for q, _, _ in RETENTION_PROBES], max_tokens=32)
        for (q, key_p, ref), answer in zip(RETENTION_PROBES, after_answers, strict=True):
            score = model.score(q, ref).mean_logprob
            kept = key_p in answer
            result.retention.append({"question": q, "before": str(answers[q]), "after": str(answer),
                                     "ref_logprob_before": before_scores[q], "ref_logprob_after": score,
                                     "kept": kept})
            table.add_row(q, str(answers[q]), str(answer), f"{before_scores[q]:.3f} -> {score:.3f}",
                          "[green]yes[/]" if kept else "[red]NO[/]")
        console.print(table)
        verdict = "[green]correction stuck[/]" if stuck else "[red]correction did NOT stick[/]"
        kept_text = "[green]kept[/]" if result.retention_kept else "[red]some LOST[/]"
        console.print(f"\n{verdict}; unrelated knowledge {kept_text}")
        return result
    finally:
        model.close()
