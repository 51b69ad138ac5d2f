"""The normalizers against closed forms and against PyTorch's own ops, in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from mbn import UserError
from mbn.norms import (BatchNorm2d, BatchRenorm2d, MemorizedBatchNorm2d, NormProp2d, NormPropReLU,
                       bind_convs, build_norm)
from mbn.norms.base import combine_stats

C = 5


pytestmark = pytest.mark.usefixtures("float64")  # every test here runs in float64


def batch(n=6, h=3, w=4, seed=0, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, h, w, generator=g) * scale + shift


def stats(x):
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False), x.numel() // x.size(1)


def mbn(k=4, lam=0.5, eta=0.9, **kw):
    m = MemorizedBatchNorm2d(C, memory_size=k, eta=eta, lam=lam, **kw).double()
    if not m.affine:
        return m
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 2.0, C))
        m.bias.copy_(torch.linspace(-1.0, 1.0, C))
    return m


def fill_memory(m, count, seed=100):
    """Record `count` batches of different sizes, means and scales."""
    xs = [batch(n=3 + i, seed=seed + i, shift=0.3 * i, scale=1 + 0.2 * i) for i in range(count)]
    for x in xs:
        m.push(*stats(x))
    return xs


# ------------------------------------------------------------------------------ MBN
def assert_equals_batch_norm(m, x, g, rtol, atol):
    """Training output and gradients w.r.t. input, γ and β equal F.batch_norm's."""
    x = x.requires_grad_()
    y = m(x)
    ours = (y, *torch.autograd.grad(y, (x, m.weight, m.bias), g))
    x2 = x.detach().clone().requires_grad_()
    w2, b2 = m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_()
    y2 = F.batch_norm(x2, None, None, w2, b2, training=True, eps=m.eps)
    ref = (y2, *torch.autograd.grad(y2, (x2, w2, b2), g))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_lambda_zero_is_batch_norm_outputs_and_gradients():
    m = mbn(lam=0.0)
    fill_memory(m, 3)  # memory content must not matter when λ = 0
    assert_equals_batch_norm(m, batch(seed=1, shift=2.0), batch(seed=2), 1e-12, 1e-12)


def test_lambda_eta_one_equals_statistics_of_concatenated_batches():
    """Eq. 6 with α = 1 everywhere is eq. 5 on the pooled data (batches of different sizes)."""
    m = mbn(k=4, lam=1.0, eta=1.0)
    xs = fill_memory(m, 3)
    x = batch(n=5, seed=7, shift=-1.0)
    mu_hat, var_hat = m.memorized_stats(*stats(x))
    pooled = torch.cat([t.transpose(0, 1).reshape(C, -1) for t in xs + [x]], dim=1)
    torch.testing.assert_close(mu_hat, pooled.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var_hat, pooled.var(1, unbiased=False), rtol=1e-12, atol=1e-12)
    m.train()
    expected = (x - mu_hat.view(1, C, 1, 1)) / torch.sqrt(var_hat.view(1, C, 1, 1) + m.eps)
    expected = expected * m.weight.view(1, C, 1, 1) + m.bias.view(1, C, 1, 1)
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-12)


def test_weights_follow_eq_8():
    """α_i = λ·η^(k-i): the most recent slot gets λ, each older one a further factor η."""
    lam, eta, k = 0.7, 0.8, 4
    m = mbn(k=k, lam=lam, eta=eta)
    xs = fill_memory(m, 6)  # wraps around the ring
    x = batch(seed=9)
    mean, var, n = stats(x)
    recent = xs[-k:]  # oldest first
    groups = [stats(t) for t in recent] + [(mean, var, n)]
    alphas = [lam * eta ** (k - 1 - i) for i in range(k)] + [1.0]
    weights = torch.tensor([a * s[2] for a, s in zip(alphas, groups)])
    mu = sum(w * s[0] for w, s in zip(weights, groups)) / weights.sum()
    var_ = sum(w * (s[1] + (s[0] - mu) ** 2) for w, s in zip(weights, groups)) / weights.sum()
    got_mu, got_var = m.memorized_stats(mean, var, n)
    torch.testing.assert_close(got_mu, mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_var, var_, rtol=1e-12, atol=1e-12)


