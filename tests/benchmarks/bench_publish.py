"""Publish latency: from the end of a learning step to the first token served by the new adapter version.

Why: continual learning is only useful if a freshly learned adapter reaches users quickly and without downtime.
cl_core publishes into the running vLLM engine (a new LoRA in `lora` mode, an in-place weight fold in `merged`
mode); the naive alternative is to merge the adapter into a copy of the model and restart the engine on it. This
script measures both on the default model and checks lora p50 ≤ 50 ms and merged p50 ≤ 500 ms.

    .venv/bin/python tests/benchmarks/bench_publish.py                 # 20 versions per mode, 3 naive restarts
    .venv/bin/python tests/benchmarks/bench_publish.py --quick         # smoke run: 5 versions, 1 restart

Per version: one optimizer step of the PEFT learner (not timed), then `_publish` (save the adapter, hand it to
the engine) and a 1-token greedy generation; the time from the end of the step until that generation returns is
the publish latency, and the generation must report the new version. Only one vLLM engine is alive at a time.
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    add_vllm_cpu_arguments,
    apply_vllm_cpu_arguments,
    console,
    load_average,
    machine_info,
    print_table,
    summarize_ms,
    verdict,
    write_json,
)

MAX_MODEL_LEN = 1024
TARGETS_P50_MS = {"lora": 50.0, "merged": 500.0}
PROBE_PROMPT = "What is the capital of France?"
STEADY_SAMPLES = 5
TRAINING_PAIRS: tuple[tuple[str, str], ...] = (
    ("What is the capital of Australia?", "The capital of Australia is Canberra."),
    ("What color do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("Who discovered penicillin?", "Alexander Fleming discovered penicillin in 1928."),
)


@dataclass(frozen=True)
class PublishSample:
    """One version: time to publish (save + engine hand-over) and to the first token after it."""

    version: int
    publish_s: float
    save_s: float
    engine_publish_s: float
    first_token_s: float
    served_version: int | None

    @property
    def total_s(self) -> float:
        return self.publish_s + self.first_token_s


class Stopwatch:
    """Times the calls of one method of one object (an instance attribute shadows the method; cl_core is
    untouched), so the publish time can be split into saving the adapter and handing it to the engine."""

    def __init__(self, owner: Any, method: str) -> None:
        self.last_s = 0.0
        original = getattr(owner, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.last_s = time.perf_counter() - start

        setattr(owner, method, timed)


def bench_live_publish(mode: str, versions: int, work_dir: Path) -> dict[str, Any]:
    """Train-step / publish / first-token loop on a running ContinualLLM in `mode`.

    One unrecorded warm-up version comes first (the first publish pays one-time costs: the merged mode's
    base-weight cache, vLLM's first LoRA load, first-call allocations). The steady-state 1-token latency without
    any publish is measured too, so the publish overhead itself can be read off; `Stopwatch`es split the publish
    into saving the adapter (learner) and handing it to the engine (LoRA load or in-place merge).
    """
    from cl_core import ContinualConfig, ContinualLLM
    from cl_core.learner import Example
    from cl_core.prompting import encode_pair

    load_before = load_average()
    start = time.perf_counter()
    model = ContinualLLM(ContinualConfig(serving_mode=mode, max_model_len=MAX_MODEL_LEN, work_dir=str(work_dir)))
    try:
        engine_start_s = time.perf_counter() - start
        learner = model._get_learner()
        examples = [Example(encode_pair(model.tokenizer, p, r)) for p, r in TRAINING_PAIRS]
        save_watch = Stopwatch(learner, "save_adapter")
        engine_watch = Stopwatch(model.engine, "publish")
        samples: list[PublishSample] = []
        for i in range(versions + 1):
            learner.step([examples[i % len(examples)]])
            t0 = time.perf_counter()  # end of the optimizer step
            version = model._publish(f"bench_publish step {i}")
            t1 = time.perf_counter()
            out = model.generate(PROBE_PROMPT, max_tokens=1)
            t2 = time.perf_counter()
            if i == 0:
                continue  # warm-up version
            samples.append(PublishSample(version.version, t1 - t0, save_watch.last_s, engine_watch.last_s, t2 - t1,
                                         out.adapter_version))
        steady = []
        for _ in range(STEADY_SAMPLES):
            t0 = time.perf_counter()
            model.generate(PROBE_PROMPT, max_tokens=1)
            steady.append(time.perf_counter() - t0)
    finally:
        model.close()
    wrong = [s.version for s in samples if s.served_version != s.version]
    total = summarize_ms([s.total_s for s in samples])
    return {
        "mode": mode,
        "versions": len(samples),
        "engine_start_s": engine_start_s,
        "load_before": load_before,
        "load_after": load_average(),
        "total": total,
        "publish": summarize_ms([s.publish_s for s in samples]),
        "publish_save_adapter": summarize_ms([s.save_s for s in samples]),
        "publish_engine": summarize_ms([s.engine_publish_s for s in samples]),
        "first_token": summarize_ms([s.first_token_s for s in samples]),
        "steady_first_token_no_publish": summarize_ms(steady),
        "all_served_new_version": not wrong,
        "versions_served_wrong": wrong,
        "target_p50_ms": TARGETS_P50_MS[mode],
        "passed": bool(total["p50_ms"] <= TARGETS_P50_MS[mode] and not wrong),
        "samples_ms": [{"version": s.version, "total_ms": s.total_s * 1e3, "publish_ms": s.publish_s * 1e3,
                        "save_adapter_ms": s.save_s * 1e3, "engine_publish_ms": s.engine_publish_s * 1e3,
                        "first_token_ms": s.first_token_s * 1e3, "served_version": s.served_version}
                       for s in samples],
    }


def bench_restart(repeats: int, work_dir: Path) -> dict[str, Any]:
    """The naive path: after each learning step, merge the adapter into a saved model and restart vLLM on it.

    Timed per repeat from the end of the optimizer step: save the adapter, load the bf16 base with
    transformers, `PeftModel.from_pretrained(...).merge_and_unload()`, save the merged model, start a fresh
    `vllm.LLM` on it (same settings as cl_core's engine), generate one token, and stop that engine again.
    The learner runs without any engine alive, so this never holds two engines at once.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from cl_core.learner import Example, LearnerSettings, LoRALearner
    from cl_core.models import resolve_model
    from cl_core.prompting import encode_pair, encode_prompt

    load_before = load_average()
    model_path = resolve_model("default")
    learner = LoRALearner(LearnerSettings(model_path=model_path))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples = [Example(encode_pair(tokenizer, p, r)) for p, r in TRAINING_PAIRS]
    probe_ids = encode_prompt(tokenizer, PROBE_PROMPT)
    runs = []
    for i in range(repeats):
        learner.step([examples[i % len(examples)]])
        t0 = time.perf_counter()  # end of the optimizer step
        adapter_dir = learner.save_adapter(work_dir / f"restart-adapter-{i}")
        merged_dir = work_dir / f"restart-merged-{i}"
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(merged_dir, safe_serialization=True)
        _copy_tokenizer_files(Path(model_path), merged_dir)
        del base, merged
        t1 = time.perf_counter()
        llm = LLM(model=str(merged_dir), dtype="auto", max_model_len=MAX_MODEL_LEN, seed=0,
                  kv_cache_memory_bytes=2**30, enforce_eager=True)
        t2 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=probe_ids)], SamplingParams(max_tokens=1, temperature=0.0),
                           use_tqdm=False)
        t3 = time.perf_counter()
        if len(out[0].outputs[0].token_ids) != 1:
            raise RuntimeError("the restarted engine did not produce a token")
        _shutdown(llm)
        del llm
        gc.collect()
        shutil.rmtree(merged_dir, ignore_errors=True)
        runs.append({"merge_and_save_s": t1 - t0, "engine_start_s": t2 - t1, "first_token_s": t3 - t2,
                     "total_s": t3 - t0})
    return {"repeats": repeats, "runs": runs, "total": summarize_ms([r["total_s"] for r in runs]),
            "load_before": load_before, "load_after": load_average()}


