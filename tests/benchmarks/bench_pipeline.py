"""The pipeline on the default model: wall time per stage, promotion latency, and serving while it learns.

Why: the pipeline must keep serving while it learns, and a promoted version must reach users quickly. One run of
this script, against the running local stack (`bash infra/stack.sh up; source .state/stack/env.sh`):

1. idle: a closed-loop load of chat requests on the vLLM server for `--window` seconds (throughput, latency);
2. seeds a fresh batch into S3 and runs the periodic-learning flow once while the same load keeps going;
3. reports the flow's wall time per stage, the promotion latency (gate decision -> first response from the
   promoted version under the stable name; registration in MLflow included) and the load's numbers during the
   run next to idle, side by side.

    .venv/bin/python tests/benchmarks/bench_pipeline.py            # writes results/bench/pipeline.json

The benchmark measures the machinery, not the model: it runs the flow with the retention rules of the gate relaxed
(`--strict-gate` keeps infra/pipeline.yaml's), so that a promotion happens and its latency can be measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import console, load_average, machine_info, print_table, summarize_ms, write_json

QUESTIONS = ["What is the capital of France?", "Name a primary color.", "What is 3+4?",
             "Say hello in Spanish.", "What is the largest planet?", "What do bees make?"]


class Load:
    """Closed-loop chat clients (each sends its next request when the last one returns)."""

    def __init__(self, url: str, model: str, clients: int, max_tokens: int) -> None:
        self.url, self.model, self.clients, self.max_tokens = url, model, clients, max_tokens
        self.samples: list[tuple[float, float, int, bool]] = []  # (start, seconds, tokens, ok)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _client(self, i: int) -> None:
        import httpx

        with httpx.Client(timeout=120) as http:
            n = 0
            while not self._stop.is_set():
                body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": QUESTIONS[(i + n) % len(QUESTIONS)]}]}
                start = time.perf_counter()
                try:
                    reply = http.post(self.url + "/v1/chat/completions", json=body)
                    ok = reply.status_code == 200
                    tokens = reply.json()["usage"]["completion_tokens"] if ok else 0
                except Exception:  # a failed request is a data point, not a crash of the benchmark
                    ok, tokens = False, 0
                self.samples.append((start, time.perf_counter() - start, tokens, ok))
                n += 1

    def start(self) -> None:
        self._stop.clear()
        self.samples = []
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self._threads:
            t.start()
        self.started = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        for t in self._threads:
            t.join()
        window = time.perf_counter() - self.started
        ok = [s for s in self.samples if s[3]]
        return {"seconds": round(window, 1), "requests": len(self.samples), "failed": len(self.samples) - len(ok),
                "tokens_per_s": round(sum(s[2] for s in ok) / window, 1),
                "requests_per_s": round(len(ok) / window, 2), "latency_ms": summarize_ms([s[1] for s in ok])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=float, default=60.0, help="idle measurement window, seconds")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default="results/bench/pipeline.json")
    parser.add_argument("--strict-gate", action="store_true", help="keep the configured gate rules")
    parser.add_argument("--labels", type=int, default=60, help="labelled records in the batch (main job: 60)")
    parser.add_argument("--corrections", type=int, default=10, help="corrections in the batch (main job: 10)")
    args = parser.parse_args()

    from cl_core.pipeline.config import PipelineConfig
    from flows.main_job import record_id, served_name
    from flows.periodic_learning import periodic_learning

    config = PipelineConfig.load()
    url = config.endpoints.vllm_urls[0]
    model = served_name(config)
    load = Load(url, model, args.clients, args.max_tokens)
    info = {"machine": machine_info(), "load_average_start": load_average(), "served_model": model}

    console.print(f"idle load for {args.window:.0f} s on {url} ({model}, {args.clients} clients)")
    load.start()
    time.sleep(args.window)
    idle = load.stop()

    from cl_core.data.experiences import ExperienceRecord, ExperienceWriter
    from cl_core.data.s3 import S3Settings, make_client
    from cl_core.data.seed import seed_records

    salt = uuid.uuid4().hex  # a fresh batch: these records were never learned
    # Its own experience prefix (and so its own watermark): batches seeded by earlier, interrupted benchmark runs
    # stay out of this run's pull (they would repeat this batch's prompts and fail validation as duplicates).
    os.environ["CL_S3_PREFIX"] = f"{os.environ.get('CL_S3_PREFIX', '').strip('/')}/bench/{salt[:12]}/".lstrip("/")
    settings = S3Settings.from_env()
    with ExperienceWriter(make_client(settings), settings) as writer:
        batch = seed_records(n_labels=args.labels, invalid=False)
        kept = [r for r in batch if r["kind"] == "correction"][:args.corrections]
        for fields in [r for r in batch if r["kind"] != "correction"] + kept:
            writer.add(ExperienceRecord(**{**fields, "id": record_id({**fields, "source": salt})}))

    console.print("pipeline run under the same load")
    load.start()
    start = time.perf_counter()
    relaxed = {"gate": {"max_probe_regression": 1.0, "max_retention_drop": 1.0}}
    state = periodic_learning(overrides=None if args.strict_gate else relaxed, return_state=True)
    flow_seconds = time.perf_counter() - start
    during = load.stop()
    if not state.is_completed():
        console.print(f"[red]flow failed: {state.message}[/]")
        return 1
    summary = state.result()

    print_table("Pipeline stages (default model)", ["stage", "seconds"],
                [(k, v) for k, v in summary["stage_seconds"].items()] + [("whole flow", round(flow_seconds, 1))])
    print_table("Serving under load", ["", "tok/s", "req/s", "p50 ms", "p95 ms", "failed"],
                [(name, r["tokens_per_s"], r["requests_per_s"], r["latency_ms"].get("p50_ms"),
                  r["latency_ms"].get("p95_ms"), r["failed"]) for name, r in (("idle", idle),
                                                                              ("during pipeline run", during))])
    console.print(f"outcome: {summary['outcome']}; promotion latency (gate decision -> first response from the "
                  f"promoted version): {summary['promotion_seconds']} s")
    result = {**info, "batch": {"labels": args.labels, "corrections": args.corrections},
              "outcome": summary["outcome"], "stage_seconds": summary["stage_seconds"],
              "flow_seconds": round(flow_seconds, 1), "promotion_seconds": summary["promotion_seconds"],
              "training": summary["training"], "serving_idle": idle, "serving_during_run": during,
              "throughput_ratio_during_vs_idle": round(during["tokens_per_s"] / max(idle["tokens_per_s"], 1e-9), 3)}
    console.print(f"wrote {write_json(Path(args.out), result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
