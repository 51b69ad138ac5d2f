"""NormProp (Arpit et al. 2016): its forward against the closed form, activations at init through
the plain networks, and a short training at the paper's lr (it diverged in 3 steps before the
filter lengths were set; see mbn/norms/normprop.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from mbn.build import make_model, make_optimizer
from mbn.data import channel_stats, synthetic
from mbn.norms import NormProp2d, NormPropReLU, bind_convs
from mbn.norms.normprop import RELU_MEAN, RELU_STD
from tests.conftest import make_cfg


def test_normprop_forward_equals_its_formula(float64):
    """o_i = γ_i · <W_i, patch> / (c · ‖W_i‖₂) + β_i for every output position, written out with
    im2col and an explicit square root; the NormProp ReLU is (max(0, o) − 1/√(2π)) / √((1 − 1/π)/2)."""
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1, bias=False)
    layer = NormProp2d(7)
    bind_convs(torch.nn.Sequential(conv, layer))
    with torch.no_grad():
        conv.weight.copy_(torch.randn(7, 5, 3, 3, generator=g) * torch.rand(7, 1, 1, 1, generator=g) * 3)
        layer.weight.copy_(torch.rand(7, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(7, generator=g))
    x = torch.randn(3, 5, 6, 6, generator=g)
    with torch.no_grad():
        out = layer(conv(x))
    patches = F.unfold(x, 3, padding=1)                                  # (N, 5·3·3, 36)
    w = conv.weight.reshape(7, -1)
    length = w.pow(2).sum(1).sqrt()
    expected = (torch.einsum("kd,ndl->nkl", w, patches) * (layer.weight / (1.21 * length))[None, :, None]
                + layer.bias[None, :, None]).reshape(3, 7, 6, 6)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

    z = torch.tensor([-2.0, 0.0, 0.5, 1.0, 3.0])
    closed = (z.clamp_min(0) - 1 / math.sqrt(2 * math.pi)) / math.sqrt(0.5 * (1 - 1 / math.pi))
    torch.testing.assert_close(NormPropReLU()(z), closed, rtol=1e-14, atol=1e-14)


def test_normprop_constant_is_the_relu_jacobian_gain_and_equals_a_gamma_of_one_over_it(float64):
    """1.21 is 1/√(1 − 1/π), the RMS slope of the NormProp ReLU on N(0, 1) (slope 1/RELU_STD with
    probability ½); dividing by it with γ = 1 is the paper's γ = 1/1.21 with no constant."""
    assert abs(math.sqrt(0.5) / RELU_STD - 1.21) < 2e-3
    assert abs(1 / math.sqrt(1 - 1 / math.pi) - 1.21) < 2e-3
    z = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0), requires_grad=True)
    (slope,) = torch.autograd.grad(NormPropReLU()(z).sum(), z)
    assert abs(slope.pow(2).mean().sqrt().item() - 1 / math.sqrt(1 - 1 / math.pi)) < 2e-3
    assert abs(RELU_MEAN - 1 / math.sqrt(2 * math.pi)) < 1e-15

    conv = torch.nn.Conv2d(4, 6, 3, bias=False)
    ours, papers = NormProp2d(6), NormProp2d(6, const=1.0)
    bind_convs(torch.nn.Sequential(conv, ours, papers))  # both bound to conv
    with torch.no_grad():
        papers.weight.fill_(1 / 1.21)
        y = conv(torch.randn(2, 4, 7, 7))
        torch.testing.assert_close(ours(y), papers(y), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("model", ["nin", "vgg16"])
def test_normprop_filter_lengths_change_no_output(model, float64):
    """The build gives every filter feeding NormProp the length norm.filter_norm (default 10)
    and leaves the function alone: the same outputs as the model's He-initialized filters."""
    torch.manual_seed(0)
    cfg = make_cfg([f"model={model}", "norm=normprop"])
    net = make_model(cfg)
    bound = [m._conv for m in net.modules() if isinstance(m, NormProp2d)]
    assert len(bound) == (8 if model == "nin" else 13)
    for conv in bound:
        torch.testing.assert_close(conv.weight.flatten(1).norm(dim=1), torch.full((conv.out_channels,), 10.0))
    torch.manual_seed(0)
    he = models_as_built(cfg)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), he(x), rtol=1e-10, atol=1e-10)
    assert any(c.weight.flatten(1).norm(dim=1).mean() < 2 for c in he.modules() if isinstance(c, torch.nn.Conv2d))


