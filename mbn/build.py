"""Everything a run is built from, shared by train.py, eval.py and scripts/bench.py: device, seeds,
performance settings, the model with its normalizer, the optimizer."""
import contextlib
import os
import random

import numpy as np
import torch

import models
from mbn import UserError, norms
from mbn.schedules import step_lr


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def make_model(cfg) -> torch.nn.Module:
    """Model with the configured normalizer (its activation, the convolutions that feed it, and
    whatever wrapping it declares); normalizers bound to their producing convolutions."""
    name = cfg.model.name
    if name not in models.MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {sorted(models.MODELS)} (model=<name>)")
    spec = norms.get_spec(cfg.norm.name)
    model = models.build_model(name, cfg.data.num_classes, norms.build_norm(cfg.norm), norms.build_act(cfg.norm),
                               norms.build_conv(cfg.norm))
    if getattr(model, "residual", False) and not spec.residual_ok:
        raise UserError(f"norm={cfg.norm.name} is defined for plain networks only and {name} is residual "
                        "(the paper leaves these cells empty); use model=nin or model=vgg16, or another norm")
    norms.bind_convs(model)
    if spec.wrap_model is not None:
        model = spec.wrap_model(model, cfg)
    return model


def make_optimizer(cfg, model):
    """SGD over the normalizer's parameter groups; each group keeps an `lr_scale` that the lr
    schedule multiplies (see `set_lr`)."""
    if cfg.optim.name != "sgd":
        raise UserError(f"unknown optimizer {cfg.optim.name!r}; only optim=sgd is provided")
    o = cfg.optim
    groups = norms.param_groups(model, cfg.norm)
    for g in groups:
        g.setdefault("lr_scale", 1.0)
        g["lr"] = o.lr * g["lr_scale"]
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def set_schedule(cfg, optimizer, layers, progress: float) -> float:
    """The lr and the normalizers' scheduled values (λ, r_max, ...) at `progress` (the fraction of
    training done); returns the lr."""
    lr = step_lr(cfg.optim.lr, cfg.schedule.milestones, cfg.schedule.gamma, progress)
    set_lr(optimizer, lr)
    norms.set_progress(layers, progress)
    return lr


def resolve_perf(perf, device) -> dict:
    """Fill the `auto` (null) performance settings for the device: fast on GPU, exact on CPU."""
    gpu = device.type == "cuda"
    precision = perf.precision if perf.precision != "auto" else ("bf16" if gpu else "fp32")
    if precision not in ("fp32", "bf16"):
        raise UserError(f"perf.precision must be auto, fp32 or bf16, got {perf.precision!r}")
    cuda_graph = perf.get("cuda_graph")
    if cuda_graph and not gpu:
        raise UserError("perf.cuda_graph=true needs a CUDA device; leave it unset (auto) on a CPU")
    cuda_graph = gpu if cuda_graph is None else cuda_graph
    if cuda_graph and perf.compile_mode == "reduce-overhead":
        raise UserError("perf.compile_mode=reduce-overhead makes CUDA graphs of its own, inside the whole-step "
                        "graph; use perf.compile_mode=default (the step is captured already) or perf.cuda_graph=false")
    return {"precision": precision,
            "channels_last": gpu if perf.channels_last is None else perf.channels_last,
            "compile": gpu if perf.compile is None else perf.compile,
            "compile_mode": perf.compile_mode,
            "cuda_graph": cuda_graph}


def autocast_for(perf: dict, device):
    """A context factory: bf16 autocast (its weight-cast cache off, so a CUDA graph can capture it)
    or nothing."""
    if perf["precision"] == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext
