"""Metrics against hand-computed values of the textbook definitions (GEM 2017; RWalk 2018)."""

import math

import pytest

from cl_core import metrics

# matrix[i][j] = score on task i after training task j (3 tasks).
A = [
    [0.9, 0.6, 0.3],   # task 0: learned to 0.9, then forgotten
    [0.2, 0.8, 0.7],   # task 1: zero-shot 0.2 after task 0
    [0.1, 0.5, 0.95],  # task 2: zero-shot 0.5 after task 1
]
INITIAL = [0.1, 0.1, 0.1]
JOINT = [0.95, 0.9, 0.95]


def test_average_accuracy():
    assert metrics.average_accuracy(A) == pytest.approx((0.3 + 0.7 + 0.95) / 3)
    assert metrics.average_accuracy(A, after=0) == pytest.approx(0.9)
    assert metrics.average_accuracy(A, after=1) == pytest.approx((0.6 + 0.8) / 2)


def test_backward_transfer_is_negative_when_forgetting():
    assert metrics.backward_transfer(A) == pytest.approx(((0.3 - 0.9) + (0.7 - 0.8)) / 2)


def test_forward_transfer_uses_the_initial_model():
    assert metrics.forward_transfer(A, INITIAL) == pytest.approx(((0.2 - 0.1) + (0.5 - 0.1)) / 2)


def test_forgetting_counts_the_best_earlier_score():
    # Task 1 peaks *after* its diagonal: BWT misses it, forgetting does not.
    peaked = [[0.5, 0.9, 0.4], [0.0, 0.6, 0.6], [0.0, 0.0, 0.7]]
    assert metrics.forgetting_per_task(peaked) == pytest.approx([0.9 - 0.4, 0.0])
    assert metrics.forgetting(peaked) == pytest.approx(0.25)
    assert metrics.backward_transfer(peaked) == pytest.approx(((0.4 - 0.5) + 0.0) / 2)


def test_intransigence_against_the_joint_reference():
    assert metrics.intransigence(A, JOINT) == pytest.approx(((0.95 - 0.9) + (0.9 - 0.8) + (0.95 - 0.95)) / 3)


def test_no_forgetting_and_single_task_edge_cases():
    perfect = [[1.0, 1.0], [0.0, 1.0]]
    assert metrics.backward_transfer(perfect) == 0.0 and metrics.forgetting(perfect) == 0.0
    one = [[0.7]]
    assert metrics.summarize(one, [0.1], [0.8]) == {"average_accuracy": 0.7, "backward_transfer": 0.0,
                                                    "forgetting": 0.0, "forward_transfer": 0.0,
                                                    "intransigence": pytest.approx(0.1)}


@pytest.mark.parametrize("bad", [[], [[0.1, 0.2]], [[0.1], [0.2]], [[math.nan]], [[0.1, 0.2], [0.3]]])
def test_bad_matrices_are_clear_errors(bad):
    with pytest.raises(ValueError, match="accuracy matrix"):
        metrics.summarize(bad)


def test_baselines_must_have_one_score_per_task():
    with pytest.raises(ValueError, match="initial_scores must hold 3"):
        metrics.forward_transfer(A, [0.1, 0.1])
    with pytest.raises(ValueError, match="reference_scores"):
        metrics.intransigence(A, [0.1, 0.2, math.inf])
