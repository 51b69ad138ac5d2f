"""Memorized Batch Normalization (Guo et al., AAAI 2018, eqs. 5-8, Algorithm 1).

Each layer memorizes the per-channel mean, biased variance and count of the k most recently
recorded batches in a ring buffer (`StatsMemory`). A training forward normalizes with the
weighted statistics of the memory and the current batch (eq. 6): α = 1 for the current batch and
α = λ·η^age for the memory slot recorded `age` batches ago (eq. 8: the newest slot gets λ).

Options whose defaults are the paper's (the ablation grid varies them):
- `newest_weight`: "lam" (eq. 8) or "one" (the sentence before eq. 8: α_k = 1 for the newest slot,
  the older ones λ·η^age);
- `grad`: "current" (the paper: gradients flow through the current batch's statistics inside the
  pooled ones) or "renorm" (BN's batch gradient; the memorized statistics enter as constant
  Batch-Renorm-style r = σ_B/σ̂, d = (μ_B − μ̂)/σ̂; the forward value is the same);
- `eval_stats`: "memory" (the paper's rule: the memorized statistics — and BN's running averages
  where λ = 0 throughout, since MBN is then BN) or "running" (BN-style running averages).
"""
import math
from dataclasses import dataclass
from typing import List, Sequence

import torch
from torch.autograd.function import once_differentiable

from mbn import UserError
from mbn.norms.base import (BatchStatNorm, StatsMemory, channel_dims, channel_stats, channel_view, check_batch,
                            Scheduled, combine_stats, distributed, scale_shift)
from mbn.norms.brn import renorm_stats
from mbn.norms.registry import NormConfig, NormSpec, register
from mbn.schedules import piecewise
from mbn.validate import Each, OneOf, Stages, count, fractions, key, unit


