"""Routing of the adapter bank on the default model: accuracy in scope, rejection out of scope, cost per request.

Why: the bank protects what the model knew only if each request reaches the adapter that learned its kind of prompt
and everything else reaches the base model. This script measures that for every router on the frozen default
model's embeddings (`cl_core.bank.embedder.BaseEmbedder("smollm2-135m-instruct")`), and what routing costs.

    .venv/bin/python tests/benchmarks/bench_routing.py             # 100 train / 50 test prompts per task
    .venv/bin/python tests/benchmarks/bench_routing.py --quick     # 30 / 20, two held-out tasks
    .venv/bin/python tests/benchmarks/bench_routing.py --cache /tmp/routing.npz   # reuse embeddings on reruns

Embedding the ~1,100 prompts of the default run takes 5-15 minutes on 2 shared cores (0.3-0.8 s per ~100-token
prompt in fp32); the routers themselves take milliseconds.

The routing task, all from data packaged with the project (no download beyond the task streams' own cache):
- in scope: one adapter per task of the default task stream (`cl_core.streams.DEFAULT_SEQUENCE`); each router
  observes the adapter's train prompts and is tested on that task's test prompts (disjoint);
- out of scope, used by `fit` (calibration): half of the general questions of `cl_core/methods/
  neighbourhood_pool.json` (split by subject: both wordings of a subject fall on the same side) and the retention
  anchors (`cl_core/pipeline/anchors.json`);
- out of scope, test only: the other half of the pool, the retention probes (`cl_core/pipeline/probes.json`) and
  the test prompts of task-stream tasks no adapter learned (`--held-out`): prompts of a kind no fit has seen, the
  hard case (an unseen classification task looks more like the in-scope tasks than a general question does).
The `task_id` router is the reference: in-scope requests carry their task name, out-of-scope ones none.

Cost: embedding ms/request (one prompt per call, and batches of 32) and routing ms/request (batch 1 and 32),
medians over repeated calls; the router's state size on disk (`save_router`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import console, machine_info, print_table, summarize_ms, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cl_core.bank.router import Router, RouteRequest, make_router, save_router
from cl_core.streams import DEFAULT_SEQUENCE, load_task

ROOT = Path(__file__).resolve().parents[2]

HELD_OUT = ("bigbench/object_counting", "reasoning_gym/basic_arithmetic", "bigbench/sports_understanding",
            "bigbench/navigate")
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "task_id (reference)": ("task_id", {}),
    "embedding": ("embedding", {}),
    "embedding top_k=5": ("embedding", {"top_k": 5}),
    "embedding, raw cosine": ("embedding", {"center": False}),
    "learned": ("learned", {}),
    "learned, no novelty gate": ("learned", {"novelty_slack": None}),
}


def general_questions() -> tuple[list[str], list[str], list[str]]:
    """(fit, test) halves of the neighbourhood pool split by subject, plus the anchors (fit) and probes (test)."""
    pool = json.loads((ROOT / "cl_core/methods/neighbourhood_pool.json").read_text())["questions"]
    fit_half = [q for i, q in enumerate(pool) if (i // 2) % 2 == 0]  # the pool lists two wordings per subject
    test_half = [q for i, q in enumerate(pool) if (i // 2) % 2 == 1]
    anchors = json.loads((ROOT / "cl_core/pipeline/anchors.json").read_text())["prompts"]
    probes = [p["prompt"] for p in json.loads((ROOT / "cl_core/pipeline/probes.json").read_text())["probes"]]
    return fit_half + list(anchors), test_half, probes


def load_cache(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """Embeddings saved by an earlier run with the same embedder and prompts, else None."""
    if not path.is_file():
        return None
    with np.load(path) as data:
        if str(data["__key__"]) != key:
            return None
        return {name: data[name] for name in data.files if name != "__key__"}


def save_cache(path: Path, key: str, vectors: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, __key__=np.array(key), **vectors)
    os.replace(tmp, path)


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def embedding_cost(embedder: Any, prompts: Sequence[str], repeats: int) -> dict[str, Any]:
    """ms per request embedding one prompt per call, and a batch of 32 per call."""
    embedder.embed([prompts[0]])  # warm-up (first call allocates)
    tokens = [len(embedder.tokenizer(embedder._text(p), add_special_tokens=False)["input_ids"])
              for p in prompts[:repeats]]
    singles = [timed(lambda p=p: embedder.embed([p]), 1)[0] for p in prompts[:repeats]]
    batch = list(prompts[:32]) * (32 // max(1, len(prompts[:32])) + 1)
    batch = batch[:32]
    batches = timed(lambda: embedder.embed(batch), max(2, repeats // 8))
    return {"tokens_per_prompt_mean": statistics.fmean(tokens), "batch_1": summarize_ms(singles),
            "batch_32": summarize_ms(batches),
            "batch_1_ms_per_request": statistics.median(singles) * 1000,
            "batch_32_ms_per_request": statistics.median(batches) * 1000 / 32}


def routing_cost(router: Router, requests: Sequence[RouteRequest], repeats: int) -> dict[str, float]:
    singles = [timed(lambda r=r: router.route([r]), 1)[0] for r in list(requests)[:repeats]]
    batch = (list(requests) * (32 // len(requests) + 1))[:32]
    batches = timed(lambda: router.route(batch), repeats)
    return {"batch_1_ms_per_request": statistics.median(singles) * 1000,
            "batch_32_ms_per_request": statistics.median(batches) * 1000 / 32}


def evaluate(router: Router, groups: dict[str, tuple[list[RouteRequest], list[str | None]]]) -> dict[str, Any]:
    """Per group: share routed to the expected adapter (in scope) or to the base (out of scope)."""
    out: dict[str, Any] = {}
    for group, (requests, expected) in groups.items():
        routes = router.route(requests)
        adapters = [r.adapter for r in routes]
        right = sum(a == e for a, e in zip(adapters, expected, strict=True)) / len(requests)
        to_base = sum(a is None for a in adapters) / len(requests)
        wrong = sum(a is not None and a != e for a, e in zip(adapters, expected, strict=True)) / len(requests)
        out[group] = {"n": len(requests), "correct": right, "to_base": to_base, "wrong_adapter": wrong}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (embedding space)")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_SEQUENCE), help="in-scope tasks, one adapter each")
    parser.add_argument("--held-out", nargs="*", default=list(HELD_OUT), help="tasks no adapter learns (test only)")
    parser.add_argument("--n-train", type=int, default=100, help="train prompts per task (observed by the routers)")
    parser.add_argument("--n-test", type=int, default=50, help="test prompts per task")
    parser.add_argument("--quick", action="store_true", help="smoke run: 30 train / 20 test, two held-out tasks")
    parser.add_argument("--repeats", type=int, default=32, help="timed calls per cost measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/bench_routing.json"), help="JSON result file")
    parser.add_argument("--cache", type=Path, default=None,
                        help="reuse the prompt embeddings of an earlier run (an .npz written here when missing or "
                             "stale; keyed by embedder identity and prompt texts); costs are measured anyway")
    args = parser.parse_args(argv)
    n_train, n_test = (30, 20) if args.quick else (args.n_train, args.n_test)
    held_out = args.held_out[:2] if args.quick else args.held_out
    if n_train < 2 or n_test < 1 or args.repeats < 2:
        parser.error("--n-train must be ≥ 2, --n-test ≥ 1, --repeats ≥ 2")
    overlap = sorted(set(held_out) & set(args.tasks))
    if overlap:
        parser.error(f"held-out tasks must not be in-scope tasks: {overlap}")

    from cl_core.bank.embedder import BaseEmbedder

    info = machine_info()
    console.print(f"[bold]bench_routing[/bold]: {len(args.tasks)} adapters x {n_train} train / {n_test} test, "
                  f"held out {len(held_out)} tasks, {info['cpu_count']} CPUs, load {info['load_average_at_start']}")
    start = time.perf_counter()
    embedder = BaseEmbedder(args.model)
    load_s = time.perf_counter() - start
    console.print(f"embedder: {embedder.model_path}, layer {embedder.layer}, dim {embedder.dim} ({load_s:.1f} s)")

    tasks = {name: load_task(name, n_train=n_train, n_test=n_test, seed=args.seed) for name in args.tasks}
    held = {name: load_task(name, n_train=1, n_test=n_test, seed=args.seed) for name in held_out}
    oos_fit, oos_general, probes = general_questions()

    texts: dict[str, list[str]] = {}
    for name, task in tasks.items():
        texts[f"train:{name}"] = [e.prompt for e in task.train]
        texts[f"test:{name}"] = [e.prompt for e in task.test]
    for name, task in held.items():
        texts[f"held:{name}"] = [e.prompt for e in task.test]
    texts |= {"oos_fit": oos_fit, "oos_general": oos_general, "probes": probes}
    total = sum(len(v) for v in texts.values())
    key = hashlib.sha256(json.dumps([embedder.identity.to_dict(), texts], sort_keys=True).encode()).hexdigest()
    vectors = load_cache(args.cache, key) if args.cache else None
    embed_all_s = float("nan")
    if vectors is None:
        console.print(f"embedding {total} prompts")
        start = time.perf_counter()
        vectors = {name: embedder.embed(prompts) for name, prompts in texts.items()}
        embed_all_s = time.perf_counter() - start
        console.print(f"  {embed_all_s:.1f} s ({embed_all_s / total * 1000:.1f} ms/prompt, batches of "
                      f"{embedder.batch_size})")
        if args.cache:
            save_cache(args.cache, key, vectors)
    else:
        console.print(f"{total} prompt embeddings reused from {args.cache}")

    def requests(key: str, task: str | None) -> list[RouteRequest]:
        return [RouteRequest(p, task=task, embedding=v) for p, v in zip(texts[key], vectors[key], strict=True)]

    in_scope_requests, in_scope_expected = [], []
    for name in tasks:
        in_scope_requests += requests(f"test:{name}", name)
        in_scope_expected += [name] * len(texts[f"test:{name}"])
    groups: dict[str, tuple[list[RouteRequest], list[str | None]]] = {
        "in_scope": (in_scope_requests, in_scope_expected),
        "oos_general": (requests("oos_general", None), [None] * len(oos_general)),
        "oos_probes": (requests("probes", None), [None] * len(probes)),
    }
    for name in held:
        groups[f"oos_task:{name}"] = (requests(f"held:{name}", None), [None] * len(texts[f"held:{name}"]))
    unseen = [r for key, (reqs, _) in groups.items() if key != "in_scope" for r in reqs]
    groups["oos_all_test"] = (unseen, [None] * len(unseen))

    console.print("embedding cost")
    cost_embed = embedding_cost(embedder, texts[f"test:{args.tasks[0]}"] + texts["probes"], args.repeats)

    results: dict[str, Any] = {}
    workspace = Path(tempfile.mkdtemp(prefix="cl_bench_routing-"))
    try:
        for label, (name, options) in VARIANTS.items():
            router = make_router(name, **options)
            if hasattr(router, "set_embedder_identity"):
                router.set_embedder_identity(embedder.identity)
            start = time.perf_counter()
            for task in tasks:
                router.observe(task, texts[f"train:{task}"], vectors[f"train:{task}"])
            observe_s = time.perf_counter() - start
            start = time.perf_counter()
            stats = router.fit(vectors["oos_fit"])
            fit_s = time.perf_counter() - start
            quality = evaluate(router, groups)
            cost = routing_cost(router, in_scope_requests[::7] + groups["oos_all_test"][0][::7], args.repeats)
            saved = save_router(router, workspace / label.replace(" ", "_"))
            state_bytes = sum(f.stat().st_size for f in saved.iterdir())
            results[label] = {"router": name, "options": options, "fit_stats": stats, "observe_s": observe_s,
                              "fit_s": fit_s, "quality": quality, "cost": cost, "state_bytes": state_bytes}
            console.print(f"{label}: in scope {quality['in_scope']['correct']:.3f}, out of scope rejected "
                          f"{quality['oos_all_test']['to_base']:.3f}")
    finally:
        shutil.rmtree(workspace, ignore_errors=True)

    rows = []
    for label, r in results.items():
        q = r["quality"]
        rows.append((label, q["in_scope"]["correct"], q["in_scope"]["wrong_adapter"], q["in_scope"]["to_base"],
                     q["oos_general"]["to_base"], q["oos_probes"]["to_base"],
                     statistics.fmean(q[f"oos_task:{n}"]["to_base"] for n in held) if held else float("nan"),
                     q["oos_all_test"]["to_base"], r["fit_s"]))
    print_table(f"Routing quality, {len(tasks)} adapters ({n_train} train / {n_test} test prompts each), "
                f"{args.model}", ["router", "in-scope acc", "wrong adapter", "in-scope to base",
                                  "rej general", "rej probes", "rej held-out tasks", "rej all OOS", "fit s"], rows)
    print_table("Rejection of held-out tasks (prompts of a kind no fit saw)", ["router", *held],
                [(label, *(r["quality"][f"oos_task:{n}"]["to_base"] for n in held)) for label, r in results.items()])
    def fmt(value: Any) -> str:
        return "-" if value is None or value != value else f"{value:.4f}"

    print_table("Calibration (fit statistics on the data it was given; learned: novelty gate thresholds)",
                ["router", "threshold min", "threshold max", "in-scope recall", "OOS rejection", "n_in", "n_out"],
                [(label, fmt(st.get("threshold", st.get("novelty_threshold"))), fmt(st.get("threshold_max")),
                  st.get("in_scope_recall", float("nan")), st.get("out_of_scope_rejection", float("nan")),
                  st.get("n_in", st.get("n_examples", float("nan"))), st.get("n_out", float("nan")))
                 for label, st in ((label, r["fit_stats"]) for label, r in results.items())])
    print_table("Cost per request (ms)", ["step", "batch 1", "batch 32", "state on disk, KiB"],
                [(f"embed (BaseEmbedder, fp32, {cost_embed['tokens_per_prompt_mean']:.0f} tokens/prompt)",
                  cost_embed["batch_1_ms_per_request"],
                  cost_embed["batch_32_ms_per_request"], "")]
                + [(f"route: {label}", r["cost"]["batch_1_ms_per_request"], r["cost"]["batch_32_ms_per_request"],
                    r["state_bytes"] / 1024) for label, r in results.items()])
    result = {
        "benchmark": "routing",
        "quick": args.quick,
        "model": embedder.model_path,
        "embedder": embedder.identity.to_dict(),
        "workload": {"in_scope_tasks": list(tasks), "held_out_tasks": list(held), "n_train": n_train,
                     "n_test": n_test, "seed": args.seed, "oos_fit": len(oos_fit), "oos_general_test": len(oos_general),
                     "probes": len(probes), "prompts_embedded": total},
        "embedder_load_s": load_s, "embed_all_s": embed_all_s, "embedding_cost": cost_embed,
        "routers": results, "machine": info,
    }
    path = write_json(args.out, result)
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
