"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021), as specified from the official
code in seed-normalizers.md §1.

A training forward normalizes with statistics pooled over the current batch and the k − 1
previously recorded ones. Each old entry s holds the batch mean μ_s, the biased variance v_s and
their Jacobians w.r.t. the weights W_s of the convolution that produced the batch; it is moved to
the current weights W_t with a first-order Taylor step (ρ scales it, ρ = 0 is "naive CBN"):

    δμ = ρ·⟨Dμ_s, W_t − W_s⟩,  δν = ρ·⟨Dν_s, W_t − W_s⟩,  μ̃ = μ_s + δμ,  ν̃ = ν_s + δν.

The memory stores v = ν − μ² and Dv = Dν − 2μ·Dμ instead of ν and Dν, so that

    ṽ = ν̃ − μ̃² = v_s + ρ·⟨Dv_s, W_t − W_s⟩ − δμ²

is the same number without forming the raw second moments (whose difference cancels badly in
float32 when |μ| ≫ σ). The pooled statistics are μ̄ = Σ w·μ̃ / Σ w and σ̄² = Σ w·(ṽ + (μ̃ − μ̄)²) / Σ w,
which is the spec's ν̄ − μ̄² written the same way; the current batch always has w = 1.
- Variance guard: the paper's `max(ν̃, μ̃²)` per entry, i.e. ṽ clamped at 0 (default), or with
  `official=True` the code's drop rule (an entry with ṽ < 0 gets w = 0 in that channel).
