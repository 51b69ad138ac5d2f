"""Algorithm 1, lines 10-12: what the memory and the running averages hold after one step."""
import torch
from torch import nn

from mbn.norms import recording
from mbn.step import train_step
from mbn.norms import BatchNorm2d, MemorizedBatchNorm2d


def tiny_net(norm_layer):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), norm_layer(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def input_stats(net, x):
    """Statistics of the norm layer's input for the current weights, recording nothing."""
    seen = {}
    h = net[1].register_forward_hook(lambda m, inp, out: seen.setdefault("x", inp[0].detach()))
    with torch.no_grad(), recording(net, False):
        net(x)
    h.remove()
    var, mean = torch.var_mean(seen["x"], dim=(0, 2, 3), correction=0)
    return mean, var


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)


def test_double_forward_records_statistics_of_the_updated_weights():
    net = tiny_net(lambda c: MemorizedBatchNorm2d(c, memory_size=3, lam=0.5))
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    x, y = data()
    before = input_stats(net, x)
    train_step(net, opt, x, y, double_forward=True)
    after = input_stats(net, x)
    mbn = net[1]
    assert int(mbn.memory.filled) == 1  # one record per step, from the second forward only
    newest = int(torch.remainder(mbn.memory.head - 1, 3))
    assert torch.equal(mbn.memory.mean[newest], after[0]) and torch.equal(mbn.memory.var[newest], after[1])
    assert not torch.allclose(mbn.memory.mean[newest], before[0])
    assert opt.state[net[0].weight]["momentum_buffer"] is not None


def test_single_forward_records_statistics_of_the_old_weights():
    net = tiny_net(lambda c: MemorizedBatchNorm2d(c, memory_size=3, lam=0.5))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x, y = data()
    before = input_stats(net, x)
    train_step(net, opt, x, y, double_forward=False)
    assert int(net[1].memory.filled) == 1
    assert torch.equal(net[1].memory.mean[0], before[0])


def test_batchnorm_double_forward_updates_running_averages_once_with_new_weights():
    net = tiny_net(lambda c: BatchNorm2d(c, momentum=0.1))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x, y = data()
    train_step(net, opt, x, y, double_forward=True)
    mean, _ = input_stats(net, x)
    assert int(net[1].num_batches_tracked) == 1
    torch.testing.assert_close(net[1].running_mean, 0.1 * mean)


def test_double_forward_takes_the_same_sgd_update():
    """The second forward changes no parameter: the weights after a step are identical with
    single and double forward for BN (whose training normalization ignores the record)."""
    nets = [tiny_net(lambda c: BatchNorm2d(c)) for _ in range(2)]
    x, y = data()
    for net, double in zip(nets, (False, True)):
        train_step(net, torch.optim.SGD(net.parameters(), lr=0.1), x, y, double_forward=double)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p, q)


def test_recording_context_restores_previous_flags():
    net = tiny_net(lambda c: BatchNorm2d(c))
    net[1].record = False
    with recording(net, True):
        assert net[1].record is True
    assert net[1].record is False
