"""Cross-Iteration BN (mbn/norms/cbn.py) on the properties of seed-normalizers.md §1.13, in float64."""
import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mbn import UserError
from mbn.norms import bind_convs, precise_statistics, recording
from mbn.norms.cbn import CBNConv2d, CrossIterationBatchNorm2d
from mbn.step import train_step
from tests.conftest import TINY, make_cfg

CIN, C = 3, 4


pytestmark = pytest.mark.usefixtures("float64")  # every test here runs in float64


def net(window=4, burnin=0.0, groups=1, stride=1, dilation=1, seed=0, **kw):
    """CBNConv2d -> CBN, bound, with γ and β away from 1 and 0."""
    torch.manual_seed(seed)
    conv = CBNConv2d(CIN * groups, C * groups, 3, stride, dilation, dilation, groups, bias=False)
    norm = CrossIterationBatchNorm2d(C * groups, window=window, burnin=burnin, **kw)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, C * groups))
        norm.bias.copy_(torch.linspace(-1.0, 1.0, C * groups))
    model = nn.Sequential(conv, norm)
    bind_convs(model)
    return model.train()


def data(n=3, seed=0, shift=0.0, channels=CIN, size=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g) + shift


def batch_stats(x):
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)


def perturb(conv, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.weight.add_(scale * torch.randn(conv.weight.shape, generator=g))


def grads(model, u, g, norm=None):
    """Output and gradients w.r.t. the input, γ, β and the conv weight for the loss Σ y·g."""
    u = u.clone().requires_grad_()
    y = model(u)
    conv, norm = model[0], norm or model[1]
    return (y, *torch.autograd.grad(y, (u, norm.weight, norm.bias, conv.weight), g))


# ------------------------------------------------------------------ 1. k = 1 (and burn-in) ≡ BN
@pytest.mark.parametrize("window, burnin, progress", [(1, 0.0, 0.0), (4, 0.5, 0.2)])
def test_window_one_and_burnin_are_batch_norm(window, burnin, progress):
    """Outputs, gradients (input, γ, β, conv weight) and running statistics equal nn.BatchNorm2d's
    over several steps with changing weights; during burn-in nothing enters the window."""
    model = net(window, burnin)
    model[1].set_progress(progress)
    ref = nn.Sequential(copy.deepcopy(model[0]), nn.BatchNorm2d(C)).train()
    ref[1].load_state_dict({k: v for k, v in model[1].state_dict().items() if not k.startswith(("memory", "on"))})
    for step in range(4):
        u, g = data(seed=step, shift=step), data(seed=10 + step, channels=C)
        for a, b in zip(grads(model, u, g), grads(ref, u, g)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        perturb(model[0], step)
        perturb(ref[0], step)
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var, rtol=1e-12, atol=1e-12)
    assert model[1].num_batches_tracked == ref[1].num_batches_tracked == 4
    if window > 1:
        assert model[1].memory.filled == 0
    model.eval(), ref.eval()
    u = data(seed=99)
    torch.testing.assert_close(model(u), ref(u), rtol=1e-12, atol=1e-12)


def test_burnin_switch_then_window_grows_by_one_per_step():
    model = net(window=3, burnin=0.5)
    norm = model[1]
    for p in (0.0, 0.25, 0.49):
        norm.set_progress(p)
        model(data(seed=int(p * 100)))
    assert norm.memory.filled == 0 and norm.scheduled_values() == {"cbn_on": 0.0}
    norm.set_progress(0.5)
    assert norm.scheduled_values() == {"cbn_on": 1.0}
    for expected in (1, 2, 2, 2):
        model(data(seed=expected))
        assert norm.memory.filled == expected


# ------------------------------------------------------------------ 2. frozen weights ⇒ union
def test_frozen_weights_give_statistics_of_the_last_k_batches():
    """lr = 0: every compensation is 0 and the pooled μ̄, σ̄² are the mean and biased variance of
    the union of the last k equal-sized batches (fewer while the window fills); so is the output."""
    k = 3
    model = net(window=k)
    conv, norm = model
    outputs = []
    for t in range(5):
        u = data(seed=t, shift=0.5 * t)
        with torch.no_grad():
            x = conv(u)
            mu, var = norm.window_stats(*batch_stats(x))
            y = norm(x)  # records
        outputs.append(x)
        union = torch.cat(outputs[-k:]).transpose(0, 1).reshape(C, -1)
        torch.testing.assert_close(mu, union.mean(1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, union.var(1, unbiased=False), rtol=1e-12, atol=1e-12)
        expected = F.batch_norm(x, union.mean(1), union.var(1, unbiased=False), norm.weight, norm.bias, False,
                                0.0, norm.eps)
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ 3. Taylor exact for the first conv
GEOMETRIES = [dict(), dict(stride=2), dict(dilation=2), dict(groups=2)]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["plain", "stride", "dilation", "groups"])
def test_taylor_compensation_is_exact_for_the_mean_of_a_first_conv(geometry):
    """Input = data, bias-free conv: the compensated μ̃ of an old batch equals its mean at the new
    weights; ν̃ falls short of the true ⟨x²⟩ by exactly ⟨(ΔW ⊛ u_old)²⟩ (the second-order term)."""
    model = net(window=2, **geometry)
    conv, norm = model
    u_old = data(seed=1, shift=1.0, channels=conv.in_channels, size=7)
    with torch.no_grad():
        model(u_old)  # records u_old's entry at W_old
        w_old = conv.weight.clone()
        perturb(conv, 3, scale=0.3)
        mu, var = norm.compensated()
        slot = norm.memory.ages() == 0
        mu, nu = mu[slot][0], (var + mu * mu)[slot][0]
        x_new = conv(u_old)
        second_order = F.conv2d(u_old, conv.weight - w_old, None, conv.stride, conv.padding, conv.dilation,
                                conv.groups)
        conv.take_input()
    torch.testing.assert_close(mu, x_new.mean((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_new.pow(2).mean((0, 2, 3)) - nu, second_order.pow(2).mean((0, 2, 3)),
                               rtol=1e-10, atol=1e-12)


def test_rho_zero_is_naive_averaging():
    model = net(window=2, rho=0.0)
    conv, norm = model
    with torch.no_grad():
        x = conv(data(seed=1))
        norm(x)
        perturb(conv, 3, scale=0.3)
        mu, var = norm.compensated()
    slot = norm.memory.ages() == 0
    assert torch.equal(mu, norm.memory.mean) and torch.equal(var, norm.memory.var)
    torch.testing.assert_close(mu[slot][0], x.mean((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var[slot][0], x.var((0, 2, 3), unbiased=False), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ 5. Jacobians = autograd
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["plain", "stride", "dilation", "groups"])
def test_closed_form_jacobians_equal_autograd(geometry):
    conv, norm = net(window=2, **geometry)
    u = data(seed=2, shift=0.7, channels=conv.in_channels, size=7)
    x = conv(u)
    conv.take_input()
    mu, nu, var = x.mean((0, 2, 3)), x.pow(2).mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    d_mu, d_nu, d_var = (torch.autograd.grad(s.sum(), conv.weight, retain_graph=True)[0].flatten(1)
                         for s in (mu, nu, var))
    dmean, dvar = norm.jacobians(u, x, mu)
    g = conv.groups
    rows = dmean.repeat_interleave(conv.out_channels // g, 0)  # row c = Dμ of c's group
    torch.testing.assert_close(rows, d_mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dvar, d_var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dvar + 2 * mu.detach()[:, None] * rows, d_nu, rtol=1e-12, atol=1e-12)
    if g == 1:  # every filter of a group shares Dμ
        torch.testing.assert_close(d_mu, d_mu[:1].expand_as(d_mu), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ 4. gradients through the current batch only
def spec_reference(norm, x):
    """The spec's formulation in raw moments: μ̃ = μ + ⟨Dμ, ΔW⟩, ν̃ = ν + ⟨Dν, ΔW⟩ for stored entries
    (constants), μ̄ = mean μ̃, ν̄ = mean max(ν̃, μ̃²), σ̄² = ν̄ − μ̄², with the live batch differentiable."""
    mem, w = norm.memory, norm._conv.weight.detach().flatten(1)
    keep = mem.valid()
    mu_s, var_s = mem.mean[keep], mem.var[keep]
    dmu = mem.dmean[keep].expand(-1, C, -1)  # groups = 1: one Dμ row for every filter
    dnu = mem.dvar[keep] + 2 * mu_s[..., None] * dmu
    delta = w - mem.weight[keep]
    mu_t = mu_s + (dmu * delta).sum(-1)
    nu_t = var_s + mu_s ** 2 + (dnu * delta).sum(-1)
    mu_now, nu_now = x.mean((0, 2, 3)), x.pow(2).mean((0, 2, 3))
    mean = torch.cat([mu_t, mu_now[None]]).mean(0)
    nu_bar = torch.cat([torch.maximum(nu_t, mu_t ** 2), torch.maximum(nu_now, mu_now ** 2)[None]]).mean(0)
    shape = (1, -1, 1, 1)
    xhat = (x - mean.view(shape)) / torch.sqrt(nu_bar - mean ** 2 + norm.eps).view(shape)
    return xhat * norm.weight.view(shape) + norm.bias.view(shape)


def test_gradients_flow_through_the_current_batch_only():
    """After real SGD steps (so every stored entry needs compensation), output and gradients w.r.t.
    input, γ, β and the conv weight equal autograd through the spec's formulas with the stored
    entries as constants."""
    model = net(window=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for t in range(5):
        opt.zero_grad()
        (model(data(seed=t, shift=0.3 * t)) * data(seed=20 + t, channels=C)).sum().backward()
        opt.step()
    conv, norm = model
    assert norm.memory.filled == 3
    u, g = data(seed=50, shift=-0.4), data(seed=51, channels=C)
    with recording(model, False):
        ours = grads(model, u, g)

    class Reference(nn.Module):
        def forward(self, x):
            return spec_reference(norm, x)

    ref = grads(nn.Sequential(conv, Reference()), u, g, norm)
    conv.take_input()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ 6. variance guard and official mode
@pytest.mark.parametrize("official", [False, True])
def test_variance_guard_max_or_drop(official):
    """An entry whose compensated variance is negative in some channels: `max` uses ν̃ = μ̃² (ṽ = 0)
    there, the official drop rule leaves it out of that channel's pool (divisor k − 1)."""
    model = net(window=3, official=official)
    conv, norm = model
    with torch.no_grad():
        for t in range(2):
            model(data(seed=t, shift=t))
        norm.memory.var[norm.memory.ages() == 0] = torch.tensor([-1.0, 0.5, -0.1, 2.0])
        x = conv(data(seed=5))
        conv.take_input()
        mean, var = batch_stats(x)
        mu_s, var_s = norm.compensated()  # weights unchanged: the stored values
        newest = (norm.memory.ages() == 0).nonzero()[0, 0]
        got_mu, got_var = norm.window_stats(mean, var)
    means, variances = torch.cat([mu_s, mean[None]]), torch.cat([var_s, var[None]])
    keep = torch.ones_like(means, dtype=torch.bool)
    if official:
        keep[newest] = var_s[newest] >= 0
    else:
        variances = variances.clamp(min=0)
    for c in range(C):
        m, v = means[keep[:, c], c], variances[keep[:, c], c]
        torch.testing.assert_close(got_mu[c], m.mean(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_var[c], (v + (m - m.mean()) ** 2).mean(), rtol=1e-12, atol=1e-12)
    assert keep[:, 0].sum() == (2 if official else 3)


def test_official_conventions_on_the_batch_norm_path():
    """official=True, k = 1: (x − μ)/(sqrt(unbiased var) + ε) in training, (x − R_μ)/(sqrt(R_var) + ε)
    in inference."""
    model = net(window=1, official=True, eps=0.1)
    conv, norm = model
    x = conv(data(seed=3))
    y = norm(x)
    w, b, shape = norm.weight.view(1, -1, 1, 1), norm.bias.view(1, -1, 1, 1), (1, -1, 1, 1)
    std = x.var((0, 2, 3), unbiased=True).sqrt().view(shape)
    torch.testing.assert_close(y, (x - x.mean((0, 2, 3)).view(shape)) / (std + 0.1) * w + b, rtol=1e-12, atol=1e-12)
    norm.eval()
    expected = (x - norm.running_mean.view(shape)) / (norm.running_var.sqrt().view(shape) + 0.1) * w + b
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)


def test_official_running_averages_track_the_unbiased_batch_variance_through_burn_in():
    """§1.7: every training forward, burn-in or not, sets R_μ ← 0.9·R_μ + 0.1·μ_t and
    R_var ← 0.9·R_var + 0.1·(unbiased var of the current batch), uncompensated. Computed here from
    the conv output written out; during burn-in the output is (x − μ)/(sqrt(unbiased var) + ε).
    (Burn-in once applied n/(n − 1) twice: R_var drifted by 75/74 per step at n = 75.)"""
    model = net(window=3, burnin=0.5, official=True, eps=0.1)
    conv, norm = model
    r_mean, r_var, shape = torch.zeros(C), torch.ones(C), (1, -1, 1, 1)
    for step, progress in enumerate((0.0, 0.2, 0.4, 0.5, 0.7, 0.9)):
        norm.set_progress(progress)
        u = data(seed=step, shift=0.5 * step)
        x = F.conv2d(u, conv.weight, padding=1)
        mean = x.sum((0, 2, 3)) / (x.numel() / C)
        unbiased = ((x - mean.view(shape)) ** 2).sum((0, 2, 3)) / (x.numel() / C - 1)
        y = model(u)
        if progress < 0.5:
            w, b = norm.weight.view(shape), norm.bias.view(shape)
            expected = (x - mean.view(shape)) / (unbiased.sqrt().view(shape) + 0.1) * w + b
            torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
        r_mean, r_var = 0.9 * r_mean + 0.1 * mean, 0.9 * r_var + 0.1 * unbiased
        torch.testing.assert_close(norm.running_mean, r_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(norm.running_var, r_var, rtol=1e-12, atol=1e-12)
        perturb(conv, step, scale=0.2)
    assert norm.memory.filled == 2  # the window ran after burn-in


def test_bad_values_and_missing_conv():
    for kw in (dict(window=0), dict(window=2.5), dict(burnin=1.5), dict(rho=-1.0)):
        with pytest.raises(UserError):
            CrossIterationBatchNorm2d(C, **kw)
    import mbn.norms.cbn as cbn

    cbn._warned = False
    model = nn.Sequential(nn.Conv2d(CIN, C, 3, bias=False), CrossIterationBatchNorm2d(C, window=4))
    with pytest.warns(UserWarning, match="falls back to plain BN"):
        bind_convs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bind_convs(nn.Sequential(nn.Conv2d(CIN, C, 3), CrossIterationBatchNorm2d(C, window=4)))  # warned once
    assert model[1].memory is None and "as BN" in repr(model[1])
    ref = nn.Sequential(copy.deepcopy(model[0]), nn.BatchNorm2d(C).train())
    ref[1].load_state_dict({k: v for k, v in model[1].state_dict().items() if k != "on"})
    u = data(seed=4)
    torch.testing.assert_close(model(u), ref(u), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ double forward, record
def classifier(window=3, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(CBNConv2d(CIN, C, 3, padding=1, bias=False), CrossIterationBatchNorm2d(C, window, **kw),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(C, 3))
    bind_convs(model)
    return model.train()


@pytest.mark.parametrize("double_forward", [False, True])
def test_record_pushes_statistics_and_weights_of_the_right_step(double_forward):
    """Single forward: the training forward pushes the batch's μ, v, Dμ, Dv at W_t with snapshot W_t.
    Double forward: the main pass pushes nothing and leaves the running averages alone; the record
    pass pushes them at the updated weights W_{t+1} with snapshot W_{t+1}, and the running averages
    move once."""
    model = classifier()
    conv, norm = model[0], model[1]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    u, y = data(n=4, seed=1), torch.tensor([0, 1, 2, 0])
    before = conv.weight.detach().clone()
    with recording(model, False):
        model(u)
    assert norm.memory.filled == 0 and norm.num_batches_tracked == 0
    assert torch.equal(norm.running_mean, torch.zeros(C)) and conv.last_input is None
    train_step(model, opt, u, y, double_forward)
    after = conv.weight.detach()
    assert not torch.allclose(before, after)
    w = after if double_forward else before
    x = F.conv2d(u, w, padding=1)
    mean, var = batch_stats(x)
    mem = norm.memory
    slot = mem.ages() == 0
    assert mem.filled == 1 and norm.num_batches_tracked == 1
    torch.testing.assert_close(mem.mean[slot][0], mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mem.var[slot][0], var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mem.weight[slot][0], w.flatten(1), rtol=0, atol=0)
    dmean, dvar = norm.jacobians(u, x, mean)
    torch.testing.assert_close(mem.dmean[slot][0], dmean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mem.dvar[slot][0], dvar, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.running_mean, 0.1 * mean, rtol=1e-12, atol=1e-12)
    assert conv.last_input is None  # no input kept past the step


# ------------------------------------------------------------------ DDP: per-process statistics
def _ddp_worker(rank, port, queue):
    import torch.distributed as dist

    import mbn.norms.base as base

    torch.set_default_dtype(torch.float64)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)

    def no_sync(*args):
        raise AssertionError("CBN must not synchronise statistics")

    base.global_stats = no_sync
    model = classifier()
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    u = data(n=4, seed=rank)
    for _ in range(2):
        ddp(u).sum().backward()
    queue.put((rank, {k: v.numpy() for k, v in model[1].state_dict().items()}))
    dist.barrier()
    dist.destroy_process_group()


def test_statistics_are_never_synchronised(monkeypatch):
    """Under a process group, CBN computes statistics per process: the base class's synchronising
    `batch_stats` (which would call `global_stats`) is never used, in training or recording."""
    import mbn.norms.base as base

    def no_sync(*args):
        raise AssertionError("CBN must not synchronise statistics")

    monkeypatch.setattr(base, "distributed", lambda: True)
    monkeypatch.setattr(base, "global_stats", no_sync)
    model = classifier()
    with pytest.raises(AssertionError):  # the patch is live: the base class would synchronise
        model[1].batch_stats(data(channels=C))
    for double_forward in (False, True):
        train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), data(n=4), torch.tensor([0, 1, 2, 0]),
                   double_forward)
    assert model[1].memory.filled == 2


@pytest.mark.slow
def test_ddp_statistics_are_per_process():
    """2 gloo processes: each rank's memory and running averages are those of its own batches
    (a single process fed that rank's batches), with no synchronisation of statistics."""
    import torch.multiprocessing as mp

    from tests.test_scale import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank, state in results.items():
        model = classifier()
        u = data(n=4, seed=rank)
        for _ in range(2):
            model(u).sum().backward()
        for k, v in model[1].state_dict().items():
            torch.testing.assert_close(torch.from_numpy(state[k]), v, rtol=1e-12, atol=1e-14, msg=k)
    means = [torch.from_numpy(results[r]["running_mean"]) for r in (0, 1)]
    assert not torch.allclose(*means)  # the ranks saw different batches and kept them apart


# ------------------------------------------------------------------ torch.compile
def test_compiles_without_graph_breaks_record_on_and_off():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = classifier(window=3)
    with torch.no_grad():
        eager(data(n=4, seed=9))  # one entry in the window, so compensation is exercised
    perturb(eager[0], 1)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    u = data(n=4, seed=2)
    for record in (True, False):
        outs = []
        for model, fwd in ((eager, eager), (compiled_model, compiled)):
            with recording(model, record):
                out = fwd(u)
                out.sum().backward()
            with torch.no_grad(), recording(model, True):
                fwd(u)  # the record pass of double forward
            outs.append((out, model[0].weight.grad))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for (k, a), (_, b) in zip(eager.state_dict().items(), compiled_model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=k)
    assert compiled_model[0].last_input is None
    assert not torch._dynamo.utils.counters["graph_break"]


# ------------------------------------------------------------------ models, checkpoint, training
@pytest.mark.parametrize("name, size", [("resnet20", 16), ("vgg16", 32), ("nin", 16)])
def test_models_train_checkpoint_and_infer(name, size):
    """Every normalizer of the model is a bound CBN; single and double forward steps fill the window;
    a fresh model loaded from the state_dict reproduces training and inference outputs; PreciseBN runs."""
    torch.set_default_dtype(torch.float32)
    from mbn.build import make_model

    cfg = make_cfg([f"model={name}", "norm=cbn", "norm.burnin=0", "norm.window=2"])
    model = make_model(cfg).to(memory_format=torch.channels_last)
    layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert layers and all(m.memory is not None for m in layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 1])
    for double_forward in (False, True):
        train_step(model, opt, x, y, double_forward)
    assert all(m.memory.filled == 1 and m.num_batches_tracked == 2 for m in layers)
    fresh = make_model(cfg)
    fresh.load_state_dict(model.state_dict())
    with recording(model, False), recording(fresh, False):
        torch.testing.assert_close(fresh(x), model(x))
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))
    assert precise_statistics(fresh, [(x, y), (x.flip(0), y)])
    assert torch.isfinite(fresh(x)).all()


@pytest.mark.parametrize("double_forward", [False, True])
def test_fit_end_to_end(tmp_path, double_forward):
    torch.set_default_dtype(torch.float32)
    from eval import evaluate_checkpoint
    from mbn.engine import fit

    small = ["data.train_size=64", "train.batch_size=16", "data.test_size=32", "train.eval_batch_size=32"]
    cfg = make_cfg(TINY + small + ["norm=cbn", "train.epochs=1", "norm.burnin=0.25",
                                   f"train.double_forward={double_forward}"])
    summary = fit(cfg, str(tmp_path))
    assert summary["finished"] and summary["step"] == 4
    assert 0 <= summary["test_err"] <= 100 and "test_err_precise" in summary
    report = evaluate_checkpoint(str(tmp_path / "checkpoint.pt"), precise_batches=2)
    assert report["test_err"] == pytest.approx(summary["test_err"])
    assert "test_err_precise" in report
