"""Revisiting Batch Normalization (Davis & Frank, arXiv 2110.13989; official code osu-cvl/revisiting-bn;
spec: shared/papers/seed-normalizers.md §3). BN's computation unchanged (our BatchNorm2d); what
changes is how it is initialised and trained, and how the input is normalized:
- every γ starts at `gamma_init` (0.1) instead of 1, β at 0;
- every γ learns with lr / `gamma_lr_div` (100), its own optimizer group, so the lr schedule
  scales it like the others;
- no weight decay on normalizer parameters (γ, β) or on any bias; conv/linear weights keep
  optim.weight_decay. Groups are formed by module type (a normalizer's weight is a γ), not by the
  official code's 1-D-shape test, which would also catch a 1-output linear layer's weight;
- online input normalization (`data.input_norm=bn`, the default with this normalizer): the data
  pipeline feeds [0, 1] images and the model starts with a BN over the 3 input channels, its γ
  = gamma_init·sigma_act (0.58 ≈ std of ReLU(z), z ~ N(0, 1)) in the γ group, its β fixed at 0.
  With data.input_norm=dataset the images are standardized by the dataset statistics instead
  and there is no input BN.
Double forward: BN's (the record pass updates the running averages, input BN included).
DDP: BN's (global batch statistics). PreciseBN: BN's, input BN included.
"""
from dataclasses import dataclass

import torch
from torch import nn

from mbn import UserError
from mbn.norms.base import Normalizer
from mbn.norms.bn import BatchNorm2d
from mbn.norms.registry import NormConfig, NormSpec, register
from mbn.validate import OneOf, key, nonnegative, positive, unit


class RevisitedBatchNorm2d(BatchNorm2d):
    """Our BatchNorm2d with γ initialised to `gamma_init`."""

    def __init__(self, num_features: int, gamma_init: float = 0.1, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(num_features, eps=eps, momentum=momentum)
        if not gamma_init > 0:
            raise UserError(f"Revisiting-BN gamma_init must be > 0 (got {gamma_init}); the paper's is 0.1, "
                            "1.0 is plain BN's")
        with torch.no_grad():
            self.weight.fill_(gamma_init)


class InputNormalized(nn.Module):
    """`net` applied to the output of `input_norm`."""

    def __init__(self, input_norm: nn.Module, net: nn.Module):
        super().__init__()
        self.input_norm, self.net = input_norm, net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.input_norm(x))


def wrap_model(model: nn.Module, cfg) -> nn.Module:
    """Prepend the input BN when the data pipeline leaves its images in [0, 1]."""
    input_norm = cfg.data.get("input_norm", "dataset")
    if input_norm == "dataset":
        return model
    if input_norm != "bn":
        raise UserError(f"data.input_norm must be 'dataset' or 'bn', got {input_norm!r}")
    c = cfg.norm
    input_bn = RevisitedBatchNorm2d(3, gamma_init=c.gamma_init * c.sigma_act, eps=c.eps, momentum=c.momentum)
    input_bn.bias.requires_grad_(False)
    return InputNormalized(input_bn, model)


def param_groups(model: nn.Module, c) -> list:
    """[weights with optim.weight_decay, γ's at lr/gamma_lr_div, β's and biases], without decay
    for the last two; frozen parameters are left out."""
    decay, gammas, others, seen = [], [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, Normalizer):
                (gammas if name == "weight" else others).append(p)
            else:
                (others if name == "bias" else decay).append(p)
    wd = c.norm_weight_decay
    groups = [{"name": "decay", "params": decay, "lr_scale": 1.0},
              {"name": "gamma", "params": gammas, "lr_scale": 1.0 / c.gamma_lr_div, "weight_decay": wd},
              {"name": "no_decay", "params": others, "lr_scale": 1.0, "weight_decay": wd}]
    return [g for g in groups if g["params"]]


@dataclass
class RBNConfig(NormConfig):
    """Revisiting Batch Normalization (Davis & Frank 2021): BN with γ₀ = 0.1 at lr/100, an input BN"""
    name: str = "rbn"
    double_forward: bool = False   # the paper has none
    momentum: float = key(0.1, "the running-average rate", unit)
    gamma_init: float = key(0.1, "Revisiting-BN's initial γ of every BN", positive, note="the paper's is 0.1")
    # the official code ignores c <= 1, we apply it
    gamma_lr_div: float = key(100.0, "Revisiting-BN's c (γ's lr = lr / c)", positive, note="the paper's is 100")
    norm_weight_decay: float = key(0.0, "weight decay of every γ, β and bias", nonnegative, note="the paper: none")
    sigma_act: float = key(0.58, "the input BN's γ = gamma_init·sigma_act", positive)
    input_norm: str = key("bn", "the default of data.input_norm (which decides)", OneOf(["bn", "dataset"]),
                          note="bn: the paper's [0, 1] images and an input BN")


def _kwargs(c):
    if not c.gamma_lr_div > 0:
        raise UserError(f"norm.gamma_lr_div must be > 0 (got {c.gamma_lr_div}); the paper's is 100, 1 leaves γ's lr")
    if c.norm_weight_decay < 0:
        raise UserError(f"norm.norm_weight_decay must be >= 0 (got {c.norm_weight_decay})")
    return dict(gamma_init=c.gamma_init, eps=c.eps, momentum=c.momentum)


register("rbn", NormSpec(RevisitedBatchNorm2d, RBNConfig, _kwargs, param_groups=param_groups, wrap_model=wrap_model))
