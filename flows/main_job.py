"""The main job (README's first command, after `infra/stack.sh up`): one learning round, end to end, shown.

1. registers the deployments (the schedule stays registered for the next runs),
2. asks the vLLM server the questions users are about to correct (the answers clients get today),
3. seeds S3 with a batch of experiences from packaged data: corrections of facts the default model gets wrong,
   labelled data of a new task, ratings, plus a few invalid records and a truncated object that validation must
   quarantine,
4. runs the periodic-learning flow once (a Prefect flow run, visible in the UI),
5. asks the same questions again through the stable name and prints the gate's decision and the URLs.

Exits non-zero when the flow fails, or when it promoted a version that does not answer the corrections.
Re-running is safe: the seed records have content-derived ids, so a second run finds them already learned.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from cl_core.data.seed import WRONG_FACTS, malformed_object_body, seed_records
from cl_core.pipeline.config import PipelineConfig

SEED_NAMESPACE = uuid.UUID("6f1c2b0e-8d7a-4c55-9a43-3f0e2d1c5b77")
RETENTION_QUESTIONS = ("What is the capital of France?", "What is the capital of Japan?",
                       "What is the capital of Russia?", "What is 2+2?")


def record_id(fields: dict[str, Any]) -> str:
    """Same content, same id: a re-seeded record is recognised as already learned."""
    key = "\x1f".join(str(fields.get(k)) for k in ("kind", "prompt", "response", "chosen", "reward", "source"))
    return uuid.uuid5(SEED_NAMESPACE, key).hex


def seed_s3(config: PipelineConfig) -> int:
    """Write the seed batch as the serving side would: whole JSONL objects under the documented layout."""
    from cl_core.data.experiences import ExperienceRecord, ExperienceWriter, object_key
    from cl_core.data.s3 import S3Settings, make_client

    settings = S3Settings.from_env()
    client = make_client(settings)
    records = [ExperienceRecord(**{**r, "id": record_id(r)}) for r in seed_records()]
    with ExperienceWriter(client, settings) as writer:
        for record in records:
            writer.add(record)
    now = datetime.now(UTC)
    client.put_object(Bucket=settings.bucket, Key=object_key(settings, "interaction", now, now),
                      Body=malformed_object_body())
    return len(records) + 1


def ask(config: PipelineConfig, questions: list[str], model: str) -> list[str]:
    from cl_core.serving.client import VLLMServer

    server = VLLMServer(config.endpoints.vllm_urls[0])
    return [a.strip().replace("\n", " ")[:70] for a in server.chat(model, questions, max_tokens=24)]


def ask_gateway(config: PipelineConfig, questions: list[str]) -> list[str]:
    """What clients of the gateway get for `continual` (routed per request through the promoted bank), each
    answer tagged with the adapter that gave it (`base` when the router sent it to the base model)."""
    import httpx

    out = []
    with httpx.Client(base_url=config.endpoints.gateway_url, timeout=120) as client:
        for question in questions:
            reply = client.post("/v1/chat/completions", json={
                "model": config.stable_name, "messages": [{"role": "user", "content": question}],
                "max_tokens": 24, "temperature": 0})
            reply.raise_for_status()
            text = reply.json()["choices"][0]["message"]["content"].strip().replace("\n", " ")[:60]
            out.append(f"({reply.headers.get('x-cl-adapter', '?')}) {text}")
    return out


def bank_served(config: PipelineConfig) -> bool:
    """True when the gateway routes through a bank manifest this pipeline promoted."""
    from tasks.clients import champion_bank

    return config.endpoints.gateway_url is not None and champion_bank(config) is not None


def served_name(config: PipelineConfig) -> str:
    from cl_core.serving.client import VLLMServer

    return config.stable_name if config.stable_name in VLLMServer(config.endpoints.vllm_urls[0]).models() else "base"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.main_job", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="pipeline YAML (default: infra/pipeline.yaml)")
    args = parser.parse_args(argv)
    console = Console()
    config = PipelineConfig.load(args.config)
    from flows.deploy import deploy
    from flows.periodic_learning import periodic_learning

    console.print("[bold]1. Deployments registered[/] (periodic-learning on its schedule, rollback, "
                  "forgetting-experiment)")
    with contextlib.redirect_stdout(io.StringIO()):  # Prefect prints a table per deployment
        deploy(args.config)
    corrections = [q for q, _, _ in WRONG_FACTS]
    questions = corrections + list(RETENTION_QUESTIONS)
    before_model = served_name(config)
    before = ask(config, questions, before_model)
    n = seed_s3(config)
    console.print(f"[bold]2. Seeded S3[/] with {n} experience records/objects "
                  f"(s3://{config.endpoints.s3_bucket}/experiences/...)")
    console.print("[bold]3. Running the periodic-learning flow once[/] (pull → validate → train → evaluate → gate "
                  "→ register → promote)")
    start = time.perf_counter()
    state = periodic_learning(config_path=args.config, return_state=True)
    seconds = time.perf_counter() - start
    if state.is_failed():
        console.print(f"[red]the flow run failed after {seconds:.0f} s:[/] {state.message}")
        return 1
    summary = state.result()
    if bank_served(config):
        after_model = f"gateway: {config.stable_name} routed through the bank"
        after = ask_gateway(config, questions)
    else:
        after_model = served_name(config)
        after = ask(config, questions, after_model)
    candidate = {a["prompt"]: a["candidate"] for a in summary.get("answers", [])}
    short = {q: (candidate[q].strip().replace("\n", " ")[:70] if q in candidate else "–") for q in corrections}

    table = Table(title=f"4. Answers from the vLLM server: served before ({before_model}), the candidate "
                        f"(evaluated under its own name), served after ({after_model})")
    for column in ("question", "before", "candidate", "after"):
        table.add_column(column, overflow="fold")
    for q, b, a in zip(questions, before, after, strict=True):
        table.add_row(q, b, short.get(q, "–"), a)
    console.print(table)
    lost = [a for a in summary.get("answers", []) if a["group"] == "probe" and a["champion_ok"]
            and not a["candidate_ok"]]
    if lost:
        console.print(f"   retention probes the candidate lost ({len(lost)}):")
        for a in lost:
            console.print(f"     {a['prompt']}  champion: {a['champion'].strip()[:50]!r}  candidate: "
                          f"{a['candidate'].strip()[:50]!r}")
    console.print(f"[bold]5. Outcome[/] ({seconds:.0f} s): {summary['outcome']}")
    for check in summary.get("gate", {}).get("checks", []):
        status = "skip" if check.get("skipped") else ("pass" if check.get("passed") else "FAIL")
        console.print(f"   gate {status}: {check.get('reason', '')}")
    console.print("[bold]6. Where to look[/]")
    for label, url in (("Prefect flow run", summary.get("flow_run_url")),
                       ("MLflow model version", summary.get("version_url")),
                       ("MLflow run", summary.get("run_url")),
                       ("Prefect UI", os.environ.get("PREFECT_UI_URL")),
                       ("Gateway (OpenAI API, model 'continual')",
                        config.endpoints.gateway_url + "/v1" if config.endpoints.gateway_url else None),
                       ("vLLM (OpenAI API)", config.endpoints.vllm_urls[0] + "/v1")):
        if url:
            console.print(f"   {label}: {url}")
    console.print("   Next runs: the `periodic-learning/scheduled` deployment, every "
                  f"{config.schedule.cron or str(config.schedule.interval_minutes) + ' min'}.")
    if summary.get("promoted"):
        corrected = [good.split(" is ")[-1].rstrip(".").lower() for _, _, good in WRONG_FACTS]
        adopted = sum(c in a.lower() for c, a in zip(corrected, after, strict=False))
        console.print(f"   corrections now answered: {adopted}/{len(corrected)}")
        if adopted < len(corrected) // 2:
            console.print("[red]the promoted version answers fewer than half of the corrections[/]")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