def models_as_built(cfg):
    """The model with its convolutions as the model file initialized them (no filter lengths)."""
    import models
    from mbn import norms

    net = models.build_model(cfg.model.name, cfg.data.num_classes, norms.build_norm(cfg.norm),
                             norms.build_act(cfg.norm), norms.build_conv(cfg.norm))
    norms.bind_convs(net)
    return net


@pytest.mark.parametrize("model", ["nin", "vgg16"])
def test_normprop_activations_are_order_one_at_init_without_growth(model, float64):
    """Every NormProp pre-activation has a std in [0.2, 1] (the 1/1.21 a layer shrinks it; no layer
    grows it: a constant of 1 gave up to 2.5, multiplying by 1.21 up to 39 through VGG-16), every
    NormProp ReLU output an RMS in [0.5, 1], and the logits are finite and moderate."""
    torch.manual_seed(0)
    net = make_model(make_cfg([f"model={model}", "norm=normprop"]))
    pre, post = [], []
    for m in net.modules():
        if isinstance(m, NormProp2d):
            m.register_forward_hook(lambda mod, i, o: pre.append(o.std().item()))
        elif isinstance(m, NormPropReLU):
            m.register_forward_hook(lambda mod, i, o: post.append(o.pow(2).mean().sqrt().item()))
    with torch.no_grad():
        logits = net(torch.randn(16, 3, 32, 32))
    assert len(pre) == len(post) == (8 if model == "nin" else 13)
    assert all(0.2 < s < 1.0 for s in pre), pre
    assert all(0.5 < r < 1.0 for r in post), post
    assert torch.isfinite(logits).all() and logits.std() < 5


def train_default_config(model, steps, batch_size, size):
    """`steps` SGD steps with the default config (the paper's lr 0.1, momentum 0.9, weight decay
    1e-4) on 256 synthetic images at size x size: the losses."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    cfg = make_cfg([f"model={model}", "norm=normprop", "data=synthetic"])
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 1e-4)
    net = make_model(cfg)
    optimizer = make_optimizer(cfg, net)
    train, _ = synthetic(10, 256, 16, seed=0)
    mean, std = channel_stats(train.images)
    x = ((train.images.double() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).float()
    x = F.adaptive_avg_pool2d(x, size)
    losses = []
    for step in range(steps):
        i = torch.arange(step * batch_size, (step + 1) * batch_size) % len(x)
        loss = F.cross_entropy(net(x[i]), train.labels[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_trains(losses):
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert all(math.isfinite(v) for v in losses), losses
    assert max(losses) < 2 * first and last < 0.5 * first, losses


def test_nin_normprop_trains_at_the_default_lr():
    """NIN, 40 steps of 32 at 16x16 (global average pooling makes it the same network, in a
    quarter of the time). Before the filter lengths: 6.4, 472, 6.7e4, 8e31, NaN. Needs NIN's
    classifier at PyTorch's default init: with He fan-out init (std 0.45, logits std 2.7, loss
    6.5 at step 0) the β's of all eight NormProp layers, which no batch mean absorbs, took the
    logits to NaN within 12 steps even with filters that barely turned."""
    assert_trains(train_default_config("nin", steps=40, batch_size=32, size=16))


def test_vgg16_normprop_trains_at_the_default_lr():
    """VGG-16, 30 steps of 16 at 32x32. Before the filter lengths: 2.5, 5.1, 3.6, 38, 2.4e3, NaN."""
    assert_trains(train_default_config("vgg16", steps=30, batch_size=16, size=32))
