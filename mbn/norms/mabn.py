"""Moving Average Batch Normalization (Yan et al., ICLR 2020), as the official code computes it
(megvii-model/MABN, `MABN.py`, the "formal" version; spec: shared/papers/seed-normalizers.md §2).

No centering: a channel is divided by the root of an estimate v of ⟨x²⟩, and the convolutions
feeding the layer are weight-centralised (`CentredConv2d`: every filter has zero mean) in place of
the mean. Per layer, a step counter t and two rings of S = `buffer_size` per-step statistics,
Q (⟨x²⟩) and P (Ψ = ⟨g·z⟩, written in the backward pass), indexed by t mod S:
- forward: v = ⟨x²⟩ of the batch while t ≤ S or t < `warmup_iters`, else the mean of Q (SMA);
  s = sqrt(v + ε), z = x/s, out = γ·r·z + β with r = clip(s/sqrt(R + ε), 1/r_max, r_max) once
  t > max(`renorm_start`, `warmup_iters`), else 1; R ← α·R + (1−α)·v is the EMA inference uses;
- backward (ours, not autograd of the forward): g = ∂L/∂out·γ·r, ∂L/∂x = (g − z·ψ̄)/s with ψ̄ the
  batch Ψ under the same warm-up rule, else the mean of P; r is a constant.
Inference: out = γ·x/sqrt(R + ε) + β. t counts steps from 1 (the official defaults are steps).

Every switch is a tensor `where` over the buffer t: no host reads, one graph for torch.compile
and for CUDA-graph capture. State is in buffers (t, Q, P, R), so checkpoints resume exactly.

Which forward is which: a train-mode forward with autograd on is a training step's forward — it
normalizes at step t + 1, and its backward advances t and writes Q, P and (when the forward
records) R; without a backward the state stays as it was. A no-grad train-mode forward that
records is double forward's record pass (`record` option, spec §2.9):
- "recompute" (default): recompute ⟨x²⟩ of the step's batch with the updated weights into the
  slot the step wrote, v by the same rule, and R ← α·R + (1−α)·v (the step's forward left R
  alone); t and P are untouched. Under single forward the step's forward does all this itself.
- "noop": the step's forward always updates R, the record pass changes nothing (the paper has
  no double forward).
DDP: per-process statistics (as the official code, with broadcast_buffers=False, which the
engine uses): every rank normalizes with its own batch and rings; checkpoints hold rank 0's.
PreciseBN: the population ⟨x²⟩ of the frozen model's training batches replaces R (the rings and t
are untouched).
"""
from dataclasses import dataclass

import torch
from torch import nn

from mbn import UserError
from mbn.norms.base import BatchStatNorm, channel_affine, channel_dims, channel_view, check_batch
from mbn.norms.registry import NormConfig, NormSpec, register
from mbn.validate import OneOf, Range, count, key, unit, whole


class CentredConv2d(nn.Conv2d):
    """Weight centralisation: the effective filter of output channel o is W_o − mean(W_o) over
    (in_channels/groups, kh, kw); gradients flow through the subtraction. `centre=False` (set by
    the MABN layer it feeds, for the ablation) makes it a plain Conv2d."""

    centre: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.centre:
            w = w - w.mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