def _copy_tokenizer_files(source: Path, target: Path) -> None:
    """vLLM needs the tokenizer and chat template next to the merged weights; save_pretrained wrote the rest."""
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and not (target / path.name).exists():
            shutil.copy2(path, target / path.name)


def _shutdown(llm: Any) -> None:
    """Stop a vLLM engine's processes now (as cl_core's VLLMEngine.shutdown does), not at interpreter exit."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench_publish.json"), help="JSON result file")
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 versions per mode, 1 naive restart")
    parser.add_argument("--versions", type=int, default=None, help="published versions per mode (default 20)")
    parser.add_argument("--restarts", type=int, default=None, help="naive restart measurements (default 3)")
    parser.add_argument("--modes", nargs="+", choices=("lora", "merged"), default=["lora", "merged"])
    add_vllm_cpu_arguments(parser)
    args = parser.parse_args(argv)
    apply_vllm_cpu_arguments(args)
    versions = args.versions or (5 if args.quick else 20)
    restarts = args.restarts if args.restarts is not None else (1 if args.quick else 3)
    if versions < 1 or restarts < 0:
        parser.error("--versions must be ≥ 1 and --restarts ≥ 0")
    logging.basicConfig(level=logging.WARNING)
    info = machine_info()
    console.print(f"[bold]bench_publish[/bold]: {versions} versions per mode ({', '.join(args.modes)}), "
                  f"{restarts} naive restart(s), {info['cpu_count']} CPUs ({info['cpu_model']})")

    workspace = Path(tempfile.mkdtemp(prefix="cl_bench_publish-"))
    modes: dict[str, dict[str, Any]] = {}
    restart: dict[str, Any] | None = None
    try:
        for mode in args.modes:
            console.print(f"[bold]live publish, {mode} mode[/bold]")
            modes[mode] = bench_live_publish(mode, versions, workspace / mode)
        if restarts:
            console.print("[bold]naive path: merge + restart the engine[/bold]")
            restart = bench_restart(restarts, workspace)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)

    rows = []
    for mode, r in modes.items():
        rows.append((f"live {mode}", r["versions"], r["total"]["p50_ms"], r["total"]["p95_ms"], r["total"]["mean_ms"],
                     r["publish_save_adapter"]["p50_ms"], r["publish_engine"]["p50_ms"], r["first_token"]["p50_ms"],
                     r["steady_first_token_no_publish"]["p50_ms"],
                     "yes" if r["all_served_new_version"] else "[red]NO[/red]"))
    if restart is not None:
        runs = restart["runs"]
        rows.append(("restart (merge + new engine)", len(runs), restart["total"]["p50_ms"],
                     restart["total"]["p95_ms"], restart["total"]["mean_ms"],
                     statistics.median(r["merge_and_save_s"] for r in runs) * 1e3,
                     statistics.median(r["engine_start_s"] for r in runs) * 1e3,
                     statistics.median(r["first_token_s"] for r in runs) * 1e3, float("nan"), "yes"))
    print_table("Publish latency: end of learning step -> first token of the new version (ms, p50 unless named)",
                ["path", "n", "p50", "p95", "mean", "save / merge", "engine hand-over / start", "1st token",
                 "1 token, no publish", "new version served"], rows)
    checks = [(f"{mode} p50", f"{r['total']['p50_ms']:.1f} ms", f"<= {r['target_p50_ms']:.0f} ms",
               verdict(r["passed"])) for mode, r in modes.items()]
    speedups: dict[str, float] = {}
    if restart is not None:
        for mode, r in modes.items():
            speedups[f"restart_over_{mode}"] = restart["total"]["p50_ms"] / r["total"]["p50_ms"]
            checks.append((f"restart / {mode} (p50)", f"{speedups[f'restart_over_{mode}']:.0f}x", "-", "-"))
    print_table("Targets", ["check", "measured", "target", "result"], checks)

    result = {
        "benchmark": "publish_latency",
        "quick": args.quick,
        "workload": {"versions_per_mode": versions, "restarts": restarts, "probe_prompt": PROBE_PROMPT,
                     "probe_max_tokens": 1, "model": "SmolLM2-135M-Instruct (bf16)", "max_model_len": MAX_MODEL_LEN,
                     "timed_from": "end of the learner's optimizer step",
                     "timed_until": "1-token generate() returns with the new adapter_version"},
        "live": modes,
        "restart": restart,
        "speedup_p50": speedups,
        "targets": {f"{mode}_p50_ms": {"target": f"<= {r['target_p50_ms']}", "measured": r["total"]["p50_ms"],
                                       "new_version_served": r["all_served_new_version"], "passed": r["passed"]}
                    for mode, r in modes.items()},
        "machine": info,
    }
    path = write_json(args.out, result)
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
