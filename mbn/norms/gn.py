"""Group Normalization (Wu & He, ECCV 2018): per sample, the channels are split into G contiguous
groups, each normalized by its own mean and biased variance over (channels, H, W), then a
per-channel affine. No batch statistics: train and eval compute the same thing, a training forward
does not depend on the other samples, and double forward's record pass has nothing to record.

G = `groups` (32, the paper's default) where it divides the channel count; elsewhere the paper
gives no rule (torch.nn.GroupNorm raises) and we take the largest divisor of C that is <= groups
(16 -> 16, 48 -> 24, 100 -> 25, 3 -> 3): the groups stay as many as allowed and equally sized.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mbn import UserError
from mbn.norms.base import Normalizer
from mbn.norms.registry import NormConfig, NormSpec, fields, register
from mbn.validate import count, key


def num_groups(channels: int, groups: int) -> int:
    """The largest divisor of `channels` that is <= `groups`."""
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


class GroupNorm2d(Normalizer):
    def __init__(self, num_features: int, groups: int = 32, eps: float = 1e-5):
        super().__init__()
        if int(groups) != groups or groups < 1:
            raise UserError(f"GroupNorm groups must be an integer >= 1 (got {groups}); the paper's is 32")
        self.num_features, self.eps = num_features, eps
        self.num_groups = num_groups(num_features, int(groups))
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.num_groups}, eps={self.eps}"


@dataclass
class GNConfig(NormConfig):
    """Group Normalization (Wu & He 2018); no batch statistics"""
    name: str = "gn"
    double_forward: bool = False   # nothing to record
    groups: int = key(32, "GN's group count G (where it does not divide C: the largest divisor of C below it)", count,
                      note="the paper's is 32")


register("gn", NormSpec(GroupNorm2d, GNConfig, fields("groups", "eps")))
