"""Batch Normalization (Ioffe & Szegedy 2015) with a `record` switch for double forward."""
import torch
import torch.nn.functional as F

from mbn.norms.base import BatchStatNorm, distributed


class BatchNorm2d(BatchStatNorm):
    """PyTorch's BatchNorm (same kernels, same numbers) whose running averages are updated only
    by forwards that record. Inference uses the running averages."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True):
        super().__init__(num_features, eps, affine)
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        self.batch_stats_check(x)
        if distributed():  # statistics of the global batch
            mean, var, n = self.batch_stats(x)
            if self.record:
                self.update_running_stats(mean, var, n)
            return self.affine_apply(x, mean, var)
        if self.record:
            self.num_batches_tracked.add_(1)
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                True, self.momentum, self.eps)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)

    def batch_stats_check(self, x: torch.Tensor) -> None:
        if x.numel() // x.size(1) <= 1:
            self.batch_stats(x)  # raises the clear error

    def extra_repr(self) -> str:
        return super().extra_repr() + f", momentum={self.momentum}"