class _MABNFunction(torch.autograd.Function):
    """out = γ·r·x/s + β with MABN's backward; s, r: (C,) constants, `use_batch`: Ψ of the batch
    alone, else the SMA of the ring P (`state[3]`), whose slot `slot` receives this batch's Ψ.

    The backward also writes the step's new state computed by the forward (`new`: t, Q, R into
    `state`). Writing it in the forward would be the same numbers, but torch.compile's partitioner
    (2.14) may recompute a saved value in the backward from a buffer the forward has already
    overwritten (pytorch/pytorch#197039): r from the new R, the slot from the new t. With no
    forward writes there is nothing to read too late. Buffers travel as ctx attributes, not
    saved tensors, because the backward writes them."""

    @staticmethod
    def forward(ctx, x, weight, bias, s, r, slot, use_batch, new_t, new_sq_ring, new_running_sq,
                t, sq_ring, running_sq, psi_ring):
        ctx.save_for_backward(x, weight, s, r, slot, use_batch)
        ctx.state = (t, sq_ring, running_sq, psi_ring)
        ctx.new = (new_t, new_sq_ring, new_running_sq)
        return channel_affine(x, weight * r / s, bias)

    @staticmethod
    def backward(ctx, grad_out):
        """With g = ∂L/∂out·γ·r and z = x/s: ∂L/∂x = (g − z·ψ̄)/s, ψ = ⟨g·z⟩, ∂L/∂γ = Σ ∂L/∂out·r·z,
        evaluated as ∂L/∂out·(γ·r/s) − x·(ψ̄/s²) from one reduction Σ ∂L/∂out·x."""
        x, weight, s, r, slot, use_batch = ctx.saved_tensors
        t, sq_ring, running_sq, psi_ring = ctx.state
        dims = channel_dims(x)
        gout, xs = grad_out.to(s.dtype), x.to(s.dtype)
        grad_weight = (gout * xs).sum(dims) * r / s
        grad_bias = gout.sum(dims)
        batch_psi = weight * grad_weight * (x.size(1) / x.numel())
        psi = torch.where(slot[:, None], batch_psi, psi_ring)
        psi_bar = torch.where(use_batch, batch_psi, psi.mean(0))
        grad_x = gout * channel_view(weight * r / s, x) - xs * channel_view(psi_bar / s.square(), x)
        with torch.no_grad():
            for buf, new in zip((t, sq_ring, running_sq, psi_ring), (*ctx.new, psi)):
                if new is not None:
                    buf.copy_(new)
        return (grad_x.to(x.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)) + (None,) * 11


class MovingAverageBatchNorm2d(BatchStatNorm):
    inference_modes = ("running",)

    def __init__(self, num_features: int, buffer_size: int = 16, momentum: float = 0.98, eps: float = 1e-5,
                 warmup_iters: int = 100, renorm_start: int = 1000, r_max: float = 5.0, record: str = "recompute",
                 weight_centralization: bool = True):
        super().__init__(num_features, eps, True, momentum, running=False)
        if int(buffer_size) != buffer_size or buffer_size < 1:
            raise UserError(f"MABN buffer_size must be an integer >= 1 (got {buffer_size}); the official value is 16")
        if not 0.0 <= momentum <= 1.0:
            raise UserError(f"MABN momentum must lie in [0, 1] (got {momentum}); the official value is 0.98")
        for key, value in (("warmup_iters", warmup_iters), ("renorm_start", renorm_start)):
            if int(value) != value or value < 0:
                raise UserError(f"MABN {key} must be a whole number of steps >= 0 (got {value})")
        if not r_max >= 1.0:
            raise UserError(f"MABN r_max must be >= 1 (got {r_max}); the official value is 5")
        if record not in ("recompute", "noop"):
            raise UserError(f"norm.record must be one of ['recompute', 'noop'] (got {record!r})")
        self.buffer_size, self.warmup_iters = int(buffer_size), int(warmup_iters)
        self.renorm_start = max(int(renorm_start), self.warmup_iters)  # as the official code
        self.r_max, self.record_mode, self.weight_centralization = float(r_max), record, weight_centralization
        self.register_buffer("running_sq", torch.ones(num_features))           # R: EMA of v (⟨x²⟩)
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))         # t
        self.register_buffer("sq_ring", torch.zeros(self.buffer_size, num_features))   # Q
        self.register_buffer("psi_ring", torch.zeros(self.buffer_size, num_features))  # P
        self.register_buffer("slots", torch.arange(self.buffer_size), persistent=False)

    def bind_conv(self, conv: nn.Module) -> None:
        if isinstance(conv, CentredConv2d):
            conv.centre = self.weight_centralization

    def reset_running_stats(self) -> None:
        self.running_sq.fill_(1)
        self.step.zero_()
        self.sq_ring.zero_()
        self.psi_ring.zero_()

    def batch_sq(self, x: torch.Tensor) -> torch.Tensor:
        """⟨x²⟩ per channel in the buffers' dtype (fp32 under autocast), without gradient."""
        dims = channel_dims(x)
        return x.detach().to(self.running_sq.dtype).square().mean(dims)

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(self, x)
        step_forward = torch.is_grad_enabled()
        record_pass = not step_forward and self.record and self.record_mode == "recompute"
        with torch.no_grad():
            t = self.step + 1 if step_forward else self.step
            q = self.batch_sq(x)
            slot = self.slots == torch.remainder(t, self.buffer_size)
            ring = torch.where(slot[:, None], q, self.sq_ring)
            use_batch = (t <= self.buffer_size) | (t < self.warmup_iters)
            v = torch.where(use_batch, q, ring.mean(0))
            s = torch.sqrt(v + self.eps)
            r = torch.where(t > self.renorm_start,
                            (s / torch.sqrt(self.running_sq + self.eps)).clamp(1 / self.r_max, self.r_max),
                            torch.ones_like(s))
            update_r = record_pass or (step_forward and (self.record or self.record_mode == "noop"))
            running_sq = torch.lerp(self.running_sq, v, 1 - self.momentum) if update_r else None
        if step_forward:  # the backward writes t, Q, R (and P)
            return _MABNFunction.apply(x, self.weight, self.bias, s, r, slot, use_batch, t, ring, running_sq,
                                       self.step, self.sq_ring, self.running_sq, self.psi_ring)
        if record_pass:
            with torch.no_grad():
                self.sq_ring.copy_(ring)
                self.running_sq.copy_(running_sq)
        return channel_affine(x, self.weight * r / s, self.bias)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        return channel_affine(x, self.weight * torch.rsqrt(self.running_sq + self.eps), self.bias)

    # --- PreciseBN: the population ⟨x²⟩ of the final weights into R
    def precise_begin(self) -> bool:
        self._precise = torch.zeros(2, self.num_features, dtype=torch.float64, device=self.running_sq.device)
        return True

    def _precise_forward(self, x):
        """Normalize with the batch's ⟨x²⟩ alone (r = 1) and accumulate Σn·⟨x²⟩ and Σn."""
        n = check_batch(self, x)
        q = self.batch_sq(x)
        self._precise += torch.stack([n * q.double(), torch.full_like(q, n, dtype=torch.float64)])
        return channel_affine(x, self.weight * torch.rsqrt(q + self.eps), self.bias)

    @torch.no_grad()
    def precise_end(self) -> None:
        s, self._precise = self._precise, None
        self.running_sq.copy_(s[0] / s[1])

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, buffer_size={self.buffer_size}, "
                f"warmup_iters={self.warmup_iters}, renorm_start={self.renorm_start}, r_max={self.r_max}, "
                f"record={self.record_mode}, weight_centralization={self.weight_centralization}")


