"""Experience store: add throughput, fill time, sampling latency and memory, up to a million experiences.

Why: the store sits on the serving path (every interaction is added) and on the learning path (every training
step samples a replay batch), and it must stay bounded however long the system runs. This script fills a store
to N experiences and checks the targets: ≥ 5,000 adds/s in batches of 1000, sampling 64 by priority from N=1M
in ≤ 10 ms, and flat memory (RSS) while adding past `buffer_size`.

    .venv/bin/python tests/benchmarks/bench_store.py              # N = 1,000,000 (a few minutes)
    .venv/bin/python tests/benchmarks/bench_store.py --quick      # N = 20,000 (seconds)

Phases, on a fresh database in a temporary directory (the store's own settings: WAL, synchronous=FULL):
1. single adds (`add`, one transaction and one fsync each) into a separate store;
2. batched fill to N (`add_many` of 1000) with buffer_size = N: time to fill and adds/s;
3. half of the experiences marked learned with losses, a tenth re-prioritized (`update_priorities`);
4. 200 draws each of 64 by priority (learned only, and from all N), uniform, recent; fewer of `top` and of a
   mixed batch; with the approaches they replace for comparison: SQL `ORDER BY RANDOM()` (the old uniform
   sampling) and `numpy.random.choice(p=...)` over all weights (proportional sampling without a sum-tree);
5. N/5 more experiences past buffer_size (every batch evicts): adds/s and RSS every batch;
6. reopening the file (the sum-tree is rebuilt from SQLite) and the store's full integrity check.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import console, machine_info, print_table, summarize_ms, verdict, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cl_core.store import ExperienceStore

TARGET_BATCHED_ADDS_PER_S = 5_000.0
TARGET_PRIORITY_MS = 10.0        # sampling 64 by priority from 1M, p95
TARGET_RSS_GROWTH_MIB = 32.0     # while adding N/5 past buffer_size
BATCH = 1000
SAMPLE_N = 64
TASKS = ("maths", "poems", "code", "chat")


def rss_mib() -> float:
    """Resident set size now (not the peak), from /proc; the value a memory leak would make grow."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def records(start: int, count: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Realistic rows: ~80-char prompts, ~250-char responses, rewards mostly in (0, 1], ~10% ≤ 0 (feedback)."""
    rewards = np.where(rng.random(count) < 0.1, -rng.random(count), rng.random(count) + 1e-3)
    return [dict(prompt=f"Question {i}: explain how the interval [{i}, {2 * i}] relates to the previous answer.",
                 response=f"Answer {i}: " + "the interval doubles its left end, so its length equals the start. " * 4,
                 reward=float(r), task=TASKS[i % len(TASKS)], metadata={"n": i})
            for i, r in zip(range(start, start + count), rewards, strict=True)]


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def bench_single_adds(path: Path, n: int, rng: np.random.Generator) -> dict[str, Any]:
    store = ExperienceStore(path, buffer_size=max(n, 10))
    rows = records(0, n, rng)
    times = []
    start = time.perf_counter()
    for row in rows:
        t = time.perf_counter()
        store.add(**row)
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    store.close()
    return {"adds": n, "adds_per_s": n / total, "latency": summarize_ms(times)}


