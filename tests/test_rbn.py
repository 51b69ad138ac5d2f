"""Revisiting-BN (mbn/norms/rbn.py): initialisation, BN's computation, the optimizer groups and
the online input normalization (spec §3.6), in float64."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mbn import UserError
from mbn.build import make_model, make_optimizer, set_lr
from mbn.data import make_loaders
from mbn.norms import build_norm, normalizers, recording
from mbn.norms.rbn import InputNormalized, RevisitedBatchNorm2d
from tests.conftest import TINY, make_cfg
from tests.norm_helpers import assert_fit_and_eval, assert_models_train

C = 5


pytestmark = pytest.mark.usefixtures("float64")  # every test here runs in float64


def batch(n=6, c=C, seed=0, shift=0.5, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, 3, 4, generator=g) * scale + shift


def resnet(overrides=()):
    return make_model(make_cfg(["model=resnet20", "norm=rbn", *overrides])).double()


def test_config_defaults_are_the_papers():
    cfg = make_cfg(["norm=rbn"])
    n = cfg.norm
    assert (n.gamma_init, n.gamma_lr_div, n.norm_weight_decay, n.sigma_act) == (0.1, 100.0, 0.0, 0.58)
    assert (n.momentum, n.eps, cfg.train.double_forward) == (0.1, 1e-5, False)
    assert cfg.data.input_norm == "bn"  # defaults to norm.input_norm
    assert make_cfg(["norm=rbn", "data.input_norm=dataset"]).data.input_norm == "dataset"
    assert make_cfg(["norm=bn"]).data.input_norm == "dataset"


def test_initial_values():
    net = resnet()
    assert isinstance(net, InputNormalized)
    inner = [m for m in normalizers(net.net)]
    assert len(inner) == 19 and all(isinstance(m, RevisitedBatchNorm2d) for m in inner)
    for m in inner:
        assert torch.all(m.weight == 0.1) and torch.all(m.bias == 0)
    inp = net.input_norm
    torch.testing.assert_close(inp.weight, torch.full((3,), 0.1 * 0.58))
    assert torch.all(inp.bias == 0) and not inp.bias.requires_grad and inp.weight.requires_grad
    assert not isinstance(resnet(["data.input_norm=dataset"]), InputNormalized)


def test_forward_and_backward_equal_torch_batch_norm_in_train_and_eval():
    m = RevisitedBatchNorm2d(C, gamma_init=0.3)
    ref = nn.BatchNorm2d(C)
    ref.load_state_dict(m.state_dict())
    g = batch(seed=9)
    for mode in ("train", "eval"):
        m.train(mode == "train"), ref.train(mode == "train")
        x = batch(seed=1).requires_grad_()
        ours = (m(x), *torch.autograd.grad(m(x), (x, m.weight, m.bias), g))
        theirs = (ref(x), *torch.autograd.grad(ref(x), (x, ref.weight, ref.bias), g))
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(m, name), getattr(ref, name), rtol=1e-12, atol=1e-12)


def test_record_pass_updates_running_averages_main_pass_does_not():
    m = RevisitedBatchNorm2d(C)
    with recording(m, False):
        m(batch(seed=1))
    assert torch.all(m.running_mean == 0) and int(m.num_batches_tracked) == 0
    with torch.no_grad(), recording(m, True):
        m(batch(seed=2))
    torch.testing.assert_close(m.running_mean, 0.1 * batch(seed=2).mean((0, 2, 3)))


def groups_by_name(opt):
    return {g["name"]: g for g in opt.param_groups}


def test_one_sgd_step_per_parameter_group():
    """Momentum 0, weight decay 1e-2, scheduled lr 0.05 (set_lr): Δγ = −(lr/c)·∂L/∂γ (no decay),
    Δβ = −lr·∂L/∂β, Δ(conv weight) = −lr·(∂L/∂W + wd·W), Δ(fc bias) = −lr·∂L/∂b."""
    cfg = make_cfg(["model=resnet20", "norm=rbn", "optim.momentum=0.0", "optim.weight_decay=0.01"])
    torch.manual_seed(0)
    net = make_model(cfg).double()
    opt = make_optimizer(cfg, net)
    set_lr(opt, 0.05)
    lr, c, wd = 0.05, 100.0, 0.01
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(net(x), y).backward()
    bn, conv, fc = net.net.bn1, net.net.conv1, net.net.fc
    tracked = {"gamma": bn.weight, "beta": bn.bias, "conv": conv.weight, "fc_bias": fc.bias, "fc_weight": fc.weight,
               "input_gamma": net.input_norm.weight}
    before = {k: (p.detach().clone(), p.grad.clone()) for k, p in tracked.items()}
    opt.step()
    expected = {"gamma": lambda p, g: p - lr / c * g, "input_gamma": lambda p, g: p - lr / c * g,
                "beta": lambda p, g: p - lr * g, "fc_bias": lambda p, g: p - lr * g,
                "conv": lambda p, g: p - lr * (g + wd * p), "fc_weight": lambda p, g: p - lr * (g + wd * p)}
    for k, p in tracked.items():
        torch.testing.assert_close(p.detach(), expected[k](*before[k]), rtol=1e-12, atol=1e-15, msg=k)
    assert torch.all(net.input_norm.bias == 0)


def test_parameter_group_census_on_resnet20():
    """Every normalizer γ (19 BN layers and the input BN) is in the lr/c group and nothing else
    is; every β and bias is undecayed; every conv/linear weight is decayed; the frozen input β
    is in no group. Group 0 keeps the scheduled lr (what the logs report)."""
    net = resnet()
    opt = make_optimizer(make_cfg(["model=resnet20", "norm=rbn"]), net)
    groups = groups_by_name(opt)
    assert [g["name"] for g in opt.param_groups][0] == "decay" and opt.param_groups[0]["lr_scale"] == 1.0
    gammas = {id(m.weight) for m in normalizers(net)}
    betas = {id(m.bias) for m in normalizers(net) if m.bias.requires_grad}
    weights = {id(m.weight) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {id(p) for p in groups["gamma"]["params"]} == gammas and len(gammas) == 20
    assert {id(p) for p in groups["no_decay"]["params"]} == betas | {id(net.net.fc.bias)}
    assert {id(p) for p in groups["decay"]["params"]} == weights
    assert groups["gamma"]["lr"] == pytest.approx(0.1 / 100) and groups["gamma"]["weight_decay"] == 0
    assert groups["no_decay"]["weight_decay"] == 0 and groups["decay"]["weight_decay"] == 1e-4
    in_groups = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups)) == sum(p.requires_grad for p in net.parameters())


def test_one_output_linear_weight_is_not_a_gamma():
    """Grouping by module type: the official 1-D-shape rule would take this weight for a γ."""
    from mbn.norms.rbn import param_groups

    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), RevisitedBatchNorm2d(4), nn.Flatten(), nn.Linear(4, 1))
    groups = {g["name"]: g["params"] for g in param_groups(net, build_cfg())}
    assert any(p is net[3].weight for p in groups["decay"])
    assert all(p is not net[3].weight for p in groups["gamma"])


def build_cfg():
    from mbn.norms import as_config

    return as_config({"name": "rbn"})


def test_input_bn_in_training_standardizes_each_channel_to_gamma():
    """Train mode: per-channel output mean 0 and biased std 0.058·sqrt(σ²/(σ² + ε)); β stays 0
    after an optimizer step."""
    net = resnet()
    inp = net.input_norm
    x = torch.rand(8, 3, 32, 32) * torch.tensor([0.2, 0.5, 1.0]).view(1, 3, 1, 1)
    y = inp(x)
    var = x.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-14, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3), unbiased=False), 0.058 * torch.sqrt(var / (var + 1e-5)))
    opt = make_optimizer(make_cfg(["model=resnet20", "norm=rbn"]), net)
    F.cross_entropy(net(x), torch.arange(8) % 10).backward()
    opt.step()
    assert torch.all(inp.bias == 0)


def test_data_pipeline_feeds_unit_range_images_for_the_input_bn():
    cfg = make_cfg(TINY + ["norm=rbn"])
    train, _ = make_loaders(cfg, torch.device("cpu"))
    train.start_epoch(0)
    x = train.next_batch()[0]
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.5
    train, _ = make_loaders(make_cfg(TINY + ["norm=rbn", "data.input_norm=dataset"]), torch.device("cpu"))
    train.start_epoch(0)
    assert train.next_batch()[0].min() < 0


def test_input_norm_bn_without_an_input_bn_is_a_clear_error():
    with pytest.raises(UserError, match="data.input_norm=bn"):
        make_loaders(make_cfg(TINY + ["norm=bn", "data.input_norm=bn"]), torch.device("cpu"))
    with pytest.raises(UserError, match="data.input_norm=other"):
        make_loaders(make_cfg(TINY + ["norm=rbn", "data.input_norm=other"]), torch.device("cpu"))


@pytest.mark.parametrize("key,value", [("gamma_init", 0.0), ("gamma_lr_div", 0.0), ("norm_weight_decay", -1.0)])
def test_bad_values_are_clear_errors(key, value):
    with pytest.raises(UserError, match=key):
        build_norm({"name": "rbn", key: value})


def test_state_dict_round_trip_with_the_input_bn():
    net = resnet()
    with torch.no_grad():
        net(torch.rand(4, 3, 32, 32))
    fresh = resnet()
    fresh.load_state_dict(copy.deepcopy(net.state_dict()))
    assert "input_norm.running_mean" in net.state_dict()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(fresh.eval()(x), net.eval()(x))


def test_compiles_without_graph_breaks():
    """fullgraph=True through a main pass, a record pass and eval: the same numbers as eager."""
    m = RevisitedBatchNorm2d(C)
    c = copy.deepcopy(m)
    compiled = torch.compile(c, fullgraph=True, backend="aot_eager")
    x = batch().requires_grad_()
    for layer, fwd in ((m, m), (c, compiled)):
        with recording(layer, False):
            fwd(x).sum().backward()
        with torch.no_grad(), recording(layer, True):
            fwd(x * 2)
    torch.testing.assert_close(c.running_var, m.running_var)
    torch.testing.assert_close(c.weight.grad, m.weight.grad)
    m.eval(), c.eval()
    torch.testing.assert_close(compiled(x), m(x))


@pytest.mark.parametrize("model", ["resnet20", "vgg16", "nin"])
def test_works_on_the_cifar_models(model):
    assert_models_train("rbn", RevisitedBatchNorm2d, [model])


@pytest.mark.parametrize("double_forward", [False, True])
def test_tiny_training_and_eval_end_to_end(tmp_path, double_forward):
    assert_fit_and_eval(tmp_path, ["norm=rbn"], double_forward)