- Gradients flow through the current batch's μ_t and v_t only; stored entries, stored Jacobians,
  snapshots and W_t inside the compensation are constants (the official code's `.data`).
- `official=True` also puts ε outside the square root, (x − μ̄)/(sqrt(σ̄²) + ε), in training and
  inference, and normalizes with the unbiased variance on the plain-BN path (burn-in, k = 1).
- Burn-in: plain BN for the first `burnin` fraction of training (set_progress). The switch is a
  0/1 buffer, so a compiled step or a captured CUDA graph stays valid across it. Entries recorded
  during burn-in do not count (the memory's fill count is held at 0), so after burn-in the window
  grows by one entry per step, as in the official code. The Jacobians are computed during burn-in
  too (the price of a step without host-side branches).
- k = 1 (`window=1`) is BN exactly; so is a layer whose `bind_conv` got no `CBNConv2d` (warned once).
  Changes of the producing conv's bias are not compensated (the official method ignores them; the
  models build bias-free convs). Compensation is exact for a bias-free conv applied to fixed inputs
  up to the second-order term ⟨(ΔW ⊛ u)²⟩ missing from ν̃.

Recording (the `record` switch of the protocol): a forward that records pushes this batch's entry
(μ, v, Dμ, Dv at the weights it ran with, and a snapshot of those weights) after normalizing,
and updates the running averages (EMA, momentum 0.1, of the current batch's μ and unbiased
variance, uncompensated, as in the official code). Single forward (the default; the CBN paper has
no double forward): the training forward records, so the entry of step t carries W_t. Double
forward: the main pass records nothing and touches no running average; the no-grad record pass
after the optimizer step recomputes μ, v, Dμ, Dv for the same batch at θ_{t+1} and pushes them with
the snapshot W_{t+1}, so at step t + 1 that entry needs no compensation. (This is the spec's §1.12
proposal — overwrite the entry pushed by the main pass — with the main pass not pushing at all,
which leaves the same memory.) Inference uses the running averages; PreciseBN (base class)
normalizes each batch as BN and recomputes them with the final weights.

DDP: statistics, Jacobians and memory are per process, as in the official code (no
synchronisation; the Jacobians would need an all-reduce of weight-sized tensors per layer), so each
rank pools its own batches and rank 0's memory is what a checkpoint saves.
"""
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.grad import conv2d_weight

from mbn import UserError
from mbn.norms.base import BatchStatNorm, StatsMemory, channel_stats, check_batch
from mbn.norms.registry import NormConfig, NormSpec, fields, register
from mbn.validate import count, key, nonnegative, unit


class CBNConv2d(nn.Conv2d):
    """A Conv2d that lends its input to the CBN layer bound to it: once claimed (`keep_input`), a
    training forward keeps a reference to its input until that layer takes it, a few ops later.
    Autograd holds the same tensor for the conv's backward anyway, so nothing lives longer."""

    keep_input = False
    last_input = None

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if self.keep_input and self.training:
            self.last_input = u
        return super().forward(u)

    def take_input(self):
        u, self.last_input = self.last_input, None
        return u


_warned = False


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        warnings.warn(message, stacklevel=3)
        _warned = True


class CrossIterationBatchNorm2d(BatchStatNorm):
    def __init__(self, num_features: int, window: int = 4, burnin: float = 0.0, rho: float = 1.0,
                 official: bool = False, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True):
        super().__init__(num_features, eps, affine, momentum)
        if isinstance(window, bool) or int(window) != window or window < 1:
            raise UserError(f"CBN window must be an integer >= 1 (got {window}); set norm.window=4 "
                            "(the official code's k) or norm.window=1 for BN")
        if not 0.0 <= burnin <= 1.0:
            raise UserError(f"CBN burnin is a fraction of training in [0, 1] (got {burnin}); e.g. norm.burnin=0.4")
        if not rho >= 0.0:
            raise UserError(f"CBN rho must be >= 0 (got {rho}); 1 is the method, 0 is naive CBN")
        self.window, self.burnin, self.rho, self.official = int(window), float(burnin), float(rho), bool(official)
        self.register_buffer("on", torch.tensor(self.burnin == 0.0))  # burn-in over: pool the window
        self._on_set = None
        self.register_module("memory", None)  # allocated by bind_conv, when the conv's shape is known
        self._conv = None

    # ------------------------------------------------------------------ binding and schedule
    def bind_conv(self, conv: nn.Module) -> None:
        if self.window == 1:
            return
        if not isinstance(conv, CBNConv2d):
            reason = f"it follows {type(conv).__name__ if conv is not None else 'no convolution'}, not a CBNConv2d"
        elif conv.out_channels != self.num_features:
            reason = f"its convolution has {conv.out_channels} output channels, not {self.num_features}"
        elif isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            reason = "its convolution pads with a mode other than explicit zero padding"
        else:
            reason = None
        if reason:
            _warn_once(f"CrossIterationBatchNorm2d({self.num_features}) falls back to plain BN: {reason} "
                       "(build models with mbn.build.make_model so convs that feed a normalizer are CBNConv2d)")
            return
        object.__setattr__(self, "_conv", conv)  # a reference, not a submodule: no duplicate params
        conv.keep_input = True
        w = conv.weight
        c, per_filter = w.size(0), w[0].numel()
        self.memory = StatsMemory(self.window - 1, mean=(c,), var=(c,), dmean=(conv.groups, per_filter),
                                  dvar=(c, per_filter), weight=(c, per_filter)).to(w.device, w.dtype)

    def set_progress(self, progress: float) -> None:
        on = progress >= self.burnin
        if on != self._on_set:  # a device write only at the switch
            self.on.fill_(on)
            self._on_set = on

    def scheduled_values(self):
        return {"cbn_on": float(self.burnin == 0.0 if self._on_set is None else self._on_set)}

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._on_set = None  # the switch came from the checkpoint: write it again at the next step

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if self.memory is not None:
            self.memory.reset()

    # ------------------------------------------------------------------ statistics
    def local_stats(self, x: torch.Tensor):
        """This process's batch mean and biased variance (fp32 under autocast); differentiable."""
        n = check_batch(self, x)
        mean, var = channel_stats(x)
        return mean, var, n

    @torch.no_grad()
    def jacobians(self, u: torch.Tensor, x: torch.Tensor, mean: torch.Tensor):
        """Closed-form Dμ (one row per group: equal for every filter of a group) and Dv = Dν − 2μ·Dμ
        (one row per filter) of the batch whose conv input is `u` and output `x`, flattened per filter."""
        conv, dtype = self._conv, self.memory.mean.dtype
        u, x = u.detach().to(dtype), x.detach().to(dtype)
        m = x.numel() // x.size(1)
        g = conv.groups
        geometry = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=g)
        shape = conv.weight.shape
        ones = x.new_ones(1, g, *x.shape[2:])  # Dμ is linear in u: sum the batch first
        dmean = conv2d_weight(u.sum(0, keepdim=True), (g, *shape[1:]), ones, **geometry) / m
        dvar = conv2d_weight(u, shape, x - mean.to(dtype).view(1, -1, 1, 1), **geometry) * (2.0 / m)
        return dmean.flatten(1), dvar.flatten(1)

    @torch.no_grad()
    def compensated(self):
        """μ̃ and ṽ = ν̃ − μ̃² of every memory slot at the conv's current weights, (k−1, C) each."""
        mem = self.memory
        s, c = mem.mean.shape
        g = mem.dmean.size(1)
        delta = self._conv.weight.detach().to(mem.weight.dtype).reshape(c, -1) - mem.weight  # (s, C, K)
        dmu = self.rho * torch.einsum("sgok,sgk->sgo", delta.view(s, g, c // g, -1), mem.dmean).reshape(s, c)
        dvar = self.rho * torch.einsum("sck,sck->sc", delta, mem.dvar)
        return mem.mean + dmu, mem.var + dvar - dmu * dmu

    def window_stats(self, mean: torch.Tensor, var: torch.Tensor):
        """μ̄, σ̄² pooled over the current batch (differentiable) and the valid, compensated slots."""
        with torch.no_grad():
            mu, v = self.compensated()
            keep = (self.memory.valid() & self.on)[:, None].expand_as(mu)
            if self.official:
                keep = keep & (v >= 0)  # drop rule
            else:
                v = v.clamp(min=0)  # max(ν̃, μ̃²)
            mu, v = torch.where(keep, mu, 0), torch.where(keep, v, 0)  # unused slots may hold anything
            w = torch.cat([keep.to(mu.dtype), torch.ones_like(mu[:1])])
        means = torch.cat([mu, mean.to(mu.dtype)[None]])
        variances = torch.cat([v, var.to(mu.dtype)[None]])
        total = w.sum(0)
        mean_bar = (w * means).sum(0) / total
        var_bar = (w * (variances + (means - mean_bar) ** 2)).sum(0) / total
        return mean_bar, var_bar

    @torch.no_grad()
    def push(self, u, x, mean, var, n) -> None:
        """Record the batch: its entry (held uncounted during burn-in) and the running averages."""
        mean, var = mean.detach(), var.detach()
        dmean, dvar = self.jacobians(u, x, mean)
        w = self._conv.weight.detach()
        self.memory.push(mean=mean, var=var, dmean=dmean, dvar=dvar, weight=w.reshape(w.size(0), -1))
        self.memory.filled.mul_(self.on)
        self.update_running_stats(mean, var, n)

    # ------------------------------------------------------------------ forward
    def normalize(self, x, mean, var):
        if not self.official:
            return self.affine_apply(x, mean, var)
        return self.scale_shift(x, mean, 1.0 / (torch.sqrt(var) + self.eps))  # the official default (out_p=False)

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var, n = self.local_stats(x)
        bn_var = var * (n / (n - 1)) if self.official else var  # the official BN path: unbiased
        if self.memory is None:  # k = 1 or no producing conv: BN
            y = self.normalize(x, mean, bn_var)
            if self.record:
                self.update_running_stats(mean.detach(), var.detach(), n)
            return y
        u = self._conv.take_input()
        if u is None:
            raise RuntimeError(f"CrossIterationBatchNorm2d({self.num_features}) ran without its convolution "
                               "running first in training mode; it must directly follow the conv bound to it")
        # official burn-in normalizes with the unbiased variance; the entry and the running average
        # take the biased one (update_running_stats applies n/(n − 1) itself)
        norm_var = torch.where(self.on, var, bn_var) if self.official else var
        y = self.normalize(x, *self.window_stats(mean, norm_var))
        if self.record:
            self.push(u, x, mean, var, n)
        return y

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        if self._conv is not None:
            self._conv.last_input = None
        return self.normalize(x, self.running_mean, self.running_var)

    def _precise_forward(self, x):
        if self._conv is not None:
            self._conv.last_input = None
        return super()._precise_forward(x)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", window={self.window}, burnin={self.burnin}, rho={self.rho}, "
                f"official={self.official}" + ("" if self.window == 1 or self.memory is not None else ", as BN"))


@dataclass
class CBNConfig(NormConfig):
    """Cross-Iteration Batch Normalization (Yao et al. 2021); single forward"""
    name: str = "cbn"
    double_forward: bool = False
    window: int = key(4, "CBN's window k (including the current batch)", count, note="the paper's is 4")
    burnin: float = key(0.0, "CBN's burn-in (the fraction of training spent as plain BN)", unit,
                        note="configs/norm/cbn.yaml: the first lr decay")
    rho: float = key(1.0, "CBN's compensation scale (0: naive CBN)", nonnegative)
    official: bool = key(False, "the official code's drop rule, ε outside sqrt, unbiased BN-path variance")
    momentum: float = key(0.1, "the running-average rate (PyTorch convention)", unit)


register("cbn", NormSpec(CrossIterationBatchNorm2d, CBNConfig,
                         fields("window", "burnin", "rho", "official", "eps", "momentum"), conv_layer=CBNConv2d))
