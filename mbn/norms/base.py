"""The normalizer protocol. Every layer in mbn.norms derives from `Normalizer`; the training loop,
eval.py and the trackers talk to normalizers only through it and the helpers at the bottom of
this file (`recording`, `set_progress`, `scheduled_values`, `inference_stats`,
`precise_statistics`), never through a particular layer's attributes.

What a normalizer may declare:
- `record` (flipped by `recording`): whether a train-mode forward stores statistics (running
  averages, memory). A forward that does not record still normalizes exactly as in training.
- `set_progress(p)` / `scheduled_values()`: hyper-parameters scheduled over training (λ, r_max),
  each a `Scheduled` number that carries the name the console shows (the logs use the key).
- `inference_modes`: the statistics it can infer with, default first ("memory", "running").
- `bind_conv(conv)`: receives the convolution that produces its input (module order).
- `precise_begin()` / `precise_end()`: PreciseBN support (statistics recomputed with frozen weights).
"""
import contextlib
from typing import Dict, Tuple

import torch
import torch.distributed as dist
from torch import nn

from mbn import UserError


def combine_stats(means, variances, weights):
    """Eq. 6 of the MBN paper: mean and variance of a union of groups given each group's mean
    (G, C), biased variance (G, C) and weight α_i·n_i (G,). The variance includes the correction
    term (μ_i − μ̂)², so it equals the variance of the pooled data (eq. 5)."""
    # broadcast sums, not matmuls: a compiler fuses them with their neighbours (a matmul is a
    # library call of its own, per layer, forward and backward)
    w = weights[:, None] / weights.sum()
    mean = (w * means).sum(0)
    var = (w * (variances + (means - mean) ** 2)).sum(0)
    return mean, var


def channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel (C,) tensor shaped to broadcast against (N, C, ...) `x`."""
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def channel_dims(x: torch.Tensor):
    """The dimensions a per-channel statistic of (N, C, ...) `x` reduces over."""
    return [0] + list(range(2, x.dim()))


def channel_stats(x: torch.Tensor, dtype: torch.dtype = None):
    """Per-channel mean and biased variance of `x`, computed in `dtype` (default: x's, fp32 for
    half-precision x: statistics and memory stay fp32 under autocast)."""
    if dtype is None:
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    var, mean = torch.var_mean(x.to(dtype), dim=channel_dims(x), correction=0)
    return mean, var


def channel_affine(x, scale, shift):
    """x·scale + shift per channel, computed in the dtype of `scale`, returned in x's."""
    return (x.to(scale.dtype) * channel_view(scale, x) + channel_view(shift, x)).to(x.dtype)


def scale_shift(x, mean, inv_std, weight=None, bias=None):
    """y = weight * (x - mean) * inv_std + bias per channel, as one scale and one shift, computed
    in the statistics' precision and returned in x's."""
    scale = inv_std if weight is None else inv_std * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return channel_affine(x, scale, shift)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_stats(mean: torch.Tensor, var: torch.Tensor, n: int):
    """Mean and biased variance over the global batch from every rank's (mean, var): gathered
    in one collective (differentiably, so gradients reach every rank's inputs as in
    SyncBatchNorm) and pooled with eq. 6, α = 1. Every rank has the same batch size. No host sync."""
    from torch.distributed.nn.functional import all_gather

    gathered = torch.stack(all_gather(torch.stack([mean, var])))  # (world, 2, C)
    m, v = combine_stats(gathered[:, 0], gathered[:, 1], torch.ones_like(gathered[:, 0, 0]))
    return m, v, n * dist.get_world_size()


def check_batch(layer: nn.Module, x: torch.Tensor) -> int:
    """Values per channel in a training batch; a clear error where statistics are undefined."""
    n = x.numel() // x.size(1)
    if n <= 1:
        raise UserError(
            f"{type(layer).__name__}: a training batch of shape {tuple(x.shape)} has a single value "
            "per channel, so batch statistics are undefined; use train.batch_size >= 2")
    return n


class Scheduled(float):
    """A scheduled hyper-parameter's current value (a float) with the name the console shows for
    it, e.g. Scheduled(0.5, "λ") for MBN's `lam`."""

    def __new__(cls, value: float, label: str = None):
        out = super().__new__(cls, value)
        out.label = label
        return out


