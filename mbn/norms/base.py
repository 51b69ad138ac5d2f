"""What every batch-statistics normalizer shares: affine parameters, batch statistics, the
`record` switch used by double forward, and the per-step schedule hook."""
import torch
import torch.distributed as dist
from torch import nn

from mbn import UserError


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_stats(mean: torch.Tensor, var: torch.Tensor, n: int):
    """Mean and biased variance over the global batch from every rank's (mean, var): gathered
    in one collective (differentiably, so gradients reach every rank's inputs as in
    SyncBatchNorm) and pooled exactly like groups of eq. 6 with α = 1. Our loaders give every
    rank the same batch size, so the groups weigh the same. No host sync."""
    from torch.distributed.nn.functional import all_gather

    from mbn.norms.mbn import combine_stats

    gathered = torch.stack(all_gather(torch.stack([mean, var])))  # (world, 2, C)
    m, v = combine_stats(gathered[:, 0], gathered[:, 1], torch.ones_like(gathered[:, 0, 0]))
    return m, v, n * dist.get_world_size()


class BatchStatNorm(nn.Module):
    """Normalizes (N, C, ...) inputs per channel with statistics estimated from training batches.

    `record` (a plain attribute, flipped by `mbn.double_forward.recording`) decides whether a
    train-mode forward stores the batch's statistics (running averages, memory). A forward that
    does not record still normalizes exactly as in training.
    """

    record: bool = True

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def batch_stats(self, x: torch.Tensor):
        """Per-channel mean and biased variance of `x` in float32 (or float64), and the number
        of values per channel, over the global batch when training with several processes.
        Differentiable."""
        n = x.numel() // x.size(1)
        if n <= 1:
            raise UserError(
                f"{type(self).__name__}: a training batch of shape {tuple(x.shape)} has a single value "
                "per channel, so batch statistics are undefined; use train.batch_size >= 2")
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # statistics and memory stay in fp32 under autocast
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        if distributed():
            return global_stats(mean, var, n)
        return mean, var, n

    def affine_apply(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """y = weight * (x - mean) / sqrt(var + eps) + bias, as one scale and one shift."""
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -mean * scale
        if self.affine:
            shift = shift + self.bias
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = x.to(scale.dtype) * scale.view(shape) + shift.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        """BN's running averages (running_mean, unbiased running_var, num_batches_tracked) for
        the subclasses that keep them."""
        self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
        self.running_var.lerp_(var.detach().to(self.running_var.dtype) * (n / (n - 1)), self.momentum)
        self.num_batches_tracked.add_(1)

    def set_progress(self, progress: float) -> None:
        """Called by the training loop before every step with the fraction of training done;
        normalizers with scheduled hyper-parameters (MBN's λ, BRN's r_max/d_max) override it."""

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"
