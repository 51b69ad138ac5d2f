"""GroupNorm (mbn/norms/gn.py) against PyTorch's ops, in float64."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mbn import UserError
from mbn.norms import build_norm, recording
from mbn.norms.gn import GroupNorm2d, num_groups
from tests.norm_helpers import assert_fit_and_eval, assert_models_train

C = 12


pytestmark = pytest.mark.usefixtures("float64")  # every test here runs in float64


def gn(c=C, groups=32):
    m = GroupNorm2d(c, groups=groups)
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 2.0, c))
        m.bias.copy_(torch.linspace(-1.0, 1.0, c))
    return m


def batch(n=4, c=C, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, 3, 4, generator=g) * torch.linspace(0.5, 3, c).view(1, -1, 1, 1) + 1.0


@pytest.mark.parametrize("channels,groups", [(16, 16), (24, 24), (32, 32), (48, 24), (64, 32), (96, 32),
                                             (100, 25), (192, 32), (3, 3), (7, 7), (34, 17)])
def test_groups_are_the_largest_divisor_up_to_32(channels, groups):
    assert num_groups(channels, 32) == groups
    assert GroupNorm2d(channels).num_groups == groups


def test_equals_torch_group_norm_outputs_and_gradients():
    m = gn()  # 12 channels: 12 groups
    ref = nn.GroupNorm(m.num_groups, C)
    ref.load_state_dict(m.state_dict())
    x = batch().requires_grad_()
    g = batch(seed=1)
    ours = (m(x), *torch.autograd.grad(m(x), (x, m.weight, m.bias), g))
    theirs = (ref(x), *torch.autograd.grad(ref(x), (x, ref.weight, ref.bias), g))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    m4 = gn(groups=4)
    torch.testing.assert_close(m4(x), F.group_norm(x, 4, m4.weight, m4.bias, 1e-5), rtol=1e-12, atol=1e-12)


def test_batch_independent():
    m = gn(groups=3)
    x = batch(n=5)
    whole = m(x)
    for i in range(5):
        torch.testing.assert_close(whole[i:i + 1], m(x[i:i + 1]), rtol=1e-12, atol=1e-12)


def test_one_group_is_layer_norm_with_a_per_channel_affine():
    m = gn(groups=1)
    x = batch()
    mean = x.mean((1, 2, 3), keepdim=True)
    var = x.var((1, 2, 3), unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-12)
    layer_norm = F.layer_norm(x, x.shape[1:], eps=1e-5) * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(m(x), layer_norm, rtol=1e-12, atol=1e-12)


def test_one_channel_per_group_is_instance_norm():
    m = gn(groups=C)
    assert m.num_groups == C
    x = batch()
    expected = F.instance_norm(x, weight=m.weight, bias=m.bias, eps=1e-5)
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-12)


def test_train_equals_eval_and_nothing_is_recorded():
    m = gn(groups=4)
    assert not list(m.buffers()) and m.inference_modes == ()
    x = batch()
    train = m.train()(x)
    with torch.no_grad(), recording(m, True):  # a record pass
        m(x * 3)
    torch.testing.assert_close(m.eval()(x), train, rtol=0, atol=0)


def test_state_dict_round_trip():
    m = gn(groups=4)
    fresh = GroupNorm2d(C, groups=4)
    fresh.load_state_dict(copy.deepcopy(m.state_dict()))
    assert torch.equal(fresh(batch()), m(batch()))


def test_compiles_without_graph_breaks():
    m = gn(groups=4)
    compiled = torch.compile(copy.deepcopy(m), fullgraph=True, backend="aot_eager")
    x = batch().requires_grad_()
    torch.testing.assert_close(compiled(x), m(x))
    torch.testing.assert_close(torch.autograd.grad(compiled(x).sum(), x)[0], torch.autograd.grad(m(x).sum(), x)[0])


def test_bad_groups_is_a_clear_error():
    with pytest.raises(UserError, match="groups"):
        build_norm({"name": "gn", "groups": 0})


@pytest.mark.parametrize("model", ["resnet20", "vgg16", "nin"])
def test_works_on_the_cifar_models(model):
    assert_models_train("gn", GroupNorm2d, [model])


@pytest.mark.parametrize("double_forward", [False, True])
def test_tiny_training_and_eval_end_to_end(tmp_path, double_forward):
    assert_fit_and_eval(tmp_path, ["norm=gn"], double_forward, cli=double_forward)
