"""ForgettingExperiment, evaluate_retention and the experiment CLI on the tiny model and the shared vLLM engine."""

from __future__ import annotations

import json
import math

import pytest

from cl_core import InvalidInputError
from cl_core.research import ExperimentResult, ForgettingExperiment
from cl_core.research.runner import main as experiment_main
from cl_core.streams import Task, TaskExample


def _task(name: str, label: str, n_train: int = 12, n_test: int = 4) -> Task:
    examples = [TaskExample(prompt=f"{name} item {i}: which label?", answer=label) for i in range(n_train + n_test)]
    return Task(name=name, train=tuple(examples[:n_train]), test=tuple(examples[n_train:]), scoring="exact_match",
                max_answer_tokens=4)


TASKS = [_task("alpha", "red"), _task("beta", "blue")]


def test_evaluate_retention_scores_the_served_version(make_model):
    model = make_model("merged", learning_rate=5e-3)
    before = model.evaluate_retention(TASKS)
    assert before.version is None and set(before.scores) == {"alpha", "beta"}
    model.store.add_many([dict(prompt=ex.prompt, response=ex.answer, task="alpha") for ex in TASKS[0].train])
    model.learn(epochs=30, max_steps=40)
    after = model.evaluate_retention(TASKS)
    assert after.version == model.current_version.version
    assert after["alpha"] == 1.0 and after["alpha"] > before["alpha"]
    adhoc = model.evaluate_retention([{"name": "adhoc", "examples": [{"prompt": ex.prompt, "answer": ex.answer}
                                                                    for ex in TASKS[0].test]}])
    assert adhoc.scores == {"adhoc": 1.0}


@pytest.mark.parametrize("bad", [[], "alpha", [{"name": "x"}], [{"name": "x", "examples": []}], [TASKS[0], TASKS[0]]])
def test_evaluate_retention_rejects_bad_test_sets(make_model, bad):
    model = make_model("merged")
    with pytest.raises(InvalidInputError):
        model.evaluate_retention(bad)


def test_sequential_training_fills_the_matrix_and_shows_forgetting(make_model, tmp_path):
    model = make_model("merged", learning_rate=5e-3, anti_forgetting="none", batch_size=4)
    result = ForgettingExperiment(model, TASKS, steps_per_task=25, multitask_upper_bound=True).run()
    assert result.tasks == ["alpha", "beta"] and len(result.matrix) == 2
    assert all(not math.isnan(v) for row in result.matrix for v in row)
    assert result.matrix[0][0] == 1.0 and result.matrix[1][1] == 1.0
    assert result.matrix[0][1] < 1.0  # learning "blue" for beta-like prompts overwrote "red"
    assert result.metrics["backward_transfer"] < 0
    assert set(result.metrics) >= {"average_accuracy", "backward_transfer", "forward_transfer", "forgetting",
                                   "multitask_average_accuracy"}
    assert result.multitask_scores is not None and set(result.multitask_scores) == {"alpha", "beta"}
    saved = ExperimentResult.load(result.save(tmp_path / "run" / "seed0.json"))
    assert saved.matrix == result.matrix and saved.metrics == result.metrics
    # the sequential model still serves its own adapter after the multitask model used the merged engine
    assert model.evaluate_retention(TASKS).scores == {"alpha": result.matrix[0][1], "beta": result.matrix[1][1]}


def test_replay_remembers_what_sequential_forgets(make_model):
    model = make_model("merged", learning_rate=5e-3, anti_forgetting="replay", batch_size=4, replay_ratio=0.5)
    result = ForgettingExperiment(model, TASKS, steps_per_task=25).run()
    assert result.matrix[0][1] == 1.0 and result.matrix[1][1] == 1.0


def test_experiment_rejects_bad_sequences(make_model):
    model = make_model("merged")
    with pytest.raises(InvalidInputError, match="non-empty"):
        ForgettingExperiment(model, [])
    with pytest.raises(InvalidInputError, match="twice"):
        ForgettingExperiment(model, [TASKS[0], TASKS[0]])
    with pytest.raises(InvalidInputError, match="steps_per_task"):
        ForgettingExperiment(model, TASKS, steps_per_task=0)