def test_gradcheck_with_partly_filled_memory():
    m = mbn(k=5, lam=0.6, eta=0.9)
    fill_memory(m, 2)
    m.record = False  # gradcheck calls forward many times; the memory must not move
    x = batch(n=3, h=2, w=2, seed=3, shift=0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: _mbn_functional(m, x, w, b), (x, m.weight, m.bias))


def _mbn_functional(m, x, w, b):
    mean, var, n = m.batch_stats(x)
    mu_hat, var_hat = m.memorized_stats(mean, var, n)
    shape = (1, C, 1, 1)
    return (x - mu_hat.view(shape)) / torch.sqrt(var_hat.view(shape) + m.eps) * w.view(shape) + b.view(shape)


def test_module_gradcheck_directly():
    m = mbn(k=3, lam=0.9, eta=0.9)
    fill_memory(m, 2)
    m.record = False
    x = batch(n=2, h=2, w=3, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(m, (x,))


def test_paper_closed_form_backward_equals_autograd():
    """The backward equations of the paper, written out (with its typos fixed: the first line is
    ∂ℓ/∂x̂, ∂ℓ/∂σ̂² uses x_{k+1}, and ∂ℓ/∂γ sums ∂ℓ/∂y·x̂)."""
    m = mbn(k=4, lam=0.5, eta=0.9)
    fill_memory(m, 3)
    m.record = False
    x = batch(n=4, seed=5, shift=1.0).requires_grad_()
    g = batch(n=4, seed=6)
    y = m(x)
    gx, gw, gb = torch.autograd.grad(y, (x, m.weight, m.bias), g)

    with torch.no_grad():
        mean, var, n = stats(x)
        weights = torch.cat([m.memory_weights(), torch.tensor([float(n)])])  # α_i·n_i
        means = torch.cat([m.memory.mean, mean[None]])
        mu, s2 = combine_stats(means, torch.cat([m.memory.var, var[None]]), weights)
        W = weights.sum()
        v = lambda t: t.view(1, C, 1, 1)  # noqa: E731
        inv = 1 / torch.sqrt(s2 + m.eps)
        xhat = (x - v(mu)) * v(inv)
        dxhat = g * v(m.weight)
        dvar = -0.5 * (dxhat * (x - v(mu))).sum((0, 2, 3)) * (s2 + m.eps) ** -1.5
        dmu = (dxhat * -v(inv)).sum((0, 2, 3)) - 2 * dvar * (weights @ (means - mu)) / W
        dx = dxhat * v(inv) + v(dvar) * 2 * (x - v(mu)) / W + v(dmu) / W
        dgamma = (g * xhat).sum((0, 2, 3))
        dbeta = g.sum((0, 2, 3))
    for a, b in ((gx, dx), (gw, dgamma), (gb, dbeta)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("affine,newest_weight", [(True, "lam"), (False, "lam"), (True, "one")])
def test_written_out_backward_equals_autograd_through_eq_6(affine, newest_weight):
    """The single-process path (`PooledBatchNorm`, backward in closed form) against autograd
    through batch statistics and eq. 6 (the path DDP takes): output, gradients, recorded state."""
    m = mbn(k=4, lam=0.6, eta=0.8, affine=affine, newest_weight=newest_weight)
    fill_memory(m, 6)
    ref = mbn(k=4, lam=0.6, eta=0.8, affine=affine, newest_weight=newest_weight)
    ref.load_state_dict(m.state_dict())
    x = batch(n=5, seed=11, shift=3.0, scale=2.0).requires_grad_()
    g = batch(n=5, seed=12)
    params = [x] + ([m.weight, m.bias] if affine else [])
    got = m(x)
    got_grads = torch.autograd.grad(got, params, g)
    mean, var, n = ref.batch_stats(x)
    want = ref.affine_apply(x, *ref.memorized_stats(mean, var, n))
    want_grads = torch.autograd.grad(want, [x] + ([ref.weight, ref.bias] if affine else []), g)
    ref.push(mean.detach(), var.detach(), n)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for (name, a), b in zip(m.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_no_gradient_into_memory():
    m = mbn()
    fill_memory(m, 2)
    x = batch().requires_grad_()
    m(x).sum().backward()
    for name, buf in m.named_buffers():
        assert not buf.requires_grad and buf.grad is None, name


def test_ring_buffer_holds_exactly_the_last_k_batches():
    k = 4
    m = mbn(k=k)
    xs = fill_memory(m, k + 3)
    assert int(m.memory.filled) == k
    ages = m.memory.ages()
    for i, x in enumerate(xs[-k:]):
        mean, var, n = stats(x)
        age = k - 1 - i
        slot = int((ages == age).nonzero())
        torch.testing.assert_close(m.memory.mean[slot], mean, rtol=0, atol=0)
        torch.testing.assert_close(m.memory.var[slot], var, rtol=0, atol=0)
        assert m.memory.count[slot] == n
    kept = {tuple(r.tolist()) for r in m.memory.mean}
    for x in xs[:-k]:
        assert tuple(stats(x)[0].tolist()) not in kept


def test_training_forward_records_only_when_asked():
    m = mbn()
    x = batch()
    m.record = False
    m(x)
    assert int(m.memory.filled) == 0 and int(m.num_batches_tracked) == 0
    m.record = True
    m(x)
    assert int(m.memory.filled) == 1
    torch.testing.assert_close(m.memory.mean[0], stats(x)[0])


def test_train_and_inference_share_one_rule():
    """With weights that do not change, after recording a batch several times the eval-mode
    output on that batch equals the train-mode output."""
    m = mbn(k=5, lam=0.5)
    x = batch(seed=11, shift=3.0, scale=2.0)
    for _ in range(3):
        m(x)
    m.record = False
    y_train = m(x)
    m.eval()
    torch.testing.assert_close(m(x), y_train, rtol=1e-12, atol=1e-12)


def test_inference_uses_newest_batch_as_current():
    lam, eta, k = 0.5, 0.9, 4
    m = mbn(k=k, lam=lam, eta=eta)
    xs = fill_memory(m, 3)
    groups = [stats(t) for t in xs]  # oldest first; the newest plays the current batch
    alphas = [lam * eta ** (len(xs) - 2 - i) for i in range(len(xs) - 1)] + [1.0]
    weights = torch.tensor([a * s[2] for a, s in zip(alphas, groups)])
    mu, var = combine_stats(torch.stack([s[0] for s in groups]), torch.stack([s[1] for s in groups]), weights)
    got_mu, got_var = m.memorized_stats()
    torch.testing.assert_close(got_mu, mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_var, var, rtol=1e-12, atol=1e-12)


def test_inference_before_any_record_uses_running_stats():
    m = mbn().eval()
    x = batch()
    ref = F.batch_norm(x, torch.zeros(C), torch.ones(C), m.weight, m.bias, False, 0.0, m.eps)
    torch.testing.assert_close(m(x), ref)


def test_eval_stats_running_matches_batchnorm_running_averages():
    m = mbn(momentum=0.1)
    bn = torch.nn.BatchNorm2d(C, momentum=0.1).double()
    for i in range(3):
        x = batch(seed=20 + i, shift=i)
        m(x)
        bn(x)
    torch.testing.assert_close(m.running_mean, bn.running_mean)
    torch.testing.assert_close(m.running_var, bn.running_var)
    m.set_inference("running")
    m.eval()
    bn.eval()
    with torch.no_grad():
        bn.weight.copy_(m.weight)
        bn.bias.copy_(m.bias)
    torch.testing.assert_close(m(batch(seed=30)), bn(batch(seed=30)))


def test_lambda_schedule_is_a_tensor_following_the_paper():
    m = MemorizedBatchNorm2d(C, lam_values=[0.1, 0.5, 0.9], lam_milestones=[0.4, 0.6])
    assert isinstance(m.lam, torch.Tensor) and "lam" in dict(m.named_buffers())
    for p, expected in ((0.0, 0.1), (0.399, 0.1), (0.4, 0.5), (0.59, 0.5), (0.6, 0.9), (0.99, 0.9)):
        m.set_progress(p)
        assert m.lam.item() == pytest.approx(expected)


def test_state_dict_round_trip_reproduces_outputs_memory_included():
    m = mbn(k=4)
    fill_memory(m, 6)
    m.set_progress(0.5)
    m2 = mbn(k=4)
    m2.load_state_dict(m.state_dict())
    x = batch(seed=40)
    for mode in ("eval", "train"):
        getattr(m, mode)()
        getattr(m2, mode)()
        m.record = m2.record = False
        assert torch.equal(m(x), m2(x)), mode


def test_float32_module_keeps_float32_and_bf16_input_keeps_fp32_stats():
    m = MemorizedBatchNorm2d(C).float()
    x = torch.randn(4, C, 3, 3, dtype=torch.float32)
    assert m(x).dtype == torch.float32
    y = m(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and m.memory.mean.dtype == torch.float32


# ------------------------------------------------------------------------------ BN / BRN
def test_our_bn_equals_pytorch_bn_and_records_only_when_asked():
    ours, ref = BatchNorm2d(C).double(), torch.nn.BatchNorm2d(C).double()
    x = batch(shift=1.0)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=0, atol=0)
    ours.record = False
    before = ours.running_mean.clone()
    ours(batch(seed=3))
    assert torch.equal(ours.running_mean, before)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


def brn(**kw):
    m = BatchRenorm2d(C, **kw).double()
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 2.0, C))
        m.bias.copy_(torch.linspace(-1.0, 1.0, C))
    return m


def test_brn_with_rmax_1_dmax_0_is_batch_norm():
    m = brn()
    with torch.no_grad():
        m.running_mean.fill_(3.0)
        m.running_std.fill_(0.2)
    m.set_progress(0.0)
    assert m.r_max.item() == 1.0 and m.d_max.item() == 0.0
    assert_equals_batch_norm(m, batch(shift=1.0), batch(seed=9), 1e-10, 1e-12)


def test_brn_no_gradient_through_r_and_d():
    """With r and d active and constant for backprop, BRN is BN with weight γ·r and bias γ·d + β."""
    m = brn(r_max=3.0, d_max=5.0)
    with torch.no_grad():
        m.running_mean.copy_(torch.linspace(-0.5, 0.5, C))
        m.running_std.copy_(torch.linspace(0.5, 1.5, C))
    m.r_max.fill_(1.5)
    m.d_max.fill_(0.3)
    m.record = False
    x = batch(shift=0.2, scale=1.3).requires_grad_()
    g = batch(seed=8)
    y = m(x)
    gx, = torch.autograd.grad(y, x, g)
    with torch.no_grad():
        mean, var, _ = stats(x)
        std = torch.sqrt(var + m.eps)
        r = (std / m.running_std).clamp(1 / 1.5, 1.5)
        d = ((mean - m.running_mean) / m.running_std).clamp(-0.3, 0.3)
    assert (r != 1).any() and (d != 0).any() and (r == 1.5).any() and (d.abs() == 0.3).any()
    x2 = x.detach().clone().requires_grad_()
    y2 = F.batch_norm(x2, None, None, m.weight.detach() * r, m.weight.detach() * d + m.bias.detach(), True, 0.0, m.eps)
    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx, torch.autograd.grad(y2, x2, g)[0], rtol=1e-10, atol=1e-12)


