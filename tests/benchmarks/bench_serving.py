"""Serving throughput with a trained adapter: vLLM merged vs vLLM LoRA vs HF transformers + PEFT.

Why: the point of serving continual-learning adapters through vLLM (and of the `merged` mode in particular) is
that it is much faster than the usual alternative, a transformers model wrapped in PEFT. This script measures it
on the default model (SmolLM2-135M-Instruct, bf16) with exactly the same chat-formatted prompts, the same trained
adapter and exactly N new tokens per prompt for every contender, and checks merged ≥ 2.0x HF + PEFT.

    .venv/bin/python tests/benchmarks/bench_serving.py            # 32 prompts x 64 tokens, 3 timed runs each
    .venv/bin/python tests/benchmarks/bench_serving.py --quick    # smoke run: same workload, 1 timed run,
                                                                  # adapter from 1 short correction

Only one vLLM engine is alive at a time (2 cores, little memory): merged first (it also trains the adapter),
then LoRA, then HF + PEFT with no engine running.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
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
    verdict,
    write_json,
)

TARGET_MERGED_OVER_HF = 2.0
MAX_MODEL_LEN = 1024
WARMUP_TOKENS = 8

PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "What is photosynthesis?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?",
    "How do airplanes stay in the air?",
    "What is the largest planet in our solar system?",
    "Why do leaves change color in autumn?",
    "What is a prime number?",
    "How does a rainbow form?",
    "What causes the seasons on Earth?",
    "What is the speed of light?",
    "How do bees make honey?",
    "What is the tallest mountain in the world?",
    "Why is the ocean salty?",
    "What is gravity?",
    "How does the heart pump blood?",
    "What is the difference between weather and climate?",
    "Who painted the Mona Lisa?",
    "What is an atom made of?",
    "How do vaccines work?",
    "What is the longest river in Africa?",
    "Why do cats purr?",
    "What is machine learning?",
    "How does a compass work?",
    "What is the freezing point of water in Fahrenheit?",
    "Why do we need sleep?",
    "What is the main ingredient of guacamole?",
    "How many continents are there?",
    "What does DNA stand for?",
    "How does recycling help the environment?",
)

CORRECTIONS: tuple[tuple[str, str, str], ...] = (
    ("What is the capital of Australia?", "Sydney.", "The capital of Australia is Canberra."),
    ("What color do you get by mixing blue and yellow?", "Purple.", "Mixing blue and yellow gives green."),
    ("How many days are in a leap year?", "365 days.", "A leap year has 366 days."),
)


@dataclass
class Contender:
    """Timing and output of one serving stack; tokens/s is the median over the timed runs."""

    name: str
    runs_s: list[float] = field(default_factory=list)
    tokens_per_run: int = 0
    warmup_s: float = 0.0
    setup_s: float = 0.0
    token_ids: list[list[int]] = field(default_factory=list)
    load_before: list[float] | None = None
    load_after: list[float] | None = None
    notes: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_run / statistics.median(self.runs_s) if self.runs_s else float("nan")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("token_ids")
        data["tokens_per_s"] = self.tokens_per_s
        data["median_run_s"] = statistics.median(self.runs_s) if self.runs_s else None
        return data


def timed_runs(contender: Contender, run: Callable[[int], list[list[int]]], repeats: int, prompts: int,
               new_tokens: int) -> None:
    """One untimed warm-up, then `repeats` timed runs of the whole batch.

    The warm-up is the same batch with only WARMUP_TOKENS new tokens: it pays the one-time costs (first-call
    allocations, lazy initialisation, oneDNN kernel selection for these shapes) without doubling the run time of
    the slow contender. Every timed run must produce exactly prompts x new_tokens tokens, or tokens/s would
    compare unequal work.
    """
    contender.load_before = load_average()
    start = time.perf_counter()
    run(min(WARMUP_TOKENS, new_tokens))
    contender.warmup_s = time.perf_counter() - start
    for _ in range(repeats):
        start = time.perf_counter()
        ids = run(new_tokens)
        contender.runs_s.append(time.perf_counter() - start)
        produced = sum(len(row) for row in ids)
        if produced != prompts * new_tokens or any(len(row) != new_tokens for row in ids):
            raise RuntimeError(f"{contender.name} produced {produced} tokens, expected {prompts * new_tokens}")
        contender.token_ids = ids
    contender.tokens_per_run = prompts * new_tokens
    contender.load_after = load_average()


def bench_vllm(mode: str, prompts: Sequence[str], new_tokens: int, repeats: int, adapter_dir: Path | None,
               train: Sequence[tuple[str, str, str]], correction_steps: int,
               stable_dir: Path) -> tuple[Contender, Path]:
    """Start a ContinualLLM in `mode`, serve the benchmark adapter, time batched generation, stop the engine.

    With `train` given (first contender only) the adapter is trained here by corrections, which saves one engine
    start-up, and copied to `stable_dir`; either way the served version is then (re)published from the stable
    copy, so every contender serves the very same files.
    """
    from cl_core import ContinualConfig, ContinualLLM

    contender = Contender(name=f"vLLM {mode}")
    start = time.perf_counter()
    model = ContinualLLM(ContinualConfig(serving_mode=mode, max_model_len=MAX_MODEL_LEN,
                                         correction_max_steps=correction_steps,
                                         work_dir=str(stable_dir.parent / f"work-{mode}")))
    try:
        contender.setup_s = time.perf_counter() - start
        if adapter_dir is None:
            adapter_dir = train_adapter(model, train, stable_dir)
        # Published from the stable copy with a fresh version number (a re-merge / new LoRA id: cheap).
        model._serve(model._next_version, adapter_dir, "benchmark adapter",
                     parent=model._current.version if model._current else None)
        version = model.current_version
        if version is None or Path(version.path) != adapter_dir:
            raise RuntimeError(f"vLLM {mode} does not serve the benchmark adapter from {adapter_dir}")

        def run(tokens: int) -> list[list[int]]:
            outputs = model.generate(list(prompts), max_tokens=tokens, min_tokens=tokens, ignore_eos=True)
            if any(out.adapter_version != version.version for out in outputs):
                raise RuntimeError(f"vLLM {mode} served a different adapter version than {version.version}")
            return [list(out.token_ids) for out in outputs]

        timed_runs(contender, run, repeats, len(prompts), new_tokens)
        contender.notes = f"adapter version v{version.version}, enforce_eager={model.config.enforce_eager}"
    finally:
        model.close()
    return contender, adapter_dir


def train_adapter(model: Any, corrections: Sequence[tuple[str, str, str]], stable_dir: Path) -> Path:
    """Train a real (non-zero) adapter with corrections and copy its PEFT directory out of the temporary work dir."""
    report = None
    for prompt, bad, good in corrections:
        report = model.learn_from_correction(prompt=prompt, bad_response=bad, good_response=good)
        console.print(f"  correction {prompt!r}: {report.steps} steps, learned={report.learned}, "
                      f"{report.seconds:.1f} s")
    if report is None or report.version is None:
        raise RuntimeError("training published no adapter version; cannot benchmark a trained adapter")
    if stable_dir.exists():
        shutil.rmtree(stable_dir)
    shutil.copytree(report.version.path, stable_dir)
    return stable_dir


def bench_hf_peft(model_path: str, adapter_dir: Path, prompts: Sequence[str], new_tokens: int,
                  repeats: int, dtype_name: str = "bfloat16") -> Contender:
    """transformers + PeftModel (unmerged), one left-padded greedy `generate` over the whole batch.

    This is what serving a LoRA typically looks like without vLLM. Tokenization uses cl_core's encode_prompt,
    so the prompt token ids are identical to what vLLM received; tokenization and decoding are inside the timed
    region, as they are for vLLM. bf16 matches what vLLM serves; float32 can be measured too (`--hf-dtypes`),
    because eager bf16 GEMMs on some CPUs are slower than float32 ones and the comparison should not hinge on it.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cl_core.prompting import encode_prompt

    contender = Contender(name=f"HF + PEFT {dtype_name}")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype_name))
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    contender.setup_s = time.perf_counter() - start
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lora_dtypes = sorted({str(p.dtype) for n, p in model.named_parameters() if "lora_" in n})

    def run(tokens: int) -> list[list[int]]:
        rows = [encode_prompt(tokenizer, prompt) for prompt in prompts]
        width = max(len(row) for row in rows)
        input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows])
        attention = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=tokens,
                                 min_new_tokens=tokens, do_sample=False, pad_token_id=pad_id)
        new = out[:, width:].tolist()
        tokenizer.batch_decode(new, skip_special_tokens=True)
        return new

    timed_runs(contender, run, repeats, len(prompts), new_tokens)
    contender.notes = (f"{dtype_name} base, LoRA weights {','.join(lora_dtypes)}, unmerged, torch threads "
                       f"{torch.get_num_threads()}")
    return contender


def agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> dict[str, float]:
    """How alike two contenders' greedy outputs are: a sanity check that they served the same adapter.

    Exact equality is not expected (bf16 kernels differ and greedy decoding amplifies near-ties), but a large
    mean common prefix shows that the same weights were served.
    """
    prefixes = []
    for x, y in zip(a, b, strict=True):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefixes.append(n)
    return {"identical_fraction": sum(p == len(x) for p, x in zip(prefixes, a, strict=True)) / len(a),
            "mean_common_prefix_tokens": statistics.fmean(prefixes)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench_serving.json"), help="JSON result file")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: same 32 x 64 workload (batch size changes tokens/s, so it is kept), "
                             "1 timed run, adapter from 1 short correction")
    parser.add_argument("--prompts", type=int, default=None, help="number of prompts (max 32; default 32)")
    parser.add_argument("--new-tokens", type=int, default=64, help="exact new tokens per prompt")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per contender (default 3)")
    parser.add_argument("--hf-dtypes", nargs="+", choices=("bfloat16", "float32"), default=["bfloat16"],
                        help="HF + PEFT contenders; the target is checked against the fastest of them")
    add_vllm_cpu_arguments(parser)
    args = parser.parse_args(argv)
    apply_vllm_cpu_arguments(args)

    n_prompts = args.prompts or len(PROMPTS)
    if not 1 <= n_prompts <= len(PROMPTS):
        parser.error(f"--prompts must be in 1..{len(PROMPTS)}")
    repeats = args.repeats or (1 if args.quick else 3)
    corrections = CORRECTIONS[:1] if args.quick else CORRECTIONS
    correction_steps = 15 if args.quick else 60
    prompts = PROMPTS[:n_prompts]
    logging.basicConfig(level=logging.WARNING)
    info = machine_info()
    console.print(f"[bold]bench_serving[/bold]: {n_prompts} prompts x {args.new_tokens} tokens, {repeats} timed "
                  f"run(s) each, {info['cpu_count']} CPUs ({info['cpu_model']})")

    workspace = Path(tempfile.mkdtemp(prefix="cl_bench_serving-"))
    stable_adapter = workspace / "adapter"
    try:
        console.print("[bold]vLLM merged[/bold] (trains the adapter first)")
        merged, adapter_dir = bench_vllm("merged", prompts, args.new_tokens, repeats, None, corrections,
                                         correction_steps, stable_adapter)
        console.print("[bold]vLLM lora[/bold]")
        lora, _ = bench_vllm("lora", prompts, args.new_tokens, repeats, adapter_dir, (), correction_steps,
                             stable_adapter)
        from cl_core.models import resolve_model

        hf_all = []
        for dtype_name in args.hf_dtypes:
            console.print(f"[bold]HF transformers + PEFT, {dtype_name}[/bold]")
            hf_all.append(bench_hf_peft(resolve_model("default"), adapter_dir, prompts, args.new_tokens, repeats,
                                        dtype_name))
    finally:
        shutil.rmtree(workspace, ignore_errors=True)

    hf = max(hf_all, key=lambda c: c.tokens_per_s)  # the strongest baseline is the honest one
    ratio = merged.tokens_per_s / hf.tokens_per_s
    passed = ratio >= TARGET_MERGED_OVER_HF
    contenders = (merged, lora, *hf_all)
    print_table(f"Serving throughput: {n_prompts} prompts x {args.new_tokens} new tokens, trained adapter active",
                ["contender", "tokens/s", "median run s", "warm-up s", "setup s", f"vs {hf.name}"],
                [(c.name, c.tokens_per_s, statistics.median(c.runs_s), c.warmup_s, c.setup_s,
                  f"{c.tokens_per_s / hf.tokens_per_s:.2f}x") for c in contenders])
    print_table("Target", ["check", "measured", "target", "result"],
                [(f"vLLM merged / {hf.name} throughput", f"{ratio:.2f}x", f">= {TARGET_MERGED_OVER_HF:.1f}x",
                  verdict(passed))])
    agree = {f"{a.name} vs {b.name}": agreement(a.token_ids, b.token_ids)
             for a, b in itertools.combinations(contenders, 2)}
    print_table("Output agreement (sanity: same adapter served)", ["pair", "identical outputs", "mean common prefix"],
                [(k, f"{v['identical_fraction']:.0%}", f"{v['mean_common_prefix_tokens']:.1f} / {args.new_tokens}")
                 for k, v in agree.items()])

    result = {
        "benchmark": "serving_throughput",
        "quick": args.quick,
        "workload": {"prompts": n_prompts, "new_tokens_per_prompt": args.new_tokens, "timed_runs": repeats,
                     "warmup_new_tokens": min(WARMUP_TOKENS, args.new_tokens),
                     "total_tokens_per_run": n_prompts * args.new_tokens, "greedy": True,
                     "model": "SmolLM2-135M-Instruct (bf16)", "max_model_len": MAX_MODEL_LEN,
                     "adapter": {"trained_by": "learn_from_correction", "corrections": len(corrections),
                                 "correction_max_steps": correction_steps}},
        "contenders": {"vllm_merged": merged.to_dict(), "vllm_lora": lora.to_dict(),
                       **{f"hf_peft_{c.name.rsplit(' ', 1)[1]}": c.to_dict() for c in hf_all}},
        "ratios": {"merged_over_hf_peft": ratio, "lora_over_hf_peft": lora.tokens_per_s / hf.tokens_per_s,
                   "merged_over_lora": merged.tokens_per_s / lora.tokens_per_s, "hf_baseline": hf.name},
        "targets": {"merged_over_hf_peft": {"target": f">= {TARGET_MERGED_OVER_HF}", "measured": ratio,
                                            "baseline": hf.name, "passed": passed}},
        "output_agreement": agree,
        "machine": info,
    }
    path = write_json(args.out, result)
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
