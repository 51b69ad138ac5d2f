"""Normalizer registry: config name -> (layer class, config schema, activation).

Adding a normalizer: write `mbn/norms/<name>.py` (an nn.Module taking `num_features` first),
add a config dataclass and one `register(...)` line below, and a `configs/norm/<name>.yaml`.
"""
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List

from torch import nn

from mbn import UserError
from mbn.norms.base import BatchStatNorm
from mbn.norms.bn import BatchNorm2d
from mbn.norms.brn import BatchRenorm2d
from mbn.norms.mbn import MemorizedBatchNorm2d
from mbn.norms.normprop import NormProp2d, NormPropReLU

__all__ = ["BatchStatNorm", "BatchNorm2d", "BatchRenorm2d", "MemorizedBatchNorm2d", "NormProp2d",
           "NormPropReLU", "build_norm", "build_act", "bind_convs", "NORMS", "register"]


# ---- config schemas (Hydra structured configs: unknown keys and wrong types are rejected) ----
@dataclass
class NormConfig:
    name: str = "bn"
    double_forward: bool = False  # the paper's default for this normalizer (train.double_forward)
    eps: float = 1e-5


@dataclass
class BNConfig(NormConfig):
    momentum: float = 0.1


@dataclass
class MBNConfig(NormConfig):
    name: str = "mbn"
    double_forward: bool = True
    memory_size: int = 10
    eta: float = 0.9
    lam: List[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    lam_milestones: List[float] = field(default_factory=lambda: [0.4, 0.6])
    momentum: float = 0.1           # for the BN-style running averages (eval_stats=running)
    eval_stats: str = "memory"      # memory (the paper's rule) | running


@dataclass
class BRNConfig(NormConfig):
    name: str = "brn"
    double_forward: bool = True
    momentum: float = 0.01
    r_max: float = 3.0
    d_max: float = 5.0
    relax_start: float = 0.064
    r_max_end: float = 0.512
    d_max_end: float = 0.32


@dataclass
class NormPropConfig(NormConfig):
    name: str = "normprop"
    const: float = 1.21
    eps: float = 1e-8


@dataclass(frozen=True)
class NormSpec:
    layer: Callable[..., nn.Module]
    config: type
    kwargs: Callable[[object], dict]          # config -> layer keyword arguments
    act_layer: Callable[[], nn.Module] = nn.ReLU
    residual_ok: bool = True                  # False: undefined on residual networks


NORMS: Dict[str, NormSpec] = {}


def register(name: str, spec: NormSpec) -> None:
    NORMS[name] = spec


def _fields(*names):
    return lambda c: {n: getattr(c, n) for n in names}


register("bn", NormSpec(BatchNorm2d, BNConfig, _fields("eps", "momentum")))
register("mbn", NormSpec(
    MemorizedBatchNorm2d, MBNConfig,
    lambda c: dict(memory_size=c.memory_size, eta=c.eta, eps=c.eps, momentum=c.momentum,
                   lam_values=list(c.lam), lam_milestones=list(c.lam_milestones), eval_stats=c.eval_stats)))
register("brn", NormSpec(BatchRenorm2d, BRNConfig,
                         _fields("eps", "momentum", "r_max", "d_max", "relax_start", "r_max_end", "d_max_end")))
register("normprop", NormSpec(NormProp2d, NormPropConfig, _fields("const", "eps"),
                              act_layer=NormPropReLU, residual_ok=False))


def get_spec(name: str) -> NormSpec:
    if name not in NORMS:
        raise UserError(f"unknown normalizer {name!r}; choose one of {sorted(NORMS)} (norm=<name>)")
    return NORMS[name]


def _as_config(cfg):
    """Accept a dataclass, a DictConfig or a plain dict."""
    if dataclasses.is_dataclass(cfg):
        return cfg
    spec = get_spec(cfg["name"])
    known = {f.name for f in dataclasses.fields(spec.config)}
    return spec.config(**{k: v for k, v in dict(cfg).items() if k in known})


def build_norm(cfg) -> Callable[[int], nn.Module]:
    """norm config -> norm_layer(num_features) -> nn.Module."""
    cfg = _as_config(cfg)
    spec = get_spec(cfg.name)
    spec.layer(8, **spec.kwargs(cfg))  # validate the hyper-parameters once, with a clear error
    return functools.partial(spec.layer, **spec.kwargs(cfg))


def build_act(cfg) -> Callable[[], nn.Module]:
    return get_spec(_as_config(cfg).name).act_layer


def bind_convs(model: nn.Module) -> None:
    """Hand every layer that normalizes through weights (has `bind_conv`) the convolution
    registered just before it. Models register conv then norm, so module order is enough."""
    last_conv = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            last_conv = m
        elif hasattr(m, "bind_conv"):
            m.bind_conv(last_conv)


def norm_layers(model: nn.Module):
    return [m for m in model.modules() if hasattr(m, "set_progress")]