def test_brn_moving_averages_and_inference():
    m = brn(momentum=0.01)
    x = batch(shift=2.0)
    m(x)
    mean, var, _ = stats(x)
    torch.testing.assert_close(m.running_mean, 0.01 * mean)
    torch.testing.assert_close(m.running_std, 0.99 + 0.01 * torch.sqrt(var + m.eps))
    m.eval()
    v = lambda t: t.view(1, C, 1, 1)  # noqa: E731
    expected = (x - v(m.running_mean)) / v(m.running_std) * v(m.weight) + v(m.bias)
    torch.testing.assert_close(m(x), expected)


def test_brn_relaxation_schedule():
    m = BatchRenorm2d(C, r_max=3, d_max=5, relax_start=0.1, r_max_end=0.5, d_max_end=0.3)
    m.set_progress(0.05)
    assert (m.r_max.item(), m.d_max.item()) == (1.0, 0.0)
    m.set_progress(0.3)
    assert m.r_max.item() == pytest.approx(2.0) and m.d_max.item() == pytest.approx(5.0)
    m.set_progress(0.9)
    assert (m.r_max.item(), m.d_max.item()) == (3.0, 5.0)


# ------------------------------------------------------------------------------ NormProp
def test_normprop_preactivation_is_standardized_at_init():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, bias=False), NormProp2d(32, const=1.0))
    bind_convs(net)
    x = torch.randn(512, 16, 9, 9)
    with torch.no_grad():
        y = net(x)
    mean, std = y.mean((0, 2, 3)), y.std((0, 2, 3))
    assert mean.abs().max() < 0.02 and (std - 1).abs().max() < 0.02
    net[1].const = 1.21  # the paper divides the standardized response by its constant
    with torch.no_grad():
        assert (net(x).std((0, 2, 3)) - 1 / 1.21).abs().max() < 0.03


