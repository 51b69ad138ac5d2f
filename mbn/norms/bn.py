"""Batch Normalization (Ioffe & Szegedy 2015) with a `record` switch for double forward."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mbn.norms.base import BatchStatNorm, check_batch, distributed
from mbn.norms.registry import NormConfig, NormSpec, fields, register
from mbn.validate import key, unit


class BatchNorm2d(BatchStatNorm):
    """PyTorch's BatchNorm (same kernels, same numbers) whose running averages are updated only
    by forwards that record. Inference uses the running averages."""

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(self, x)
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

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


@dataclass
class BNConfig(NormConfig):
    """Batch Normalization (Ioffe & Szegedy 2015); single forward in the paper"""
    momentum: float = key(0.1, "the running-average rate", unit)


register("bn", NormSpec(BatchNorm2d, BNConfig, fields("eps", "momentum")))
