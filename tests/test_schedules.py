"""lr and λ schedules at their milestones: a value changes at the first step whose progress
step/total_steps reaches the milestone, not one step later."""
import json

import pytest

from mbn.engine import fit
from mbn.schedules import linear_ramp, piecewise, step_lr
from tests.conftest import TINY, make_cfg

MILESTONES = [0.4, 0.6]


@pytest.mark.parametrize("progress,expected", [
    (0.0, 0.1), (0.399999, 0.1), (0.4, 0.01), (0.400001, 0.01),
    (0.599999, 0.01), (0.6, 0.001), (0.600001, 0.001), (1.0, 0.001)])
def test_step_lr_at_and_around_its_milestones(progress, expected):
    assert step_lr(0.1, MILESTONES, 0.1, progress) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("progress,expected", [
    (0.0, 0.1), (0.399999, 0.1), (0.4, 0.5), (0.599999, 0.5), (0.6, 0.9), (1.0, 0.9)])
def test_piecewise_at_and_around_its_milestones(progress, expected):
    assert piecewise([0.1, 0.5, 0.9], MILESTONES, progress) == expected


@pytest.mark.parametrize("total_steps", [10, 15, 390 * 200, 1000, 4 * 5])
def test_values_change_at_the_step_where_the_milestone_falls(total_steps):
    """Every milestone here falls on a step k = m·total_steps; k/total_steps is then the float m
    itself, and step k (counting from 0) is the first with the new value."""
    for m_index, m in enumerate(MILESTONES):
        k = round(m * total_steps)
        assert k / total_steps == m
        lr = [step_lr(0.1, MILESTONES, 0.1, s / total_steps) for s in (k - 1, k)]
        lam = [piecewise([0.1, 0.5, 0.9], MILESTONES, s / total_steps) for s in (k - 1, k)]
        assert lr == pytest.approx([0.1 * 0.1 ** m_index, 0.1 * 0.1 ** (m_index + 1)], rel=1e-12)
        assert lam == [[0.1, 0.5, 0.9][m_index], [0.1, 0.5, 0.9][m_index + 1]]


def test_one_value_is_constant_and_mismatched_lengths_are_an_error():
    assert piecewise([0.3], [], 0.7) == 0.3
    with pytest.raises(ValueError, match="3 values need 2 milestones"):
        piecewise([0.1, 0.5, 0.9], [0.4], 0.5)


def test_linear_ramp_ends_and_middle():
    assert linear_ramp(0.1, 0.5, 1.0, 3.0, 0.0) == 1.0
    assert linear_ramp(0.1, 0.5, 1.0, 3.0, 0.1) == 1.0
    assert linear_ramp(0.1, 0.5, 1.0, 3.0, 0.3) == pytest.approx(2.0)
    assert linear_ramp(0.1, 0.5, 1.0, 3.0, 0.5) == 3.0
    assert linear_ramp(0.1, 0.5, 1.0, 3.0, 0.9) == 3.0


def test_training_logs_the_new_lr_and_lambda_from_the_milestone_step_on(tmp_path):
    """8 steps, 4 per epoch, milestones at 50 % and 87.5 %: step 4 (counting from 0) opens epoch 2
    and step 7 closes it. The values logged at the end of an epoch are its last step's, so epoch 1
    must end before the first switch and epoch 2 after the second."""
    fit(make_cfg(TINY + ["norm=mbn", "schedule.milestones=[0.5,0.875]", "norm.lam_milestones=[0.5,0.875]"]),
        str(tmp_path))
    history = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [h["step"] for h in history] == [4, 8]
    assert [h["lr"] for h in history] == pytest.approx([0.1, 0.001], rel=1e-12)
    assert [h["lam"] for h in history] == pytest.approx([0.1, 0.9])
