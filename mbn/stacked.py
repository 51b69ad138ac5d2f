"""K seeds of one configuration trained in one process, as one network of grouped convolutions.

`stack(models)` turns K models of the same architecture (K initialisations, K seeds) into one
module that computes all K at once, exactly:

- every `nn.Conv2d(C_in, C_out, groups=g)` becomes `nn.Conv2d(K·C_in, K·C_out, groups=K·g)`, the
  K weights concatenated along the output channels, so model k's channels only ever see model
  k's channels;
- every `nn.Linear(I, O)` becomes `StackedLinear` (K independent matrices applied by one einsum);
- every per-channel normalizer over C channels becomes the same normalizer over K·C channels:
  its statistics are per channel, so they stay per model. The normalizers this holds for are
  listed in `PER_CHANNEL` with their per-channel tensors (BN, MBN, BRN); their other state —
  step counters, MBN's memory counts and ring position, λ, BRN's r_max/d_max — is the same in
  every model of one configuration (the values per channel are N·H·W for all of them) and is
  kept once. Normalizers whose statistics mix channels (GroupNorm), that look at the producing
  convolution's weights (CBN, MABN, NormProp) or that wrap the model (Revisiting-BN) are refused;
- the one place our models mix channels by hand, the CIFAR ResNet's option-A shortcut (zero
  channels padded on each side), pads each model's channels separately (`StackedBasicBlock`);
  ReLU, pooling, spatial means and flatten act per channel and stay as they are.

The input is the K models' batches concatenated along channels, (N, K·3, H, W) — each model its
own batch and data order — and the output is (N, K, classes). The loss is the sum over k of
each model's mean cross-entropy (`stacked_losses`), so model k's gradients are exactly its own;
SGD (momentum, weight decay, Nesterov) is elementwise, so one optimizer over the stacked
parameters is K optimizers. `unstack(stacked, k)` gives model k's state_dict, with the keys of
the unstacked model.

Why grouped convolutions rather than `torch.func` (stack_module_state + vmap): vmap does run our
normalizers' in-place buffer updates, but through slow per-model fallbacks (no batching rule for
`lerp_`), and functional_call under vmap under torch.compile under a CUDA graph is a stack of
less-trodden paths; vmap lowers a batched convolution to this same grouped convolution anyway.
Here the stacked network is an ordinary module of ordinary layers: the framework's compile,
bf16 autocast, channels_last and CUDA-graph step apply unchanged.

`StackedRun` builds what `scripts/bench.py` times: K seeds of one config (model k initialised as
`train.py seed=s_k` would, reading its own data order), stacked, with the device's perf settings.
"""
import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from mbn import UserError, norms
from mbn.build import autocast_for, make_model, make_optimizer, resolve_perf, set_schedule
from mbn.data import Batches, Split, make_loaders
from mbn.norms.bn import BatchNorm2d
from mbn.norms.brn import BatchRenorm2d
from mbn.norms.mbn import MemorizedBatchNorm2d
from mbn.step import TrainStep
from models.nin import NIN
from models.resnet_cifar import BasicBlock, CifarResNet
from models.vgg import VGG

_BN = {"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0}
# normalizers whose statistics are per channel, exactly these types (a subclass may compute
# differently): {state name: the dimension that indexes channels}
PER_CHANNEL = {
    BatchNorm2d: _BN,
    nn.BatchNorm2d: _BN,
    MemorizedBatchNorm2d: dict(_BN, **{"memory.mean": 1, "memory.var": 1}),
    BatchRenorm2d: {"weight": 0, "bias": 0, "running_mean": 0, "running_std": 0},
}
# modules whose forward treats every channel alike (or only calls its children, which are stacked)
AGNOSTIC = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Identity, nn.Flatten, nn.Sequential, CifarResNet, VGG, NIN)


class StackedLinear(nn.Module):
    """K independent `nn.Linear(I, O)` on (..., K·I) inputs: weight (K·O, I), bias (K·O), the
    K matrices concatenated along the output as the convolutions' are."""

    def __init__(self, k: int, in_features: int, out_features: int, weight: torch.Tensor, bias):
        super().__init__()
        self.k, self.in_features, self.out_features = k, in_features, out_features
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unflatten(-1, (self.k, self.in_features))
        y = torch.einsum("...ki,koi->...ko", x, self.weight.view(self.k, self.out_features, self.in_features))
        if self.bias is not None:
            y = y + self.bias.view(self.k, self.out_features)
        return y.flatten(-2)

    def extra_repr(self) -> str:
        return f"k={self.k}, in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


