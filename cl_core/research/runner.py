"""`python -m cl_core experiment ...`: run forgetting experiments from the command line or a DVC stage.

Three commands, one per DVC stage after the stream is built:
- `experiment run`: learn the task sequence with some methods (or the multitask upper bound), for each seed;
  writes `<out>/seed<k>.json` (the raw forgetting matrix and timings) and `<out>/heatmap.png`;
- `experiment report`: reads every run, computes AA/BWT/FWT/forgetting (mean over seeds), writes
  `metrics.json` (DVC metrics), `table.md` (the README table) and `curves.json` (DVC plots data);
- `experiment plots`: heatmaps and accuracy-over-time curves as PNGs.
Settings come from flags or from a `params.yaml` (`--params`, `--run NAME`), so `dvc repro` and a person at a
shell run exactly the same code.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRAIN_KEYS = {"steps_per_task": int, "batch_size": int, "learning_rate": float, "lora_rank": int,
              "serving_mode": str, "ewc_lambda": float, "ewc_gamma": float, "l2_lambda": float,
              "olora_lambda": float, "replay_ratio": float, "replay_strategy": str, "replay_memory": int,
              "max_tasks": int, "kv_cache_gib": float, "max_model_len": int, "dtype": str,
              "train_precision": str}


def add_parser(sub: Any) -> None:
    experiment = sub.add_parser("experiment", help="forgetting experiments over task sequences")
    actions = experiment.add_subparsers(dest="action", required=True)
    run = actions.add_parser("run", help="learn a task sequence and write the forgetting matrix")
    run.add_argument("--tasks", help="comma-separated task names (default: the stream's or DEFAULT_SEQUENCE)")
    run.add_argument("--stream", help="a stream JSON built by `python -m cl_core.streams build`")
    run.add_argument("--method", help="anti-forgetting methods, comma-separated (e.g. replay,ewc), or 'multitask'")
    run.add_argument("--params", help="a params.yaml with `model`, `stream`, `train` and `runs` sections")
    run.add_argument("--run", help="name of the run in params.yaml `runs`")
    run.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    run.add_argument("--steps", type=int, help="optimizer steps per task")
    run.add_argument("--seeds", help="comma-separated seeds (default 0)")
    run.add_argument("--n-train", type=int, default=200)
    run.add_argument("--n-test", type=int, default=50)
    run.add_argument("--multitask", action="store_true", help="also train the multitask upper bound")
    run.add_argument("--out", required=True, help="output directory")
    report = actions.add_parser("report", help="metrics.json, table.md and curves.json from run directories")
    report.add_argument("--runs", required=True, help="directory holding one sub-directory per run")
    report.add_argument("--out", required=True)
    plots = actions.add_parser("plots", help="heatmaps and accuracy curves as PNG")
    plots.add_argument("--runs", required=True)
    plots.add_argument("--out", required=True)


def main(args: argparse.Namespace) -> int:
    if args.action == "run":
        return _run(args)
    if args.action == "report":
        return _report(Path(args.runs), Path(args.out))
    return _plots(Path(args.runs), Path(args.out))


def _load_params(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    return yaml.safe_load(Path(path).read_text()) or {}


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cl_core.config import ContinualConfig
    from cl_core.continual import ContinualLLM
    from cl_core.errors import InvalidInputError
    from cl_core.research.forgetting import ForgettingExperiment
    from cl_core.research.plots import heatmap
    from cl_core.streams import DEFAULT_SEQUENCE, build_stream, load_stream

    params = _load_params(args.params)
    train = dict(params.get("train") or {})
    run_spec: dict[str, Any] = {}
    if args.run:
        runs = params.get("runs") or {}
        if args.run not in runs:
            raise InvalidInputError(f"run {args.run!r} is not in {args.params} runs: {', '.join(runs)}")
        run_spec = runs[args.run] or {}
        train |= {k: v for k, v in run_spec.items() if k in TRAIN_KEYS}
    method = args.method or ",".join(run_spec.get("anti_forgetting", [])) or \
        ("multitask" if run_spec.get("multitask") else "replay")
    multitask_only = method == "multitask"
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(train.pop("seeds", [0]))
    train.pop("seeds", None)
    steps = args.steps or int(train.pop("steps_per_task", 50))
    stream_cfg = params.get("stream") or {}
    if args.stream:
        tasks = load_stream(args.stream)
        if args.tasks:
            wanted = args.tasks.split(",")
            tasks = [t for t in tasks if t.name in wanted]
    else:
        configured = stream_cfg.get("tasks") or DEFAULT_SEQUENCE
        if isinstance(configured, str):
            configured = [name.strip() for name in configured.split(",") if name.strip()]
        names = args.tasks.split(",") if args.tasks else list(configured)
        tasks = build_stream(names, n_train=int(stream_cfg.get("n_train", args.n_train)),
                             n_test=int(stream_cfg.get("n_test", args.n_test)), seed=int(stream_cfg.get("seed", 0)))
    unknown = set(train) - set(TRAIN_KEYS)
    if unknown:
        raise InvalidInputError(f"unknown train settings {sorted(unknown)}; known: {', '.join(sorted(TRAIN_KEYS))}")
    fields = {k: TRAIN_KEYS[k](v) for k, v in train.items()}
    fields.setdefault("serving_mode", "merged")  # single tenant, full speed: experiments evaluate a lot
    fields.setdefault("max_model_len", 1024)
    base = ContinualConfig(model=args.model or params.get("model") or "smollm2-135m-instruct",
                           anti_forgetting="none" if multitask_only else method.split(","), **fields)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine = None
    try:
        for seed in seeds:
            config = base.replace(seed=seed)
            bar = tqdm(total=len(tasks) + 1, desc=f"{args.run or method} seed {seed}", unit="task")

            def progress(message: str, bar: Any = bar) -> None:
                bar.write(message)
                if message.startswith("scores "):  # one evaluation per step of the sequence
                    bar.update(1)

            with ContinualLLM(config, engine=engine) as model:
                if engine is None:
                    engine, model._owns_engine = model.engine, False  # reused by the next seeds
                experiment = ForgettingExperiment(model, tasks, steps_per_task=steps,
                                                  multitask_upper_bound=args.multitask, progress=progress)
                start = time.perf_counter()
                result = _multitask_result(experiment, model, start) if multitask_only else experiment.run()
            bar.close()
            result.save(out / f"seed{seed}.json")
            if not multitask_only:
                heatmap(result, out / f"heatmap_seed{seed}.png", title=f"{args.run or method} (seed {seed})")
            print(json.dumps({"run": args.run or method, "seed": seed, **result.metrics,
                              "seconds": round(result.seconds, 1)}))
    finally:
        if engine is not None:
            engine.shutdown()
    return 0


def _multitask_result(experiment: Any, model: Any, start: float) -> Any:
    from cl_core.research.forgetting import ExperimentResult

    initial = experiment._evaluate(model, "before training")
    scores = experiment.run_multitask()
    n = len(experiment.tasks)
    matrix = [[math.nan] * (n - 1) + [scores[t.name]] for t in experiment.tasks]
    average = sum(scores.values()) / n
    return ExperimentResult(tasks=[t.name for t in experiment.tasks], methods=["multitask"], matrix=matrix,
                            initial_scores=initial, metrics={"average_accuracy": average},
                            multitask_scores=scores, seconds=time.perf_counter() - start,
                            steps_per_task=experiment.steps_per_task, config=model.config.to_dict())


def _collect(runs_dir: Path) -> dict[str, list[Any]]:
    from cl_core.research.forgetting import ExperimentResult

    found: dict[str, list[Any]] = {}
    for path in sorted(runs_dir.glob("*/seed*.json")):
        found.setdefault(path.parent.name, []).append(ExperimentResult.load(path))
    if not found:
        from cl_core.errors import InvalidInputError

        raise InvalidInputError(f"no run results (*/seed*.json) under {runs_dir}; run `experiment run` first")
    return found


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _report(runs_dir: Path, out: Path) -> int:
    runs = _collect(runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    multitask = runs.get("multitask")
    upper = _mean([r.metrics["average_accuracy"] for r in multitask]) if multitask else None
    metrics: dict[str, dict[str, float]] = {}
    for name, results in runs.items():
        entry = {key: _mean([r.metrics.get(key, math.nan) for r in results])
                 for key in ("average_accuracy", "backward_transfer", "forward_transfer", "forgetting")}
        entry["seconds"] = _mean([r.seconds for r in results])
        entry["seeds"] = len(results)
        if upper:
            entry["aa_over_multitask"] = entry["average_accuracy"] / upper
        metrics[name] = {k: (None if isinstance(v, float) and math.isnan(v) else
                             round(v, 4) if isinstance(v, float) else v) for k, v in entry.items()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    curves = []
    for name, results in runs.items():
        if name == "multitask":
            continue
        first = results[0]
        for j in range(len(first.tasks)):
            seen = _mean([_mean([r.matrix[i][j] for i in range(j + 1)]) for r in results])
            curves.append({"run": name, "tasks_learned": j + 1, "mean_accuracy_seen": round(seen, 4)})
    (out / "curves.json").write_text(json.dumps(curves, indent=2))
    table = _table(metrics, runs)
    (out / "table.md").write_text(table)
    print(table)
    return 0


def _table(metrics: dict[str, dict[str, Any]], runs: dict[str, list[Any]]) -> str:
    def fmt(value: Any, points: bool = False, signed: bool = False) -> str:
        if value is None:
            return "–"
        value = value * 100 if points else value
        return f"{value:+.1f}" if signed else f"{value:.1f}"

    first = next(iter(runs.values()))[0]
    lines = [f"Tasks: {', '.join(first.tasks)}; {first.steps_per_task} steps per task; "
             f"seeds per run: {max(m['seeds'] for m in metrics.values())}.", "",
             "| run | methods | AA | BWT | FWT | forgetting | AA / multitask | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        methods = "+".join(runs[name][0].methods)
        ratio = f"{m['aa_over_multitask'] * 100:.0f}%" if m.get("aa_over_multitask") is not None else "–"
        lines.append(f"| {name} | {methods} | {fmt(m['average_accuracy'], True)} | "
                     f"{fmt(m['backward_transfer'], True, True)} | {fmt(m['forward_transfer'], True, True)} | "
                     f"{fmt(m['forgetting'], True)} | {ratio} | {m['seconds'] / 60:.1f} min |")
    lines.append("")
    lines.append("AA, BWT, FWT and forgetting in accuracy points (0–100); AA / multitask relative to the jointly "
                 "trained upper bound.")
    return "\n".join(lines) + "\n"


def _plots(runs_dir: Path, out: Path) -> int:
    from cl_core.research.plots import accuracy_curves, heatmap

    runs = _collect(runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    sequential = {name: results for name, results in runs.items() if name != "multitask"}
    for name, results in sequential.items():
        heatmap(results[0], out / f"heatmap_{name}.png", title=name)
    multitask = runs.get("multitask")
    chosen = []
    for results in sequential.values():
        result = results[0]
        if multitask:
            result.multitask_scores = multitask[0].multitask_scores
        chosen.append(result)
    accuracy_curves(chosen, list(sequential), out / "accuracy_curves.png")
    print(f"plots written to {out}")
    return 0
