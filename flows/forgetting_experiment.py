"""The forgetting experiment of the research tools as a flow: one task per run, then the report and plots.

Each run is `python -m cl_core experiment run` in its own process (each starts and stops its own vLLM engine), with
the settings of `params.yaml` (the same ones `dvc repro` uses); the table and the per-run forgetting matrices land
in the Prefect UI as artifacts and in MLflow as a run of the `forgetting` experiment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from cl_core.pipeline.config import REPO_ROOT


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "cl_core", "experiment", *args]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")


@task(name="experiment-run")
def experiment_run(params: str, run: str, stream: str, out: str) -> str:
    _cli("run", "--params", params, "--run", run, "--stream", stream, "--out", out)
    return out


@task(name="build-stream", cache_policy=None)
def build_stream(params: dict[str, Any], out: str) -> str:
    s = params["stream"]
    cmd = [sys.executable, "-m", "cl_core.streams", "build", "--tasks", str(s["tasks"]), "--n-train",
           str(s["n_train"]), "--n-test", str(s["n_test"]), "--seed", str(s["seed"]), "--out", out]
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True)
    return out


@task(name="experiment-report")
def experiment_report(runs: str, out: str) -> dict[str, Any]:
    _cli("report", "--runs", runs, "--out", out)
    _cli("plots", "--runs", runs, "--out", out)
    table = (Path(out) / "table.md").read_text()
    create_markdown_artifact(key="forgetting-table", markdown=table, description="Forgetting experiment")
    metrics = json.loads((Path(out) / "metrics.json").read_text())
    if os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        mlflow.set_experiment("forgetting")
        with mlflow.start_run(run_name=Path(runs).parent.name):
            for run, values in metrics.items():
                for key, value in values.items():
                    if isinstance(value, (int, float)):
                        mlflow.log_metric(f"{run}.{key}".replace("+", "_"), float(value))
            mlflow.log_artifacts(out, "report")
    return metrics


@flow(name="forgetting-experiment", log_prints=True)
def forgetting_experiment(params_path: str = "params.yaml", runs: list[str] | None = None,
                          out: str = "results/flow") -> dict[str, Any]:
    params = yaml.safe_load((REPO_ROOT / params_path).read_text())
    names = runs or list(params["runs"])
    unknown = set(names) - set(params["runs"])
    if unknown:
        raise ValueError(f"unknown run(s) {sorted(unknown)}; {params_path} defines {sorted(params['runs'])}")
    stream = build_stream(params, str(REPO_ROOT / out / "stream.json"))
    for name in names:  # one after another: each run uses every core
        experiment_run(params_path, name, stream, str(REPO_ROOT / out / "runs" / name))
    return experiment_report(str(REPO_ROOT / out / "runs"), str(REPO_ROOT / out / "report"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m flows.forgetting_experiment")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--runs", help="comma-separated run names from params.yaml (default: all)")
    args = parser.parse_args()
    print(json.dumps(forgetting_experiment(args.params, args.runs.split(",") if args.runs else None), indent=2))