class StackedBasicBlock(BasicBlock):
    """The CIFAR ResNet block over K stacked models: the option-A shortcut pads each model's
    channels with zeros on both sides (the unstacked block pads the whole channel range)."""

    k: int = 1

    def shortcut(self, x):
        if self.stride == 1 and not self.extra:
            return x
        s = x[:, :, ::self.stride, ::self.stride]
        n, kc, h, w = s.shape
        s = F.pad(s.reshape(n, self.k, kc // self.k, h, w), (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        s = s.reshape(n, -1, h, w)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            s = s.contiguous(memory_format=torch.channels_last)
        return s


class Stacked(nn.Module):
    """K models as one: input (N, K·C, H, W), output (N, K, classes). `layout` maps every
    state_dict key of `net` to the dimension its K models are concatenated along (None: one
    value shared by all K)."""

    def __init__(self, net: nn.Module, k: int, layout: dict):
        super().__init__()
        self.net, self.k, self.layout = net, k, layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).unflatten(1, (self.k, -1))


def _state(module: nn.Module) -> dict:
    """Every parameter and buffer of a module (non-persistent buffers included), by name."""
    return {**dict(module.named_buffers()), **dict(module.named_parameters())}


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer `name` (dotted) of `module`, keeping its kind and persistence."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=owner._parameters[leaf].requires_grad)
    else:
        owner._buffers[leaf] = value


def _stack_conv(convs) -> nn.Conv2d:
    c, k = convs[0], len(convs)
    out = nn.Conv2d(k * c.in_channels, k * c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                    groups=k * c.groups, bias=c.bias is not None, padding_mode=c.padding_mode,
                    device=c.weight.device, dtype=c.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight for m in convs]))
        if c.bias is not None:
            out.bias.copy_(torch.cat([m.bias for m in convs]))
    return out


def _stack_linear(linears) -> StackedLinear:
    lin, k = linears[0], len(linears)
    with torch.no_grad():
        weight = torch.cat([m.weight for m in linears]).clone()
        bias = torch.cat([m.bias for m in linears]).clone() if lin.bias is not None else None
    return StackedLinear(k, lin.in_features, lin.out_features, weight, bias)


def _stack_norm(layers, where: str) -> nn.Module:
    """The normalizer over K·C channels: per-channel tensors concatenated, the rest kept once
    (after checking the K models agree on it)."""
    per_channel = PER_CHANNEL[type(layers[0])]
    out = copy.deepcopy(layers[0])
    states = [_state(m) for m in layers]
    for name, value in states[0].items():
        if name in per_channel:
            with torch.no_grad():
                _set_tensor(out, name, torch.cat([s[name] for s in states], per_channel[name]).clone())
        elif not all(torch.equal(value, s[name]) for s in states[1:]):
            raise UserError(f"cannot stack {where}: its {name!r} differs between the models and is not "
                            "per channel (the models must come from one configuration)")
    out.num_features = len(layers) * layers[0].num_features
    return out


def _refuse(module: nn.Module, where: str):
    what = type(module).__name__
    if isinstance(module, norms.Normalizer):
        why = ("its statistics are not per channel or it reads the producing convolution's weights, so K "
               "models side by side would not stay independent; stacking supports "
               + ", ".join(sorted({t.__name__ for t in PER_CHANNEL})))
    else:
        why = "its forward is not known to keep each model's channels apart"
    return UserError(f"cannot stack {where} ({what}): {why}")


def stack(models) -> Stacked:
    """One `Stacked` module computing the K given models (same architecture) at once."""
    models = list(models)
    k = len(models)
    if k < 1:
        raise UserError("stack() needs at least one model")
    ref = models[0]
    shapes = {n: t.shape for n, t in ref.state_dict().items()}
    for m in models[1:]:
        if type(m) is not type(ref) or {n: t.shape for n, t in m.state_dict().items()} != shapes:
            raise UserError("stack() needs models of one architecture (same modules, same shapes)")
    for name, module in ref.named_modules():  # the normalizer first: its reason is the one to give
        if isinstance(module, norms.Normalizer) and type(module) not in PER_CHANNEL:
            raise _refuse(module, f"module {name or '<root>'}")
    net = copy.deepcopy(ref)
    per_model = [dict(m.named_modules()) for m in models]
    replaced = []
    for name, module in list(net.named_modules()):
        if any(name.startswith(r + ".") for r in replaced):
            continue  # inside a layer stacked as a whole (MBN's memory)
        where = f"module {name or '<root>'}"
        same = [mods[name] for mods in per_model]
        if type(module) is nn.Conv2d:
            new = _stack_conv(same)
        elif type(module) is nn.Linear:
            new = _stack_linear(same)
        elif type(module) in PER_CHANNEL:
            new = _stack_norm(same, where)
        elif type(module) is BasicBlock:
            module.__class__ = StackedBasicBlock
            module.k = k
            continue
        elif type(module) in AGNOSTIC:
            continue
        else:
            raise _refuse(module, where)
        if not name:
            raise UserError(f"cannot stack a bare {type(module).__name__}; stack whole models")
        parent, _, leaf = name.rpartition(".")
        setattr(net.get_submodule(parent), leaf, new)
        replaced.append(name)
    norms.bind_convs(net)
    layout = {}
    for key, value in net.state_dict().items():
        orig = shapes[key]
        dims = [d for d in range(value.dim()) if value.shape[d] != orig[d]]
        assert len(dims) <= 1 and all(value.shape[d] == k * orig[d] for d in dims), key
        layout[key] = dims[0] if dims else None
    return Stacked(net, k, layout)