class PooledBatchNorm(torch.autograd.Function):
    """Eqs. 6-7 for a training batch x pooled with memorized statistics (constants of weight
    w_i = α_i·n_i): y = γ(x − μ̂)/√(σ̂² + ε) + β; also returns the batch's own mean and biased
    variance (for recording). The backward is written out: with W = Σw_i + n, μ̂ = (Σw_iμ_i + Σx)/W
    and W·σ̂² = Σw_i(σ_i² + (μ_i − μ̂)²) + Σ(x − μ̂)², so ∂μ̂/∂x = 1/W and ∂σ̂²/∂x = 2(x − μ̂)/W, and

        ∂ℓ/∂x = γ/√(σ̂² + ε) · (g − Σg/W − x̂·Σ(g·x̂)/W),   x̂ = (x − μ̂)/√(σ̂² + ε),

    BN's backward with the batch size replaced by W: one reduction and one elementwise pass, as
    for BN, where autograd through eq. 6 adds a dozen small ops per layer. Single process only
    (the distributed path pools global statistics through autograd)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mem_mean, mem_var, mem_weights, eps: float):
        n = x.numel() // x.size(1)
        mean, var = channel_stats(x, mem_mean.dtype)
        weights = torch.cat([mem_weights, mem_weights.new_full((1,), float(n))])
        mu, s2 = combine_stats(torch.cat([mem_mean, mean[None]]), torch.cat([mem_var, var[None]]), weights)
        inv_std = torch.rsqrt(s2 + eps)
        ctx.save_for_backward(x, weight, mu, inv_std, weights.sum())
        ctx.mark_non_differentiable(mean, var)
        return scale_shift(x, mu, inv_std, weight, bias), mean, var

    @staticmethod
    @once_differentiable  # μ̂ and 1/σ̂ are saved as constants: a second derivative would be wrong
    def backward(ctx, grad, _mean, _var):
        x, weight, mu, inv_std, total = ctx.saved_tensors
        dims = channel_dims(x)
        g = grad.to(mu.dtype)
        xhat = (x.to(mu.dtype) - channel_view(mu, x)) * channel_view(inv_std, x)
        sum_g, sum_gx = g.sum(dims), (g * xhat).sum(dims)
        scale = inv_std if weight is None else inv_std * weight
        gx = channel_view(scale, x) * (g - channel_view(sum_g / total, x) - xhat * channel_view(sum_gx / total, x))
        gw, gb = (None, None) if weight is None else (sum_gx.to(weight.dtype), sum_g.to(weight.dtype))
        return gx.to(x.dtype), gw, gb, None, None, None, None


class MemorizedBatchNorm2d(BatchStatNorm):
    def __init__(self, num_features: int, memory_size: int = 10, eta: float = 0.9, lam: float = 0.1,
                 eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 lam_values: Sequence[float] = (), lam_milestones: Sequence[float] = (),
                 eval_stats: str = "memory", newest_weight: str = "lam", grad: str = "current"):
        super().__init__(num_features, eps, affine, momentum)
        if int(memory_size) != memory_size or memory_size < 1:
            raise UserError(f"MBN memory_size must be an integer >= 1 (got {memory_size}); "
                            "set norm.memory_size=10 (the paper's value) or use norm=bn for no memory")
        if not 0.0 <= eta <= 1.0:
            raise UserError(f"MBN eta must lie in [0, 1] (got {eta}); set norm.eta=0.9 (the paper's value)")
        lam_values = [float(v) for v in lam_values] or [float(lam)]
        if not all(0.0 <= v <= 1.0 for v in lam_values):
            raise UserError(f"MBN λ must lie in [0, 1] (eq. 8), got norm.lam={lam_values}; "
                            "the paper uses norm.lam=[0.1,0.5,0.9]")
        for key, value, allowed in (("eval_stats", eval_stats, ("memory", "running")),
                                    ("newest_weight", newest_weight, ("lam", "one")),
                                    ("grad", grad, ("current", "renorm"))):
            if value not in allowed:
                raise UserError(f"norm.{key} must be one of {list(allowed)} (got {value!r})")
        self.memory_size, self.eta = int(memory_size), float(eta)
        self.lam_values, self.lam_milestones = lam_values, [float(m) for m in lam_milestones]
        self.newest_weight, self.grad = newest_weight, grad
        is_bn = newest_weight == "lam" and not any(lam_values)  # λ = 0 throughout: BN (the paper)
        if is_bn:
            eval_stats = "running"
        self.inference_modes = (eval_stats, "memory" if eval_stats == "running" else "running")
        self.inference = eval_stats
        # λ is a tensor so that a schedule change never forces recompilation
        self.register_buffer("lam", torch.tensor(self.lam_values[0]))
        self._lam_set = None
        self.memory = StatsMemory(memory_size, mean=(num_features,), var=(num_features,), count=())

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._lam_set = None  # λ came from the checkpoint: write it again at the next step

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self.memory.reset()

    def set_progress(self, progress: float) -> None:
        lam = piecewise(self.lam_values, self.lam_milestones, progress)
        if lam != self._lam_set:  # a device write only when λ changes
            self.lam.fill_(lam)
            self._lam_set = lam

    def scheduled_values(self):
        return {"lam": Scheduled(self.lam_values[0] if self._lam_set is None else self._lam_set, "λ")}

    def alpha(self, age: torch.Tensor) -> torch.Tensor:
        """α of a memory slot recorded `age` batches before the current one (age 0 = newest)."""
        alpha = self.lam * torch.pow(self.eta, age.to(self.memory.count.dtype))
        if self.newest_weight == "one":
            alpha = torch.where(age == 0, torch.ones_like(alpha), alpha)
        return alpha

    def memory_weights(self) -> torch.Tensor:
        """α_i·n_i of eq. 6 for every slot during training (empty slots have n = 0)."""
        return self.alpha(self.memory.ages()) * self.memory.count

    def memorized_stats(self, mean=None, var=None, n=None):
        """μ̂, σ̂² of eq. 6. With a current batch (training) it has α = 1; without one (inference)
        the most recently recorded batch takes the current batch's place, so that training and
        inference share one rule."""
        mem = self.memory
        if mean is not None:
            weights = torch.cat([self.memory_weights(), mem.count.new_full((1,), float(n))])
            means = torch.cat([mem.mean, mean.to(mem.mean.dtype)[None]])
            variances = torch.cat([mem.var, var.to(mem.var.dtype)[None]])
            return combine_stats(means, variances, weights)
        age = mem.ages()
        alpha = torch.where(age == 0, torch.ones_like(mem.count), self.alpha((age - 1).clamp(min=0)))
        return combine_stats(mem.mean, mem.var, alpha * mem.count)

    @torch.no_grad()
    def push(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        """Record one batch's statistics, overwriting the oldest slot; update the running averages."""
        self.memory.push(mean=mean, var=var, count=float(n))
        self.update_running_stats(mean, var, n)

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad == "current" and not distributed():
            n = check_batch(self, x)
            y, mean, var = PooledBatchNorm.apply(x, self.weight, self.bias, self.memory.mean, self.memory.var,
                                                 self.memory_weights(), self.eps)
            if self.record:
                self.push(mean, var, n)
            return y
        mean, var, n = self.batch_stats(x)
        if self.grad == "renorm":
            with torch.no_grad():
                mu_hat, var_hat = self.memorized_stats(mean, var, n)
            std = torch.sqrt(var + self.eps)
            mu, std2 = renorm_stats(mean, std, mu_hat, torch.sqrt(var_hat + self.eps), math.inf, math.inf)
            y = self.affine_apply(x, mu, std2 - self.eps)
        else:
            y = self.affine_apply(x, *self.memorized_stats(mean, var, n))
        if self.record:
            self.push(mean.detach(), var.detach(), n)
        return y

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference == "running":
            return super().infer(x)
        mu_hat, var_hat = self.memorized_stats()
        # before anything was recorded the memory is empty: fall back to the running averages,
        # which then still hold their initial values (0, 1)
        empty = self.memory.filled == 0
        return self.affine_apply(x, torch.where(empty, self.running_mean, mu_hat),
                                 torch.where(empty, self.running_var, var_hat))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", memory_size={self.memory_size}, eta={self.eta}, "
                f"lam={self.lam_values} at {self.lam_milestones}, newest_weight={self.newest_weight}, "
                f"grad={self.grad}, inference={self.inference}")