class Normalizer(nn.Module):
    """Base of every normalizer. Defaults describe a layer with no statistics (GroupNorm, NormProp)."""

    record: bool = True
    inference_modes: Tuple[str, ...] = ()

    def bind_conv(self, conv: nn.Module) -> None:
        """Called by the model builder with the convolution registered just before this layer."""

    def set_progress(self, progress: float) -> None:
        """Called before every training step with the fraction of training done."""

    def scheduled_values(self) -> Dict[str, float]:
        """The current values of scheduled hyper-parameters, for the logs (host values, no sync):
        {key: value}, a value a `Scheduled` where the console should show another name than the key."""
        return {}

    def set_inference(self, which: str) -> None:
        """Which statistics an eval-mode forward uses; one of `inference_modes`."""
        if which not in self.inference_modes:
            raise UserError(f"{type(self).__name__} infers with {list(self.inference_modes) or 'no statistics'}, "
                            f"not {which!r}")
        self.inference = which

    def precise_begin(self) -> bool:
        """Start accumulating population statistics; False for layers without any."""
        return False

    def precise_end(self) -> None:
        pass


class BatchStatNorm(Normalizer):
    """Normalizes (N, C, ...) inputs per channel with statistics estimated from training batches;
    owns the affine parameters and BN's running averages (running_mean, unbiased running_var,
    num_batches_tracked) for the subclasses that keep them. Subclasses implement `train_forward`
    and `infer`; `forward` dispatches, and handles the PreciseBN pass for all of them."""

    inference_modes = ("running",)

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, momentum: float = 0.1,
                 running: bool = True):
        super().__init__()
        self.num_features, self.eps, self.affine, self.momentum = num_features, eps, affine, momentum
        self.inference = self.inference_modes[0]
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if running:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self._precise = None

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def batch_stats(self, x: torch.Tensor):
        """Per-channel mean and biased variance of `x` in float32 (or float64), and the number
        of values per channel, over the global batch when training with several processes.
        Differentiable."""
        n = check_batch(self, x)
        mean, var = channel_stats(x)
        if distributed():
            return global_stats(mean, var, n)
        return mean, var, n

    def affine_apply(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """y = weight * (x - mean) / sqrt(var + eps) + bias, as one scale and one shift."""
        return self.scale_shift(x, mean, torch.rsqrt(var + self.eps))

    def scale_shift(self, x: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor) -> torch.Tensor:
        """y = weight * (x - mean) * inv_std + bias, as one scale and one shift."""
        return scale_shift(x, mean, inv_std, self.weight, self.bias)

    @torch.no_grad()
    def update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        """BN's running averages: running_var tracks the unbiased variance."""
        self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
        self.running_var.lerp_(var.detach().to(self.running_var.dtype) * (n / (n - 1)), self.momentum)
        self.num_batches_tracked.add_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.infer(x)
        if self._precise is not None:
            return self._precise_forward(x)
        return self.train_forward(x)

    def train_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Eval mode with the running averages (subclasses with other modes override)."""
        return self.affine_apply(x, self.running_mean, self.running_var)

    # --- PreciseBN: population statistics of the final weights (fvcore's estimator "b") ---
    def precise_begin(self) -> bool:
        p = self.weight if self.weight is not None else self.running_mean
        self._precise = torch.zeros(3, self.num_features, dtype=torch.float64, device=p.device)
        return True

    def _precise_forward(self, x):
        """Normalize with this batch's statistics alone (as BN) and accumulate Σn·μ, Σn·E[x²], Σn."""
        mean, var, n = self.batch_stats(x)
        with torch.no_grad():
            m, v = mean.double(), var.double()
            self._precise += torch.stack([n * m, n * (v + m * m), torch.full_like(m, n)])
        return self.affine_apply(x, mean, var)

    def precise_end(self) -> None:
        s, self._precise = self._precise, None
        mean = s[0] / s[2]
        self.load_population_stats(mean, s[1] / s[2] - mean * mean)

    @torch.no_grad()
    def load_population_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Write a population mean and (biased) variance where `infer` reads them."""
        self.running_mean.copy_(mean)
        self.running_var.copy_(var)
        self.inference = "running"

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, momentum={self.momentum}"


class StatsMemory(nn.Module):
    """A ring buffer of per-batch statistics: `fields` maps a name to the shape of one entry
    (e.g. mean=(C,), var=(C,), count=()). Fixed-size tensors (saved, moved, captured by CUDA
    graphs like any buffer); writes are masked, so they are deterministic and free of host syncs.
    `ages()` gives 0 for the newest entry and size-1 for the oldest; `filled` counts entries."""

    def __init__(self, size: int, **fields):
        super().__init__()
        self.size = int(size)
        self.names = tuple(fields)
        for name, shape in fields.items():
            self.register_buffer(name, torch.zeros(self.size, *shape))
        self.register_buffer("head", torch.tensor(0, dtype=torch.long))    # next slot to write
        self.register_buffer("filled", torch.tensor(0, dtype=torch.long))  # slots holding an entry
        self.register_buffer("slots", torch.arange(self.size), persistent=False)

    def ages(self) -> torch.Tensor:
        return torch.remainder(self.head - 1 - self.slots, self.size)

    def valid(self) -> torch.Tensor:
        """Mask of the slots that hold an entry."""
        return self.ages() < self.filled

    @torch.no_grad()
    def push(self, **values) -> None:
        """Write one entry into the oldest slot."""
        self._write(self.slots == self.head, values)
        self.head.copy_(torch.remainder(self.head + 1, self.size))
        self.filled.copy_((self.filled + 1).clamp(max=self.size))

    @torch.no_grad()
    def overwrite_newest(self, **values) -> None:
        """Replace the newest entry (double forward's record pass)."""
        self._write(self.ages() == 0, values)

    def _write(self, slot, values):
        for name, v in values.items():
            buf = getattr(self, name)
            mask = slot.view(-1, *([1] * (buf.dim() - 1)))
            # a Python number becomes a fill on the device, never a host-to-device copy (which a
            # CUDA graph cannot capture)
            v = v.to(buf.dtype) if torch.is_tensor(v) else buf.new_full(buf.shape[1:], float(v))
            buf.copy_(torch.where(mask, v, buf))

    def reset(self) -> None:
        for name in self.names:
            getattr(self, name).zero_()
        self.head.zero_()
        self.filled.zero_()

    def extra_repr(self) -> str:
        return f"size={self.size}, fields={self.names}"


# ------------------------------------------------------------------ helpers the loop calls
def normalizers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, Normalizer)]