@pytest.mark.parametrize("model", ["vgg16", "nin"])
def test_normprop_activations_stay_order_one_through_deep_plain_networks(model):
    """At initialization every NormProp ReLU's output keeps an RMS of order 1 from the first layer
    to the last (multiplying by 1.21 instead of dividing grew it ~40x through VGG-16)."""
    from mbn.build import make_model
    from tests.conftest import make_cfg

    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    net = make_model(make_cfg([f"model={model}", "norm=normprop"]))
    rms = []
    for m in net.modules():
        if isinstance(m, NormPropReLU):
            m.register_forward_hook(lambda mod, i, o: rms.append(o.pow(2).mean().sqrt().item()))
    with torch.no_grad():
        logits = net(torch.randn(32, 3, 32, 32))
    assert len(rms) >= 8
    assert all(0.5 < r < 2.0 for r in rms), rms
    assert logits.std() < 5


def test_normprop_relu_recentres_and_rescales():
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0))
    out = NormPropReLU()(z)
    assert abs(out.mean().item()) < 3e-3 and abs(out.std().item() - 1) < 3e-3


def test_normprop_gradient_flows_through_the_filter_norm():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), NormProp2d(4))
    bind_convs(net)
    x = torch.randn(2, 3, 5, 5)
    w = net[0].weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda w: _normprop_functional(net, x, w), (w,))
    # the layer's own gradient w.r.t. the conv weight equals the functional one
    g = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(torch.autograd.grad(net(x), net[0].weight, g)[0],
                               torch.autograd.grad(_normprop_functional(net, x, w), w, g)[0])
    # scaling a filter leaves the output unchanged (the whole point)
    with torch.no_grad():
        y = net(x)
        net[0].weight.mul_(7.0)
        torch.testing.assert_close(net(x), y)