def bench_fill(store: ExperienceStore, n: int, rng: np.random.Generator) -> dict[str, Any]:
    batch_times = []
    start = time.perf_counter()
    for begin in range(0, n, BATCH):
        rows = records(begin, min(BATCH, n - begin), rng)
        t = time.perf_counter()
        store.add_many(rows)
        batch_times.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    insert_only = sum(batch_times)
    last = batch_times[-max(1, len(batch_times) // 10):]
    return {"items": n, "fill_seconds": total, "adds_per_s": n / total,
            "adds_per_s_excluding_record_generation": n / insert_only,
            "adds_per_s_last_10pct": len(last) * BATCH / sum(last), "batch_latency": summarize_ms(batch_times)}


def bench_updates(store: ExperienceStore, n: int, rng: np.random.Generator) -> dict[str, Any]:
    ids = np.arange(1, n + 1)
    learned = ids[rng.random(n) < 0.5]
    start = time.perf_counter()
    for begin in range(0, len(learned), 10_000):
        part = learned[begin:begin + 10_000]
        store.mark_learned(part.tolist(), rng.random(len(part)).tolist())
    learned_s = time.perf_counter() - start
    chosen = ids[rng.random(n) < 0.1]
    start = time.perf_counter()
    for begin in range(0, len(chosen), 10_000):
        part = chosen[begin:begin + 10_000]
        store.update_priorities(part.tolist(), (rng.random(len(part)) * 2).tolist())
    prio_s = time.perf_counter() - start
    return {"mark_learned": {"items": len(learned), "per_s": len(learned) / learned_s},
            "update_priorities": {"items": len(chosen), "per_s": len(chosen) / prio_s}}


def bench_sampling(store: ExperienceStore, draws: int) -> dict[str, Any]:
    every = ["pending", "learned", "feedback_only"]
    cases: dict[str, tuple[Callable[[], Any], int]] = {
        "priority_learned": (lambda: store.sample(SAMPLE_N, "priority"), draws),
        "priority_all": (lambda: store.sample(SAMPLE_N, "priority", status=every), draws),
        "uniform_learned": (lambda: store.sample(SAMPLE_N, "uniform"), draws),
        "uniform_all": (lambda: store.sample(SAMPLE_N, "uniform", status=every), draws),
        "recent_learned": (lambda: store.sample(SAMPLE_N, "recent"), draws),
        "top_learned": (lambda: store.sample(SAMPLE_N, "top"), max(5, draws // 10)),
        "mixed_batch_half_replay": (lambda: store.sample_mixed(SAMPLE_N, 0.5), max(5, draws // 10)),
    }
    out = {}
    for name, (fn, repeats) in cases.items():
        fn()  # warm the page cache: the steady state of a serving system
        times, result = timed(fn, repeats)
        out[name] = summarize_ms(times) | {"returned": len(result)}
    return out


def bench_baselines(store: ExperienceStore, repeats: int) -> dict[str, Any]:
    """What the sum-tree replaces: SQL random order over every row, and weighted choice over every weight."""
    db = sqlite3.connect(store.path)
    random_order, _ = timed(lambda: db.execute("SELECT id FROM experiences WHERE status = 'learned' "
                                               "ORDER BY RANDOM() LIMIT ?", (SAMPLE_N,)).fetchall(), repeats)
    db.close()
    weights = store._weights(store._state.raw, store._state.anchor) * (store._state.group >= 0)
    rng = np.random.default_rng(0)
    choice, _ = timed(lambda: rng.choice(len(weights), SAMPLE_N, replace=False, p=weights / weights.sum()), repeats)
    return {"sql_order_by_random": summarize_ms(random_order), "numpy_weighted_choice": summarize_ms(choice)}


def bench_past_buffer(store: ExperienceStore, start: int, extra: int, rng: np.random.Generator) -> dict[str, Any]:
    rss = [rss_mib()]
    begin_t = time.perf_counter()
    insert_s = 0.0
    for begin in range(start, start + extra, BATCH):
        rows = records(begin, min(BATCH, start + extra - begin), rng)
        t = time.perf_counter()
        store.add_many(rows)
        insert_s += time.perf_counter() - t
        rss.append(rss_mib())
    total = time.perf_counter() - begin_t
    half = len(rss) // 2
    return {"items_added": extra, "stored_after": len(store), "adds_per_s": extra / total,
            "adds_per_s_excluding_record_generation": extra / insert_s,
            "rss_mib_start": rss[0], "rss_mib_end": rss[-1], "rss_mib_max": max(rss),
            "rss_growth_mib": rss[-1] - rss[0], "rss_growth_second_half_mib": rss[-1] - rss[half],
            "rss_mib_every_10pct": [rss[i] for i in range(0, len(rss), max(1, len(rss) // 10))]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000, help="N: experiences to store (= buffer_size)")
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 20,000")
    parser.add_argument("--draws", type=int, default=200, help="timed draws per sampling strategy")
    parser.add_argument("--single", type=int, default=None, help="single adds to time (default 500; quick 100)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_store.json"), help="JSON result file")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the database (default: a temp dir)")
    args = parser.parse_args(argv)
    n = 20_000 if args.quick else args.items
    single = args.single or (100 if args.quick else 500)
    if n < BATCH or args.draws < 1 or single < 1:
        parser.error(f"--items must be ≥ {BATCH}, --draws and --single ≥ 1")
    info = machine_info()
    console.print(f"[bold]bench_store[/bold]: N = {n:,}, {info['cpu_count']} CPUs ({info['cpu_model']}), "
                  f"SQLite {sqlite3.sqlite_version}, load {info['load_average_at_start']}")
    workspace = Path(tempfile.mkdtemp(prefix="cl_bench_store-", dir=args.dir))
    rng = np.random.default_rng(0)
    try:
        console.print(f"single adds: {single}")
        singles = bench_single_adds(workspace / "single.sqlite", single, rng)
        store = ExperienceStore(workspace / "store.sqlite", buffer_size=n, seed=0)
        rss_empty = rss_mib()
        console.print(f"batched fill to {n:,}")
        fill = bench_fill(store, n, rng)
        console.print("mark_learned / update_priorities")
        updates = bench_updates(store, n, rng)
        console.print(f"sampling, {args.draws} draws each")
        sampling = bench_sampling(store, args.draws)
        baselines = bench_baselines(store, repeats=5 if n >= 200_000 else 20)
        extra = max(n // 5, 10 * BATCH)
        console.print(f"{extra:,} more, past buffer_size (evicting)")
        past = bench_past_buffer(store, n, extra, rng)
        priority_after = summarize_ms(timed(lambda: store.sample(SAMPLE_N, "priority"), args.draws)[0])
        store.close()
        start = time.perf_counter()
        reopened = ExperienceStore(workspace / "store.sqlite", buffer_size=n)
        stored = len(reopened)
        reopen_s = time.perf_counter() - start
        start = time.perf_counter()
        problems = reopened.check_integrity()
        check_s = time.perf_counter() - start
        reopened.close()
        db_bytes = sum(f.stat().st_size for f in workspace.glob("store.sqlite*"))
    finally:
        shutil.rmtree(workspace, ignore_errors=True)

    s = sampling
    print_table(f"Experience store, N = {n:,} (latencies in ms)", ["measure", "value", "p50", "p95"], [
        ("single add (fsync each), adds/s", singles["adds_per_s"], singles["latency"]["p50_ms"],
         singles["latency"]["p95_ms"]),
        ("batched fill (1000/txn), adds/s", fill["adds_per_s"], fill["batch_latency"]["p50_ms"],
         fill["batch_latency"]["p95_ms"]),
        ("  time to fill N, s", fill["fill_seconds"], "", ""),
        ("batched past buffer (evicting), adds/s", past["adds_per_s"], "", ""),
        ("mark_learned, per s", updates["mark_learned"]["per_s"], "", ""),
        ("update_priorities, per s", updates["update_priorities"]["per_s"], "", ""),
        *[(f"sample 64: {name}", float(r["returned"]), r["p50_ms"], r["p95_ms"]) for name, r in s.items()],
        ("sample 64 priority, after eviction", float(SAMPLE_N), priority_after["p50_ms"], priority_after["p95_ms"]),
        ("baseline: SQL ORDER BY RANDOM()", "", baselines["sql_order_by_random"]["p50_ms"],
         baselines["sql_order_by_random"]["p95_ms"]),
        ("baseline: numpy choice(p=weights)", "", baselines["numpy_weighted_choice"]["p50_ms"],
         baselines["numpy_weighted_choice"]["p95_ms"]),
        ("RSS MiB: empty store / full / +N/5", f"{rss_empty:.0f} / {past['rss_mib_start']:.0f} / "
                                             f"{past['rss_mib_end']:.0f}", "", ""),
        ("reopen (rebuild sum-tree), s", reopen_s, "", ""),
        ("database + WAL on disk, MiB", db_bytes / 2**20, "", ""),
    ])
    at_scale = n >= 1_000_000
    targets = {
        "batched_adds_per_s": {"target": f">= {TARGET_BATCHED_ADDS_PER_S:.0f}", "measured": fill["adds_per_s"],
                               "passed": fill["adds_per_s"] >= TARGET_BATCHED_ADDS_PER_S},
        "batched_adds_per_s_evicting": {"target": f">= {TARGET_BATCHED_ADDS_PER_S:.0f}",
                                        "measured": past["adds_per_s"],
                                        "passed": past["adds_per_s"] >= TARGET_BATCHED_ADDS_PER_S},
        "priority_sample_64_p95_ms": {"target": f"<= {TARGET_PRIORITY_MS} (at N = 1,000,000)",
                                      "measured": s["priority_all"]["p95_ms"],
                                      "passed": s["priority_all"]["p95_ms"] <= TARGET_PRIORITY_MS if at_scale
                                      else None},
        "rss_growth_past_buffer_mib": {"target": f"<= {TARGET_RSS_GROWTH_MIB}", "measured": past["rss_growth_mib"],
                                       "passed": past["rss_growth_mib"] <= TARGET_RSS_GROWTH_MIB},
        "bounded_and_intact": {"target": f"{n} stored, integrity ok",
                               "measured": f"{stored} stored, {problems or 'ok'}",
                               "passed": stored == n and not problems},
    }
    print_table("Targets", ["check", "measured", "target", "result"],
                [(name, t["measured"], t["target"], verdict(t["passed"])) for name, t in targets.items()])
    comparisons = {
        "priority_sumtree_vs_numpy_choice_p50": baselines["numpy_weighted_choice"]["p50_ms"]
        / s["priority_all"]["p50_ms"],
        "uniform_slots_vs_sql_order_by_random_p50": baselines["sql_order_by_random"]["p50_ms"]
        / s["uniform_learned"]["p50_ms"],
        "batched_over_single_adds": fill["adds_per_s"] / singles["adds_per_s"],
    }
    result = {
        "benchmark": "experience_store",
        "quick": args.quick,
        "workload": {"items": n, "buffer_size": n, "recent_size": n // 10, "batch": BATCH, "sample_n": SAMPLE_N,
                     "draws": args.draws, "single_adds": single, "priority_function": "reward", "alpha": 1.0,
                     "rewards": "90% uniform (0, 1], 10% uniform [-1, 0) (feedback-only)",
                     "pragmas": {"journal_mode": "wal", "synchronous": "FULL", "cache_size_kib": 16384,
                                 "wal_autocheckpoint_pages": 8192}},
        "single_adds": singles, "fill": fill, "updates": updates, "sampling": sampling,
        "sampling_priority_after_eviction": priority_after, "baselines": baselines, "past_buffer": past,
        "rss_mib_empty_store": rss_empty, "reopen_seconds": reopen_s, "integrity_check_seconds": check_s,
        "integrity_problems": problems, "stored_after_reopen": stored, "database_bytes": db_bytes,
        "comparisons_speedup": comparisons, "targets": targets, "machine": info,
    }
    path = write_json(args.out, result)
    console.print(f"wrote {path}")
    return 0 if all(t["passed"] is not False for t in targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
