"""Normalization Propagation (Arpit et al., ICML 2016): data-independent normalization.

Each output channel of the preceding convolution is divided by the ℓ2 norm of its filter and by
the constant 1.21, then scaled by a learnable γ and shifted by β:

    o_i = γ_i · (W_i ⋆ x) / (1.21 · ‖W_i‖) + β_i

1.21 ≈ 1/sqrt(1 − 1/π) is the RMS gain of the NormProp ReLU's Jacobian (its slope is 1/RELU_STD on
the half of a N(0, 1) input that is positive). The paper starts γ at 1/1.21 so that a layer's
Jacobian has singular values near 1; dividing by the constant with γ starting at 1 is the same
layer at initialization. It keeps the backward signal O(1); the forward pre-activation std
comes out below 1 (0.2-1 through NIN and VGG-16 at init, tests/test_normprop.py). The ReLU
that follows is replaced by `NormPropReLU`, which re-centres and re-scales with the closed-form
mean and std of a rectified N(0, 1). Inputs are normalized with
dataset statistics (our data pipeline does that). Defined for plain (non-residual) networks only.

Filter length. The output does not depend on ‖W_i‖, so under SGD the length is purely the step
size of the filter's direction: the gradient is orthogonal to W_i and of size ∝ 1/‖W_i‖, a step
turns the filter by ≈ lr·|∇|/‖W_i‖² radians. The models' He (fan-out) init leaves lengths of
0.18 (NIN's 3→192 5x5 conv) to 1.8, so at the paper's lr 0.1 the first step turns NIN's filters by
0.5 rad (first conv), 0.26 rad (conv after the max-pool), 0.18 rad (after the avg-pool). BN shrugs
that off (it divides by the measured std); NormProp cannot: dividing by ‖W_i‖ gives unit
variance only for a white input, and after a pooling layer the im2col patches' second-moment
matrix has its top eigenvalue ~1000x the mean one, so a 0.26 rad turn toward it multiplied the
next pre-activation std by 13 (0.69 → 9.3); through the depth the logits reached ~1e3 and the
run was NaN at step 3.

Two recipes set the length (`norm.recipe`; `init_filter_lengths` is the NormProp spec's build step):
- `filter_norm` (ours, the default): every filter that feeds a NormProp2d starts at the length
  `norm.filter_norm` = 10 with the model's init direction, then is left to SGD (weight decay moves
  the lengths toward the equilibrium that lr, momentum and decay set, as for BN). The same
  function with a direction step 100x smaller than at length 1, in effect a smaller lr for the
  filter directions: a deviation from "every method at lr 0.1", chosen because NormProp survives it.
- `arpit2016` (the NormProp paper's): filters of unit length, scaled back to unit length after
  every training iteration (the ICML 2016 rebuttal: "after every iteration", not epoch), so every
  step turns a filter by lr·|∇| (projected SGD on the sphere). Done here at the start of each
  training-mode forward, before any convolution runs: the gradient, the weight decay and
  momentum of the next step then see the unit filters, as after the update, and nothing is
  written in eval mode. At lr 0.1 it diverged on NIN and VGG-16 (tests/test_normprop.py), so it
  is an option, not the default.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from mbn import UserError
from mbn.norms.base import Normalizer
from mbn.norms.registry import NormConfig, NormSpec, fields, register
from mbn.validate import OneOf, key, positive

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
        scale = (self.weight / (self.const * self.filter_norms())).to(x.dtype)
        return x * scale.view(1, -1, 1, 1) + self.bias.to(x.dtype).view(1, -1, 1, 1)

    def filter_norms(self) -> torch.Tensor:
        """‖W_i‖ of the bound convolution's filters, (C,)."""
        return self._conv.weight.flatten(1).norm(dim=1).clamp_min(self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, const=1/{self.const}"


RECIPES = ("filter_norm", "arpit2016")


def init_filter_lengths(model: nn.Module, cfg) -> nn.Module:
    """Apply `norm.recipe` (module docstring): give every filter of a convolution bound to a
    NormProp2d its initial length, keeping its direction (the function the model computes is
    unchanged), and for `arpit2016` rescale the filters to unit length before every training
    forward. Run once, by mbn.build.make_model, before any checkpoint is loaded."""
    recipe = cfg.norm.get("recipe", "filter_norm")  # a run from before this key used filter_norm
    if recipe not in RECIPES:
        raise UserError(f"norm.recipe must be one of {', '.join(RECIPES)} (got {recipe!r}); "
                        "filter_norm is the default")
    layers = [m for m in model.modules() if isinstance(m, NormProp2d) and m._conv is not None]
    if recipe == "arpit2016":
        set_filter_lengths(layers, 1.0)

        def unit_filters(module, args):  # before any convolution of a training forward runs
            if module.training:
                set_filter_lengths(layers, 1.0)

        model.register_forward_pre_hook(unit_filters)
        return model
    length = cfg.norm.get("filter_norm")
    if length is None:  # a checkpoint from before this key: its weights are loaded over the model anyway
        return model
    if not length > 0:
        raise UserError(f"norm.filter_norm must be > 0 (got {length}); it is the initial length of every "
                        "filter feeding NormProp, the step size of its direction (default 10)")
    set_filter_lengths(layers, length)
    return model


@torch.no_grad()
def set_filter_lengths(layers, length: float) -> None:
    """Scale every filter of the convolutions bound to `layers` to the length `length`."""
    for m in layers:
        w = m._conv.weight
        w.mul_((length / m.filter_norms()).view(-1, *[1] * (w.dim() - 1)))


@dataclass
class NormPropConfig(NormConfig):
    """Normalization Propagation (Arpit et al. 2016); plain networks only (nin, vgg16)"""
    name: str = "normprop"
    const: float = key(1.21, "NormProp's constant (outputs are divided by it)", positive,
                       note="Arpit et al. 2016: γ starts at 1/1.21")
    eps: float = 1e-8
    filter_norm: float = key(10.0, "NormProp's initial filter length ‖W_i‖ (its direction's step size), "
                             "recipe=filter_norm only", positive, note="the default is 10")
    recipe: str = key("filter_norm", "how NormProp's filter lengths are set: filter_norm (start at "
                      "norm.filter_norm, then free) | arpit2016 (unit length after every iteration, the paper's)",
                      OneOf(list(RECIPES)), note="arpit2016 diverged at lr 0.1 on NIN and VGG-16")


register("normprop", NormSpec(NormProp2d, NormPropConfig, fields("const", "eps"), act_layer=NormPropReLU,
                              residual_ok=False, wrap_model=init_filter_lengths))
