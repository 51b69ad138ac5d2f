"""The registry behind `norm=<name>`: each normalizer file registers its layer, its config schema
(a dataclass; Hydra rejects unknown keys and wrong types) and what else it needs from the model
builder — an activation, the convolution that feeds it, optimizer parameter groups."""
import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from torch import nn

from mbn import UserError
from mbn.config import NormConfig  # noqa: F401  (declared torch-free, with the other schemas)


@dataclass(frozen=True)
class NormSpec:
    layer: Callable[..., nn.Module]           # layer(num_features, **kwargs(config))
    config: type                              # the config dataclass
    kwargs: Callable[[object], dict]          # config -> layer keyword arguments
    act_layer: Callable[[], nn.Module] = nn.ReLU
    conv_layer: Callable[..., nn.Module] = nn.Conv2d  # builds every conv that feeds a normalizer
    residual_ok: bool = True                  # False: undefined on residual networks
    # (model, config) -> optimizer parameter groups, each {"params": [...], "lr_scale": s, ...
    # optional "weight_decay"}; None: one group with every parameter
    param_groups: Optional[Callable[[nn.Module, object], List[dict]]] = None
    # (model, config) -> model: wraps the built model (e.g. an input normalization layer)
    wrap_model: Optional[Callable[[nn.Module, object], nn.Module]] = None


NORMS: Dict[str, NormSpec] = {}


def register(name: str, spec: NormSpec) -> None:
    NORMS[name] = spec


def fields(*names):
    """A `kwargs` function passing these config fields through unchanged."""
    return lambda c: {n: getattr(c, n) for n in names}


def get_spec(name: str) -> NormSpec:
    if name not in NORMS:
        raise UserError(f"unknown normalizer {name!r}; choose one of {sorted(NORMS)} (norm=<name>)")
    return NORMS[name]


def as_config(cfg):
    """Accept a dataclass, a DictConfig or a plain dict."""
    if dataclasses.is_dataclass(cfg):
        return cfg
    spec = get_spec(cfg["name"])
    known = {f.name for f in dataclasses.fields(spec.config)}
    return spec.config(**{k: v for k, v in dict(cfg).items() if k in known})
