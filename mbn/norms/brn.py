"""Batch Renormalization (Ioffe 2017).

Training: y = γ·((x − μ_B)/σ_B · r + d) + β with r = clip(σ_B/σ, 1/r_max, r_max) and
d = clip((μ_B − μ)/σ, −d_max, d_max), both treated as constants by backprop. μ and σ are moving
averages updated as in the BRN paper (μ += α(μ_B − μ), σ += α(σ_B − σ)); inference uses them.
r_max and d_max stay at 1 and 0 (plain BN) for a while and are then relaxed linearly.
"""
import torch

from mbn.norms.base import BatchStatNorm
from mbn.schedules import linear_ramp


class BatchRenorm2d(BatchStatNorm):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.01, affine: bool = True,
                 r_max: float = 3.0, d_max: float = 5.0, relax_start: float = 0.0,
                 r_max_end: float = 0.0, d_max_end: float = 0.0):
        super().__init__(num_features, eps, affine)
        self.momentum = momentum
        self.r_max_final, self.d_max_final = float(r_max), float(d_max)
        self.relax_start, self.r_max_end, self.d_max_end = relax_start, r_max_end, d_max_end
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        # current clipping bounds: tensors, set by the schedule without recompilation
        self.register_buffer("r_max", torch.tensor(1.0))
        self.register_buffer("d_max", torch.tensor(0.0))
        self.set_progress(0.0)

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_std.fill_(1)
        self.num_batches_tracked.zero_()

    def set_progress(self, progress: float) -> None:
        self.r_max.fill_(linear_ramp(self.relax_start, max(self.r_max_end, self.relax_start), 1.0,
                                     self.r_max_final, progress))
        self.d_max.fill_(linear_ramp(self.relax_start, max(self.d_max_end, self.relax_start), 0.0,
                                     self.d_max_final, progress))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.affine_apply(x, self.running_mean, self.running_std ** 2 - self.eps)
        mean, var, _ = self.batch_stats(x)
        std = torch.sqrt(var + self.eps)
        with torch.no_grad():
            r = (std / self.running_std).clamp(1 / self.r_max, self.r_max)
            d = ((mean - self.running_mean) / self.running_std).clamp(-self.d_max, self.d_max)
        # (x − μ_B)/σ_B·r + d  ==  (x − (μ_B − dσ_B/r)) / (σ_B/r)
        y = self.affine_apply(x, mean - d * std / r, (std / r) ** 2 - self.eps)
        if self.record:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_std.lerp_(std.detach(), self.momentum)
                self.num_batches_tracked.add_(1)
        return y

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", momentum={self.momentum}, r_max={self.r_max_final}, "
                f"d_max={self.d_max_final}, relax {self.relax_start}->(r {self.r_max_end}, d {self.d_max_end})")