def set_recording(model: nn.Module, enabled: bool) -> None:
    for m in normalizers(model):
        m.record = enabled


@contextlib.contextmanager
def recording(model: nn.Module, enabled: bool):
    """Within the block, train-mode forwards record statistics iff `enabled`."""
    previous = [(m, m.record) for m in normalizers(model)]
    set_recording(model, enabled)
    try:
        yield model
    finally:
        for m, flag in previous:
            m.record = flag


def set_progress(layers, progress: float) -> None:
    for m in layers:
        m.set_progress(progress)


def scheduled_values(model: nn.Module) -> Dict[str, float]:
    """The scheduled hyper-parameters of the first layer that has any (all layers share them)."""
    for m in normalizers(model):
        values = m.scheduled_values()
        if values:
            return values
    return {}


def inference_modes(model: nn.Module) -> Tuple[str, ...]:
    """The inference statistics every statistics-keeping layer of the model supports, in order."""
    layers = [m.inference_modes for m in normalizers(model) if m.inference_modes]
    return tuple(x for x in layers[0] if all(x in other for other in layers)) if layers else ()


def inference_stats(model: nn.Module, which: str) -> None:
    """Evaluate with `which` statistics ("default" = each layer's first mode)."""
    for m in normalizers(model):
        if m.inference_modes:
            m.set_inference(m.inference_modes[0] if which == "default" else which)


@torch.no_grad()
def precise_statistics(model: nn.Module, batches, autocast=contextlib.nullcontext) -> bool:
    """PreciseBN: run the training batches `batches` (an iterable of (x, y)) through the frozen
    model in train mode, every statistics layer normalizing with the batch alone and
    accumulating the population mean and variance (Σn·μ/Σn, Σn·E[x²]/Σn − μ²), then infer with
    them. Parameters and recorded state (memory, windows) are untouched. False if the model has
    no statistics layer."""
    layers = [m for m in normalizers(model) if m.precise_begin()]
    if not layers:
        return False
    was_training = model.training
    model.train()
    try:
        with recording(model, False), autocast():
            for x, _ in batches:
                model(x)
    finally:
        model.train(was_training)
    for m in layers:
        m.precise_end()
    return True