def unstack(stacked: Stacked, k: int) -> dict:
    """Model k's state_dict (keys as in the unstacked model), copied out of the stacked one."""
    out = {}
    for key, value in stacked.net.state_dict().items():
        dim = stacked.layout[key]
        if dim is None:
            out[key] = value.detach().clone()
        else:
            n = value.shape[dim] // stacked.k
            out[key] = value.detach().narrow(dim, k * n, n).clone()
    return out


def stack_inputs(xs) -> torch.Tensor:
    """K batches (N, C, H, W) -> the stacked input (N, K·C, H, W), in the first batch's memory format."""
    fmt = torch.channels_last if xs[0].dim() == 4 and xs[0].is_contiguous(memory_format=torch.channels_last) \
        and not xs[0].is_contiguous() else torch.contiguous_format
    return torch.cat(list(xs), 1).contiguous(memory_format=fmt)


def stacked_losses(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each model's mean cross-entropy, (K,), from the outputs (N, K, classes) and targets (N, K).
    Train on their sum: model k's gradients are then those of its own mean loss."""
    if out.dtype in (torch.float16, torch.bfloat16):
        out = out.float()
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(0)


class StackedBatches:
    """K batch sources served as one: the stacked input (N, K·C, H, W) and targets (N, K)."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.device = self.batches[0].device
        self.capturable = all(b.capturable for b in self.batches)

    def next_batch(self):
        xs, ys, valid = zip(*(b.next_batch() for b in self.batches))
        return stack_inputs(xs), torch.stack(ys, 1), torch.stack(valid, 1)


def stacked_step(model: Stacked, optimizer, batches, double_forward: bool, autocast=contextlib.nullcontext,
                 forward=None, graph: bool = False) -> TrainStep:
    """`mbn.step.TrainStep` for a stacked model fed by K batch sources (one per model): one SGD step
    of all K models; loss sums and error counts per model, shape (K,)."""
    if len(batches) != model.k:
        raise UserError(f"{model.k} stacked models need {model.k} batch sources, got {len(batches)}")
    return TrainStep(model, optimizer, StackedBatches(batches), double_forward, autocast, forward, graph,
                     loss_fn=stacked_losses, per_model=(model.k,))


class StackedRun:
    """K seeds of one configuration built as `mbn.engine.Run` builds one: model k initialised
    after `torch.manual_seed(seeds[k])` (as `train.py seed=<s>`), reading the training data in
    the order of seed `seeds[k]`; the device's perf settings (bf16, channels_last, compile, CUDA
    graph on a GPU); one SGD optimizer over the stacked parameters. Training only (no evaluator)."""

    def __init__(self, cfg, device, seeds):

        self.cfg, self.device, self.seeds = cfg, device, list(seeds)
        self.perf = resolve_perf(cfg.perf, device)
        self.autocast = autocast_for(self.perf, device)
        first, _ = make_loaders(cfg, device, channels_last=self.perf["channels_last"])
        split = Split(first.images, first.labels)
        self.train_batches = [Batches(split, cfg.train.batch_size, first.mean.view(-1), first.std.view(-1), device,
                                      True, first.augment, s, self.perf["channels_last"]) for s in self.seeds]
        singles = []
        for s in self.seeds:
            torch.manual_seed(s)
            singles.append(make_model(cfg))
        model = stack(singles).to(device)
        if self.perf["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = make_optimizer(cfg, model)
        self.forward = torch.compile(model, mode=self.perf["compile_mode"]) if self.perf["compile"] else model
        self.step = stacked_step(model, self.optimizer, self.train_batches, cfg.train.double_forward, self.autocast,
                                 self.forward, self.perf["cuda_graph"])
        self.scheduled = [m for m in norms.normalizers(model)
                          if type(m).set_progress is not norms.Normalizer.set_progress]
        self.per_epoch = len(self.train_batches[0])
        self.total_steps = cfg.train.steps or cfg.train.epochs * self.per_epoch
        self.num_epochs = math.ceil(self.total_steps / self.per_epoch)

    def start_epoch(self, epoch: int) -> None:
        for b in self.train_batches:
            b.start_epoch(epoch)

    def schedule(self, step: int) -> float:
        """The lr and the normalizers' scheduled values for `step`, as `Run.schedule`."""
        return set_schedule(self.cfg, self.optimizer, self.scheduled, step / self.total_steps)
