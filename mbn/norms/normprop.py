"""Normalization Propagation (Arpit et al., ICML 2016): data-independent normalization.

Each output channel of the preceding convolution is divided by the ℓ2 norm of its filter and by
the paper's constant 1.21 — the factor by which a NormProp ReLU layer's Jacobian grows the
signal, so dividing by it keeps activations O(1) layer after layer — then scaled by a learnable γ
and shifted by β. The ReLU that follows is replaced by `NormPropReLU`, which re-centres and
re-scales with the closed-form mean and std of a rectified N(0, 1). Inputs are normalized with
dataset statistics (our data pipeline does that). Defined for plain (non-residual) networks only.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from mbn import UserError
from mbn.norms.base import Normalizer
from mbn.norms.registry import NormConfig, NormSpec, fields, register

RELU_MEAN = math.sqrt(1 / (2 * math.pi))         # E[max(0, z)], z ~ N(0, 1)
RELU_STD = math.sqrt(0.5 * (1 - 1 / math.pi))    # std[max(0, z)]


class NormPropReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.relu(x) - RELU_MEAN) / RELU_STD


class NormProp2d(Normalizer):
    """Needs the weight of the convolution it follows: `bind_conv` is called by the model
    builder (mbn.norms.bind_convs) with the convolution registered just before this layer.
    Nothing to record (double forward changes nothing) and the same computation in eval mode."""

    def __init__(self, num_features: int, const: float = 1.21, eps: float = 1e-8):
        super().__init__()
        if const <= 0:
            raise UserError(f"NormProp const must be > 0 (got {const}); the paper divides by 1.21")
        self.num_features, self.const, self.eps = num_features, const, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self._conv = None

    def bind_conv(self, conv: nn.Module) -> None:
        if not isinstance(conv, nn.Conv2d) or conv.out_channels != self.num_features or conv.bias is not None:
            raise UserError(f"NormProp2d({self.num_features}) must follow a bias-free Conv2d with "
                            f"{self.num_features} output channels, found {conv!r}")
        object.__setattr__(self, "_conv", conv)  # a reference, not a submodule: no duplicate params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._conv is None:
            raise RuntimeError("NormProp2d is not bound to its convolution; build models with "
                               "mbn.build.make_model (it calls mbn.norms.bind_convs)")
        filter_norm = self._conv.weight.flatten(1).norm(dim=1).clamp_min(self.eps)
        scale = (self.weight / (self.const * filter_norm)).to(x.dtype)
        return x * scale.view(1, -1, 1, 1) + self.bias.to(x.dtype).view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, const=1/{self.const}"


@dataclass
class NormPropConfig(NormConfig):
    name: str = "normprop"
    const: float = 1.21   # outputs are divided by it (Arpit et al. 2016)
    eps: float = 1e-8


register("normprop", NormSpec(NormProp2d, NormPropConfig, fields("const", "eps"),
                              act_layer=NormPropReLU, residual_ok=False))