def test_report_and_plots_from_saved_runs(tmp_path):
    def result(methods, matrix, multitask=None):
        return ExperimentResult(tasks=["a", "b"], methods=methods, matrix=matrix, initial_scores=[0.0, 0.0],
                                metrics={}, multitask_scores=multitask, seconds=60.0, steps_per_task=5)

    from cl_core.metrics import summarize

    runs = tmp_path / "runs"
    for name, methods, matrix in [("sequential", ["none"], [[1.0, 0.2], [0.0, 1.0]]),
                                  ("replay", ["replay"], [[1.0, 0.9], [0.0, 1.0]])]:
        r = result(methods, matrix)
        r.metrics = summarize(matrix, initial_scores=[0.0, 0.0])
        r.save(runs / name / "seed0.json")
    mt = result(["multitask"], [[math.nan, 1.0], [math.nan, 0.9]], {"a": 1.0, "b": 0.9})
    mt.metrics = {"average_accuracy": 0.95}
    mt.save(runs / "multitask" / "seed0.json")

    assert experiment_main(type("A", (), {"action": "report", "runs": str(runs), "out": str(tmp_path / "rep")})) == 0
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert metrics["sequential"]["backward_transfer"] == pytest.approx(-0.8)
    assert metrics["replay"]["average_accuracy"] == pytest.approx(0.95)
    assert metrics["replay"]["aa_over_multitask"] == pytest.approx(1.0)
    table = (tmp_path / "rep" / "table.md").read_text()
    assert "| replay | replay | 95.0 | -10.0 |" in table and "| sequential | none | 60.0 | -80.0 |" in table
    curves = json.loads((tmp_path / "rep" / "curves.json").read_text())
    assert {"run": "replay", "tasks_learned": 2, "mean_accuracy_seen": 0.95} in curves
    assert experiment_main(type("A", (), {"action": "plots", "runs": str(runs), "out": str(tmp_path / "plots")})) == 0
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["accuracy_curves.png", "heatmap_replay.png", "heatmap_sequential.png"]
    assert all((tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG" for name in pngs)
    with pytest.raises(InvalidInputError, match="no run results"):
        experiment_main(type("A", (), {"action": "report", "runs": str(tmp_path / "none"), "out": str(tmp_path)}))


def test_experiment_run_command_from_params_file(tiny_model_dir, tmp_path, capsys):
    """What a DVC stage runs: params.yaml + a stream file -> seed JSON + heatmap (own engine, started and stopped)."""
    from cl_core.cli import main as cli_main
    from cl_core.streams import save_stream

    stream = save_stream(TASKS, tmp_path / "stream.json", n_train=12, n_test=4, seed=0)
    (tmp_path / "params.yaml").write_text(f"""
model: {tiny_model_dir}
train:
  steps_per_task: 3
  batch_size: 4
  learning_rate: 0.005
  lora_rank: 4
  serving_mode: merged
  dtype: float32
  max_model_len: 256
  kv_cache_gib: 0.1
  seeds: [0]
runs:
  replay_ewc:
    anti_forgetting: [replay, ewc]
    ewc_lambda: 10.0
""")
    out = tmp_path / "runs" / "replay_ewc"
    assert cli_main(["experiment", "run", "--params", str(tmp_path / "params.yaml"), "--run", "replay_ewc",
                     "--stream", str(stream), "--out", str(out)]) == 0
    result = ExperimentResult.load(out / "seed0.json")
    assert result.methods == ["replay", "ewc"] and result.steps_per_task == 3
    assert result.config["ewc_lambda"] == 10.0 and result.config["lora_rank"] == 4
    assert (out / "heatmap_seed0.png").read_bytes()[:4] == b"\x89PNG"
    assert cli_main(["experiment", "run", "--params", str(tmp_path / "params.yaml"), "--run", "nope",
                     "--stream", str(stream), "--out", str(out)]) == 2
    assert "run 'nope' is not in" in capsys.readouterr().err