@dataclass
class MABNConfig(NormConfig):
    """Moving Average Batch Normalization (Yan et al. 2020); single forward"""
    name: str = "mabn"
    double_forward: bool = False    # the paper has none
    buffer_size: int = key(16, "MABN's S (steps in the SMAs of ⟨x²⟩ and Ψ)", count,
                           note="official: real_B / B = 32 / 2 = 16")
    momentum: float = key(0.98, "MABN's α (weight of the OLD value in R ← α·R + (1−α)·v)", unit,
                          note="the official value is 0.98")
    warmup_iters: int = key(100, "MABN's warm-up steps (batch statistics while t < warmup_iters or t <= S)", whole)
    renorm_start: int = key(1000, "MABN's renormalization start (r = 1 while t <= max(renorm_start, warmup_iters))",
                            whole)
    r_max: float = key(5.0, "MABN's r_max (r clipped to [1/r_max, r_max])", Range(1), note="the official value is 5")
    weight_centralization: bool = key(True, "weight-centralised convs (false: plain convs, the ablation)")
    # the double-forward record pass (spec §2.9, a proposal): recompute (⟨x²⟩ and R from the updated
    # weights, t and P untouched) | noop (the step's forward updates R, the record pass nothing)
    record: str = key("recompute", "MABN's double-forward record pass", OneOf(["recompute", "noop"]))


register("mabn", NormSpec(
    MovingAverageBatchNorm2d, MABNConfig,
    lambda c: dict(buffer_size=c.buffer_size, momentum=c.momentum, eps=c.eps, warmup_iters=c.warmup_iters,
                   renorm_start=c.renorm_start, r_max=c.r_max, record=c.record,
                   weight_centralization=c.weight_centralization),
    conv_layer=CentredConv2d))
