"""Schedules as functions of training progress p = step / total_steps in [0, 1], so that
changing the number of epochs or steps keeps the paper's shape (changes at 40 % and 60 %)."""
from typing import Sequence


def piecewise(values: Sequence[float], milestones: Sequence[float], progress: float) -> float:
    """values[i] holds from milestones[i-1] (inclusive) to milestones[i]; one value = constant."""
    if len(values) == 1:
        return float(values[0])
    if len(values) != len(milestones) + 1:
        raise ValueError(f"{len(values)} values need {len(values) - 1} milestones, got {list(milestones)}")
    i = sum(progress >= m for m in milestones)
    return float(values[i])


def step_lr(base_lr: float, milestones: Sequence[float], gamma: float, progress: float) -> float:
    """The paper's lr: base_lr divided by 1/gamma at each milestone (0.1 → 0.01 → 0.001)."""
    return base_lr * gamma ** sum(progress >= m for m in milestones)


def linear_ramp(start: float, end: float, v0: float, v1: float, progress: float) -> float:
    """v0 until `start`, then linear to v1 at `end`, v1 afterwards (BRN's r_max/d_max)."""
    if progress <= start:
        return v0
    if progress >= end:
        return v1
    return v0 + (v1 - v0) * (progress - start) / (end - start)
