"""Normalizers: one file each in this package, found and registered at import.

Adding a normalizer: write `mbn/norms/<name>.py` with a layer deriving from
`mbn.norms.base.Normalizer` (or `BatchStatNorm`), its config dataclass and one
`register("<name>", NormSpec(...))` line, plus `configs/norm/<name>.yaml`. Nothing else names it.
"""
import functools
import importlib
import pkgutil
from typing import Callable

from torch import nn

from mbn.norms.base import (BatchStatNorm, Normalizer, StatsMemory, combine_stats, inference_modes,  # noqa: F401
                            inference_stats, normalizers, precise_statistics, recording, scheduled_values,
                            set_progress, set_recording)
from mbn.norms.registry import NORMS, NormConfig, NormSpec, as_config, get_spec, register  # noqa: F401

__all__ = ["Normalizer", "BatchStatNorm", "StatsMemory", "combine_stats", "normalizers", "recording",
           "set_recording", "set_progress", "scheduled_values", "inference_modes", "inference_stats",
           "precise_statistics", "NORMS", "NormConfig", "NormSpec", "register", "get_spec", "build_norm",
           "build_act", "build_conv", "bind_convs", "param_groups", "BatchNorm2d", "BatchRenorm2d",
           "MemorizedBatchNorm2d", "NormProp2d", "NormPropReLU"]

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_info.name}")

from mbn.norms.bn import BatchNorm2d  # noqa: E402
from mbn.norms.brn import BatchRenorm2d  # noqa: E402
from mbn.norms.mbn import MemorizedBatchNorm2d  # noqa: E402
from mbn.norms.normprop import NormProp2d, NormPropReLU  # noqa: E402


def build_norm(cfg) -> Callable[[int], nn.Module]:
    """norm config -> norm_layer(num_features) -> nn.Module."""
    cfg = as_config(cfg)
    spec = get_spec(cfg.name)
    spec.layer(8, **spec.kwargs(cfg))  # validate the hyper-parameters once, with a clear error
    return functools.partial(spec.layer, **spec.kwargs(cfg))


def build_act(cfg) -> Callable[[], nn.Module]:
    return get_spec(as_config(cfg).name).act_layer


def build_conv(cfg) -> Callable[..., nn.Module]:
    return get_spec(as_config(cfg).name).conv_layer


def bind_convs(model: nn.Module) -> None:
    """Hand every normalizer the convolution registered just before it (models register conv
    then norm, so module order is enough)."""
    last_conv = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            last_conv = m
        elif isinstance(m, Normalizer):
            m.bind_conv(last_conv)


def param_groups(model: nn.Module, cfg) -> list:
    """Optimizer parameter groups for the configured normalizer (default: one group)."""
    cfg = as_config(cfg)
    spec = get_spec(cfg.name)
    if spec.param_groups is None:
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]
    return spec.param_groups(model, cfg)