def _normprop_functional(net, x, w):
    norm = w.flatten(1).norm(dim=1)
    n = net[1]
    return F.conv2d(x, w) * (n.weight / (n.const * norm)).view(1, -1, 1, 1) + n.bias.view(1, -1, 1, 1)


# ------------------------------------------------------------------------------ errors, registry
def test_memory_size_below_one_is_a_clear_error():
    with pytest.raises(UserError, match="memory_size"):
        MemorizedBatchNorm2d(C, memory_size=0)
    with pytest.raises(UserError, match="memory_size"):
        build_norm({"name": "mbn", "memory_size": 0})


@pytest.mark.parametrize("layer", [MemorizedBatchNorm2d, BatchNorm2d, BatchRenorm2d])
def test_single_value_per_channel_in_training_is_a_clear_error(layer):
    with pytest.raises(UserError, match="single value per channel"):
        layer(C)(torch.randn(1, C, 1, 1))
    layer(C).eval()(torch.randn(1, C, 1, 1))  # inference on one value is fine


def test_unknown_norm_is_a_clear_error():
    with pytest.raises(UserError, match="unknown normalizer 'foo'"):
        build_norm({"name": "foo"})


@pytest.mark.parametrize("name", ["bn", "brn", "mbn", "normprop"])
def test_registry_builds_every_normalizer(name):
    layer = build_norm({"name": name})(16)
    assert layer.num_features == 16
    assert math.isfinite(sum(p.sum().item() for p in layer.parameters()))


