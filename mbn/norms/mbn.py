"""Memorized Batch Normalization (Guo et al., AAAI 2018, eqs. 5-8, Algorithm 1).

Each layer memorizes the per-channel mean, biased variance and count of the k most recently
recorded batches in fixed-size ring buffers. A training forward normalizes with the weighted
statistics of the memory and the current batch (eq. 6), weights α_i = λ·η^(k-i) for memory
slot i (the most recent slot gets λ, eq. 8) and α = 1 for the current batch.
"""
from typing import Sequence

import torch
import torch.nn.functional as F

from mbn import UserError
from mbn.norms.base import BatchStatNorm
from mbn.schedules import piecewise


def combine_stats(means, variances, weights):
    """Eq. 6: mean and variance of a union of groups given each group's mean (G, C), biased
    variance (G, C) and weight α_i·n_i (G,). The variance includes the correction term
    (μ_i − μ̂)², so it equals the variance of the pooled data (eq. 5)."""
    total = weights.sum()
    mean = weights @ means / total
    var = weights @ (variances + (means - mean) ** 2) / total
    return mean, var


class MemorizedBatchNorm2d(BatchStatNorm):
    def __init__(self, num_features: int, memory_size: int = 10, eta: float = 0.9, lam: float = 0.1,
                 eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 lam_values: Sequence[float] = (), lam_milestones: Sequence[float] = (),
                 eval_stats: str = "memory"):
        super().__init__(num_features, eps, affine)
        if int(memory_size) != memory_size or memory_size < 1:
            raise UserError(f"MBN memory_size must be an integer >= 1 (got {memory_size}); "
                            "set norm.memory_size=10 (the paper's value) or use norm=bn for no memory")
        if not 0.0 <= eta <= 1.0:
            raise UserError(f"MBN eta must lie in [0, 1] (got {eta})")
        if eval_stats not in ("memory", "running"):
            raise UserError(f"eval_stats must be 'memory' or 'running' (got {eval_stats!r})")
        self.memory_size = int(memory_size)
        self.eta = float(eta)
        self.momentum = momentum
        self.lam_values = [float(v) for v in lam_values] or [float(lam)]
        self.lam_milestones = [float(m) for m in lam_milestones]
        self.eval_stats = eval_stats
        k = self.memory_size
        # λ is a tensor so that a schedule change never forces recompilation
        self.register_buffer("lam", torch.tensor(self.lam_values[0]))
        self._lam_set = None
        self.register_buffer("mem_mean", torch.zeros(k, num_features))
        self.register_buffer("mem_var", torch.ones(k, num_features))
        self.register_buffer("mem_count", torch.zeros(k))
        self.register_buffer("mem_head", torch.tensor(0, dtype=torch.long))    # next slot to write
        self.register_buffer("mem_filled", torch.tensor(0, dtype=torch.long))  # slots holding a batch
        # BN-style running averages of the recorded batches, for eval_stats=running
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.register_buffer("_slots", torch.arange(k), persistent=False)  # a constant, not saved

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._lam_set = None  # λ came from the checkpoint: write it again at the next step

    def reset_running_stats(self) -> None:
        self.mem_mean.zero_()
        self.mem_var.fill_(1)
        self.mem_count.zero_()
        self.mem_head.zero_()
        self.mem_filled.zero_()
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def set_progress(self, progress: float) -> None:
        lam = piecewise(self.lam_values, self.lam_milestones, progress)
        if lam != self._lam_set:  # a device write only when λ changes
            self.lam.fill_(lam)
            self._lam_set = lam

    def slot_ages(self) -> torch.Tensor:
        """Age of every slot: 0 for the most recently recorded batch, k-1 for the oldest."""
        return torch.remainder(self.mem_head - 1 - self._slots, self.memory_size)

    def memory_weights(self) -> torch.Tensor:
        """α_i·n_i of eq. 6 for every slot during training: λ·η^age·n (empty slots have n = 0)."""
        return self.lam * self.decay(self.slot_ages()) * self.mem_count

    def decay(self, age: torch.Tensor) -> torch.Tensor:
        """η^age in the memory's dtype."""
        return torch.pow(self.eta, age.to(self.mem_count.dtype))

    def memorized_stats(self, mean=None, var=None, n=None):
        """μ̂, σ̂² of eq. 6. With a current batch (training) it has α = 1; without one (inference)
        the most recently recorded batch takes the current batch's place, so that training and
        inference share one rule."""
        if mean is not None:
            weights = torch.cat([self.memory_weights(), self.mem_count.new_full((1,), float(n))])
            means = torch.cat([self.mem_mean, mean.to(self.mem_mean.dtype)[None]])
            variances = torch.cat([self.mem_var, var.to(self.mem_var.dtype)[None]])
            return combine_stats(means, variances, weights)
        age = self.slot_ages()
        alpha = torch.where(age == 0, torch.ones_like(self.mem_count), self.lam * self.decay((age - 1).clamp(min=0)))
        return combine_stats(self.mem_mean, self.mem_var, alpha * self.mem_count)

    @torch.no_grad()
    def push(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        """Record one batch's statistics in the ring buffer, overwriting the oldest slot. Masked
        writes, not indexing: deterministic on every device and free of host syncs."""
        slot = (self._slots == self.mem_head)
        self.mem_mean.copy_(torch.where(slot[:, None], mean.to(self.mem_mean.dtype), self.mem_mean))
        self.mem_var.copy_(torch.where(slot[:, None], var.to(self.mem_var.dtype), self.mem_var))
        self.mem_count.masked_fill_(slot, float(n))
        self.mem_head.copy_(torch.remainder(self.mem_head + 1, self.memory_size))
        self.mem_filled.copy_((self.mem_filled + 1).clamp(max=self.memory_size))
        self.update_running_stats(mean, var, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean, var, n = self.batch_stats(x)
            mu_hat, var_hat = self.memorized_stats(mean, var, n)
            y = self.affine_apply(x, mu_hat, var_hat)
            if self.record:
                self.push(mean.detach(), var.detach(), n)
            return y
        if self.eval_stats == "running":
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        mu_hat, var_hat = self.memorized_stats()
        # before anything was recorded the memory is empty: fall back to the running averages,
        # which then still hold their initial values (0, 1)
        empty = self.mem_filled == 0
        mu_hat = torch.where(empty, self.running_mean, mu_hat)
        var_hat = torch.where(empty, self.running_var, var_hat)
        return self.affine_apply(x, mu_hat, var_hat)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", memory_size={self.memory_size}, eta={self.eta}, "
                f"lam={self.lam_values} at {self.lam_milestones}, eval_stats={self.eval_stats}")