@dataclass
class MBNConfig(NormConfig):
    """Memorized Batch Normalization (Guo et al. 2018, the paper); double forward"""
    name: str = "mbn"
    double_forward: bool = True
    memory_size: int = key(10, "MBN's k (batches memorized)", count, note="the paper's is 10")
    eta: float = key(0.9, "MBN's η (decay of an older batch's weight)", unit, note="the paper's is 0.9")
    lam: List[float] = key([0.1, 0.5, 0.9], "MBN's λ", Each(unit), Stages("norm.lam_milestones"),
                           note="the paper's are [0.1, 0.5, 0.9]")
    lam_milestones: List[float] = key([0.4, 0.6], "λ's milestones", fractions)
    momentum: float = key(0.1, "the rate of the BN-style running averages", unit)
    eval_stats: str = key("memory", "MBN's inference statistics", OneOf(["memory", "running"]),
                          note="memory: the paper's rule (running averages where λ = 0 throughout)")
    newest_weight: str = key("lam", "the newest slot's weight", OneOf(["lam", "one"]),
                             note="lam: eq. 8; one: the sentence before eq. 8")
    grad: str = key("current", "MBN's gradient", OneOf(["current", "renorm"]),
                    note="current: the paper's, through the current batch; renorm: BN's, the memory as r, d")


register("mbn", NormSpec(
    MemorizedBatchNorm2d, MBNConfig,
    lambda c: dict(memory_size=c.memory_size, eta=c.eta, eps=c.eps, momentum=c.momentum,
                   lam_values=list(c.lam), lam_milestones=list(c.lam_milestones), eval_stats=c.eval_stats,
                   newest_weight=c.newest_weight, grad=c.grad)))