# ------------------------------------------------------------------ MBN ablation options
def test_lambda_zero_throughout_infers_with_running_averages_like_batch_norm():
    """λ = 0 is BN (the paper): in training (above) and in inference, where the running averages
    are used, equal to our BatchNorm2d fed the same recorded batches."""
    m, bn = mbn(lam=0.0), BatchNorm2d(C).double()
    with torch.no_grad():
        bn.weight.copy_(m.weight)
        bn.bias.copy_(m.bias)
    assert m.inference == "running" and mbn(lam=0.5).inference == "memory"
    for i in range(4):
        x = batch(seed=20 + i, shift=0.5 * i)
        m(x), bn(x)
    m.eval(), bn.eval()
    x = batch(seed=30)
    torch.testing.assert_close(m(x), bn(x), rtol=1e-12, atol=1e-12)
    assert mbn(lam_values=[0.0, 0.5], lam_milestones=[0.5]).inference == "memory"  # not λ = 0 throughout


def test_newest_weight_one_with_lambda_zero_pools_the_current_batch_with_the_newest_slot():
    m = mbn(k=4, lam=0.0, newest_weight="one")
    xs = fill_memory(m, 3)
    x = batch(n=5, seed=8, shift=1.0)
    mu_hat, var_hat = m.memorized_stats(*stats(x))
    pooled = torch.cat([t.transpose(0, 1).reshape(C, -1) for t in (xs[-1], x)], dim=1)
    torch.testing.assert_close(mu_hat, pooled.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var_hat, pooled.var(1, unbiased=False), rtol=1e-12, atol=1e-12)
    # older slots keep eq. 8's λ·η^age (with λ = 0.5 the weights are 1, 0.5·0.9, 0.5·0.81 by age)
    m2 = mbn(k=4, lam=0.5, eta=0.9, newest_weight="one")
    fill_memory(m2, 3)
    ages = m2.memory.ages()
    expected = torch.where(ages == 0, 1.0, 0.5 * 0.9 ** ages.double()) * m2.memory.count
    torch.testing.assert_close(m2.memory_weights(), expected)


def test_renorm_gradient_path_has_the_same_forward_and_batch_norms_gradient_times_r():
    """grad=renorm: the forward equals the paper's (normalized by μ̂, σ̂²); the input gradient is
    BN's batch gradient scaled by r = σ_B/σ̂ (μ̂, σ̂ enter as constants)."""
    paper, renorm = mbn(k=3, lam=0.7), mbn(k=3, lam=0.7, grad="renorm")
    for m in (paper, renorm):
        fill_memory(m, 3)
    x, g = batch(seed=3, shift=0.4), batch(seed=4)
    mean, var, n = stats(x)
    mu_hat, var_hat = paper.memorized_stats(mean, var, n)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = paper(xa), renorm(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-12, atol=1e-12)
    (gx,) = torch.autograd.grad(yb, xb, g)
    x2 = x.clone().requires_grad_()
    y_bn = F.batch_norm(x2, None, None, renorm.weight.detach(), None, training=True, eps=renorm.eps)
    (g_bn,) = torch.autograd.grad(y_bn, x2, g)
    r = torch.sqrt(var + renorm.eps) / torch.sqrt(var_hat + renorm.eps)
    torch.testing.assert_close(gx, g_bn * r.view(1, C, 1, 1), rtol=1e-10, atol=1e-12)
    (ga,) = torch.autograd.grad(ya, xa, g)
    assert not torch.allclose(ga, gx)  # the paper's path differs


