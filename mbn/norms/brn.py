"""Batch Renormalization (Ioffe 2017).

Training: y = γ·((x − μ_B)/σ_B · r + d) + β with r = clip(σ_B/σ, 1/r_max, r_max) and
d = clip((μ_B − μ)/σ, −d_max, d_max), both treated as constants by backprop. μ and σ are moving
averages updated as in the BRN paper (μ += α(μ_B − μ), σ += α(σ_B − σ)); inference uses them.
r_max and d_max stay at 1 and 0 (plain BN) for a while and are then relaxed linearly.
"""
from dataclasses import dataclass

import torch

from mbn.norms.base import BatchStatNorm
from mbn.norms.registry import NormConfig, NormSpec, fields, register
from mbn.schedules import linear_ramp
from mbn.validate import NotBelow, Range, key, nonnegative, unit


def renorm_stats(mean, std, ref_mean, ref_std, r_max, d_max):
    """The (μ, σ²+ε) that make `affine_apply` compute (x − μ_B)/σ_B·r + d with r, d constants:
    (x − μ_B)/σ_B·r + d == (x − (μ_B − dσ_B/r)) / (σ_B/r). Returns (mean, std²) to normalize with."""
    with torch.no_grad():
        r = (std / ref_std).clamp(1 / r_max, r_max)
        d = ((mean - ref_mean) / ref_std).clamp(-d_max, d_max)
    return mean - d * std / r, (std / r) ** 2


class BatchRenorm2d(BatchStatNorm):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.01, affine: bool = True,
                 r_max: float = 3.0, d_max: float = 5.0, relax_start: float = 0.0,
                 r_max_end: float = 0.0, d_max_end: float = 0.0):
        super().__init__(num_features, eps, affine, momentum, running=False)
        self.r_max_final, self.d_max_final = float(r_max), float(d_max)
        self.relax_start, self.r_max_end, self.d_max_end = relax_start, r_max_end, d_max_end
        # BRN tracks σ = sqrt(σ_B² + ε), not the variance
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        # current clipping bounds: tensors, set by the schedule without recompilation
        self.register_buffer("r_max", torch.tensor(1.0))
        self.register_buffer("d_max", torch.tensor(0.0))
        self._bounds = None
        self.set_progress(0.0)

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_std.fill_(1)
        self.num_batches_tracked.zero_()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._bounds = None  # bounds came from the checkpoint: write them again at the next step

    def bounds(self, progress: float):
        r = linear_ramp(self.relax_start, max(self.r_max_end, self.relax_start), 1.0, self.r_max_final, progress)
        d = linear_ramp(self.relax_start, max(self.d_max_end, self.relax_start), 0.0, self.d_max_final, progress)
        return r, d

    def set_progress(self, progress: float) -> None:
        bounds = self.bounds(progress)
        if bounds != self._bounds:  # device writes only when a bound changes
            self.r_max.fill_(bounds[0])
            self.d_max.fill_(bounds[1])
            self._bounds = bounds

    def scheduled_values(self):
        return {"r_max": self._bounds[0], "d_max": self._bounds[1]}

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var, _ = self.batch_stats(x)
        std = torch.sqrt(var + self.eps)
        mu, std2 = renorm_stats(mean, std, self.running_mean, self.running_std, self.r_max, self.d_max)
        y = self.affine_apply(x, mu, std2 - self.eps)
        if self.record:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_std.lerp_(std.detach(), self.momentum)
                self.num_batches_tracked.add_(1)
        return y

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        return self.affine_apply(x, self.running_mean, self.running_std ** 2 - self.eps)

    @torch.no_grad()
    def load_population_stats(self, mean, var) -> None:
        self.running_mean.copy_(mean)
        self.running_std.copy_(torch.sqrt(var + self.eps))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r_max={self.r_max_final}, d_max={self.d_max_final}, "
                f"relax {self.relax_start}->(r {self.r_max_end}, d {self.d_max_end})")


@dataclass
class BRNConfig(NormConfig):
    """Batch Renormalization (Ioffe 2017); double forward in the paper"""
    name: str = "brn"
    double_forward: bool = True
    momentum: float = key(0.01, "BRN's rate α of the moving averages", unit)
    r_max: float = key(3.0, "BRN's r_max (reached at r_max_end)", Range(1))
    d_max: float = key(5.0, "BRN's d_max (reached at d_max_end)", nonnegative)
    relax_start: float = key(0.064, "BRN's relax_start (r_max = 1, d_max = 0 until this fraction of training)", unit)
    r_max_end: float = key(0.512, "BRN's r_max_end (a fraction of training)", unit, NotBelow("norm.relax_start"))
    d_max_end: float = key(0.32, "BRN's d_max_end (a fraction of training)", unit, NotBelow("norm.relax_start"))


register("brn", NormSpec(BatchRenorm2d, BRNConfig,
                         fields("eps", "momentum", "r_max", "d_max", "relax_start", "r_max_end", "d_max_end")))