@pytest.mark.parametrize("layer", ["bn", "mbn", "brn"])
def test_precise_statistics_of_a_frozen_network_are_those_of_the_concatenated_batches(layer):
    """PreciseBN on a normalizer fed fixed batches of different sizes: the population mean and
    biased variance of their union, whatever the EMA held; parameters and memory untouched."""
    from mbn.norms import precise_statistics

    m = {"bn": lambda: BatchNorm2d(C), "mbn": lambda: mbn(k=3), "brn": lambda: BatchRenorm2d(C)}[layer]().double()
    fill = [batch(n=4, seed=50)]
    for x in fill:
        m(x)
    before = {k: v.clone() for k, v in m.state_dict().items() if "memory" in k}
    xs = [batch(n=3 + i, seed=60 + i, shift=0.3 * i, scale=1 + 0.1 * i) for i in range(4)]
    m.eval()
    assert precise_statistics(m, [(x, None) for x in xs])
    pooled = torch.cat([t.transpose(0, 1).reshape(C, -1) for t in xs], dim=1)
    mean, var = pooled.mean(1), pooled.var(1, unbiased=False)
    torch.testing.assert_close(m.running_mean, mean, rtol=1e-12, atol=1e-12)
    if layer == "brn":
        torch.testing.assert_close(m.running_std, torch.sqrt(var + m.eps), rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(m.running_var, var, rtol=1e-12, atol=1e-12)
    assert m.inference == "running" and not m.training
    for k, v in before.items():
        assert torch.equal(m.state_dict()[k], v), k
    x = batch(seed=70)
    expected = (x - mean.view(1, C, 1, 1)) / torch.sqrt(var.view(1, C, 1, 1) + m.eps)
    torch.testing.assert_close(m(x), expected * m.weight.view(1, C, 1, 1) + m.bias.view(1, C, 1, 1),
                               rtol=1e-10, atol=1e-12)


def test_mbn_config_with_lambda_zero_builds_layers_that_infer_like_bn():
    """Through the shipped config (norm=mbn norm.lam=[0]), as Table 5's λ = {0} row runs."""
    from mbn.build import make_model
    from tests.conftest import make_cfg

    layers = [m for m in make_model(make_cfg(["norm=mbn", "norm.lam=[0.0]"])).modules()
              if isinstance(m, MemorizedBatchNorm2d)]
    assert layers and all(m.inference == "running" for m in layers)
    paper = [m for m in make_model(make_cfg(["norm=mbn"])).modules() if isinstance(m, MemorizedBatchNorm2d)]
    assert all(m.inference == "memory" and m.inference_modes == ("memory", "running") for m in paper)


def test_mbn_backward_runs_half_the_ops_of_autograd_through_eq_6():
    """Speed, checked on a CPU by counting ops: one MBN layer's written-out backward runs at most
    half the ops of autograd through eq. 6 (the DDP path), which the compiled step would otherwise
    turn into extra small kernels per layer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    def backward_ops(layer, forward):
        x = batch(n=4, seed=1).requires_grad_()
        y = forward(layer, x)
        Count.n = 0
        with Count():
            y.backward(torch.ones_like(y))
        return Count.n

    m = mbn()
    fill_memory(m, 3)
    m.record = False
    bn = BatchNorm2d(C).double()
    fast = backward_ops(m, lambda m, x: m(x))
    bn_ops = backward_ops(bn, lambda m, x: m(x))
    autograd = backward_ops(m, lambda m, x: m.affine_apply(x, *m.memorized_stats(*m.batch_stats(x))))
    assert 2 * fast <= autograd, (fast, bn_ops, autograd)  # 23 vs 54 ops (BN: 5) when written


def test_pooled_statistics_stay_fp32_under_bf16_autocast():
    """Eq. 6 under bf16 autocast is computed in fp32 (a matmul there would run in bf16), in
    training and inference, and equals the fp32 computation."""
    m = MemorizedBatchNorm2d(C, memory_size=4, lam=0.5).float()
    for i in range(3):
        m.push(*[t.float() if torch.is_tensor(t) else t for t in stats(batch(seed=20 + i, shift=3.0 + i))])
    x = batch(seed=30, shift=3.0).float()
    mean, var, n = m.batch_stats(x)
    want = m.memorized_stats(mean, var, n), m.memorized_stats()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m.memorized_stats(mean, var, n), m.memorized_stats()
    for (gm, gv), (wm, wv) in zip(got, want):
        assert gm.dtype == gv.dtype == torch.float32
        torch.testing.assert_close((gm, gv), (wm, wv), rtol=1e-6, atol=1e-6)
