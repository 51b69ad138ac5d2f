"""K seeds stacked into one network of grouped convolutions (mbn/stacked.py) train exactly as K
separate models: parameters, normalizer state (running statistics, MBN's memory), losses."""
import copy
import json
import os

import pytest
import torch
from torch import nn

from mbn import UserError
from mbn.build import make_model
from mbn.engine import Run
from mbn.norms import normalizers, recording, set_progress
from mbn.stacked import StackedRun, stack, stacked_step, stack_inputs, stacked_losses, unstack
from mbn.step import train_step
from tests.conftest import REPO, make_cfg

K, N, SIZE, STEPS = 3, 4, 8, 3
# (norm, double forward, progress, extra overrides): MBN with a 2-slot memory that wraps within
# the steps and λ = 0.5; BRN where r_max, d_max have relaxed past BN's 1 and 0
CASES = {"bn-1": ("bn", False, 0.0, []),
         "mbn-2": ("mbn", True, 0.0, ["norm.memory_size=2", "norm.lam=[0.5]"]),
         "brn-2": ("brn", True, 0.3, [])}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny float64 convolutions: one intra-op thread (on a loaded two-core machine two threads
    wait for each other, measured 100x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class Feed:
    """A batch source serving a fixed list of (x, y) in turn."""

    capturable = False

    def __init__(self, batches):
        self.batches, self.i, self.device = batches, 0, batches[0][0].device

    def next_batch(self):
        x, y = self.batches[self.i]
        self.i += 1
        return x, y, torch.ones_like(y, dtype=torch.bool)


def build(case, model="resnet20", size=SIZE, steps=STEPS, n=N):
    norm, double, progress, extra = CASES[case]
    cfg = make_cfg([f"model={model}", f"norm={norm}", *extra])
    out = []
    for seed in range(K):
        torch.manual_seed(seed)
        m = make_model(cfg)
        set_progress(normalizers(m), progress)
        out.append(m)
    data = []  # data[k][t]: model k's batch at step t, each model its own
    g = torch.Generator().manual_seed(123)
    for _ in range(K):
        data.append([(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))
                     for _ in range(steps)])
    return out, data, double


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


def train_separately(models, data, double):
    losses = torch.zeros(len(data[0]), K)
    for k, m in enumerate(models):
        opt = sgd(m.parameters())
        for t, (x, y) in enumerate(data[k]):
            loss_sum, _ = train_step(m, opt, x, y, double)
            losses[t, k] = loss_sum / len(y)
    return losses


def assert_same_models(stacked, models, atol=1e-12, rtol=1e-10):
    for k, m in enumerate(models):
        ours = unstack(stacked, k)
        ref = m.state_dict()
        assert ours.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(ours[key], ref[key], atol=atol, rtol=rtol, msg=lambda s: f"model {k}, {key}: {s}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_stacked_training_equals_separate_training_float64(case, float64):
    """ResNet-20 (shortcut padding included), K = 3 seeds, 3 SGD steps (momentum, weight decay),
    each model on its own batches: the stacked network trained by stacked_step on the
    channel-concatenated batches equals the separately trained models — every parameter, running
    statistic, MBN memory slot and counter, every step's loss, and the eval outputs."""
    models, data, double = build(case)
    stacked = stack(copy.deepcopy(models))
    assert sum(1 for m in stacked.modules() if isinstance(m, nn.Conv2d) and m.groups == K) == 19
    separate = train_separately(models, data, double)

    step = stacked_step(stacked, sgd(stacked.parameters()), [Feed(d) for d in data], double)
    losses = torch.zeros(STEPS, K)
    for t in range(STEPS):
        before = step.loss_sum.clone()
        step()
        losses[t] = (step.loss_sum - before) / N
    torch.testing.assert_close(losses, separate, atol=1e-12, rtol=0)
    assert_same_models(stacked, models)
    if case.startswith("mbn"):  # the memory wrapped: 3 pushes into 2 slots
        assert int(stacked.net.bn1.memory.filled) == 2 and stacked.net.bn1.memory.mean.shape == (2, K * 16)

    x = [torch.randn(N, 3, SIZE, SIZE) for _ in range(K)]
    with torch.no_grad():
        out = stacked.eval()(stack_inputs(x))
        for k, m in enumerate(models):
            torch.testing.assert_close(out[:, k], m.eval()(x[k]), atol=1e-12, rtol=1e-12)


def train_manually(stacked, data, double, reduce):
    """The stacked step written out, with the K losses reduced by `reduce`."""
    opt = sgd(stacked.parameters())
    losses = torch.zeros(len(data[0]), K)
    for t in range(len(data[0])):
        x = stack_inputs([data[k][t][0] for k in range(K)])
        y = torch.stack([data[k][t][1] for k in range(K)], 1)
        opt.zero_grad()
        with recording(stacked, not double):
            per_model = stacked_losses(stacked(x), y)
        reduce(per_model).backward()
        opt.step()
        losses[t] = per_model.detach()
        if double:
            with torch.no_grad(), recording(stacked, True):
                stacked(x)
    return losses


def test_the_comparison_fails_for_averaged_losses_and_ungrouped_convolutions(float64):
    """The equality above has teeth: the mean of the K losses (gradients 1/K of each model's), or
    dense convolutions holding the K weights block-diagonally (equal outputs, but gradients reach
    the zero blocks and couple the models), part from separate training after one step."""
    models, data, double = build("bn-1")
    separate_models = copy.deepcopy(models)
    separate = train_separately(separate_models, data, double)

    right = stack(copy.deepcopy(models))
    torch.testing.assert_close(train_manually(right, data, double, torch.sum), separate, atol=1e-12, rtol=0)
    assert_same_models(right, separate_models)

    averaged = stack(copy.deepcopy(models))
    losses = train_manually(averaged, data, double, torch.mean)
    torch.testing.assert_close(losses[0], separate[0], atol=1e-12, rtol=0)
    assert (losses[1:] - separate[1:]).abs().max() > 1e-4
    with pytest.raises(AssertionError):
        assert_same_models(averaged, separate_models)

    dense = stack(copy.deepcopy(models))
    for name, conv in list(dense.named_modules()):
        if isinstance(conv, nn.Conv2d):
            full = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                             bias=False)
            with torch.no_grad():
                full.weight.zero_()
                co, ci = conv.out_channels // K, conv.in_channels // K
                for k in range(K):
                    full.weight[k * co:(k + 1) * co, k * ci:(k + 1) * ci] = conv.weight[k * co:(k + 1) * co]
            parent, _, leaf = name.rpartition(".")
            setattr(dense.get_submodule(parent), leaf, full)
    losses = train_manually(dense, data, double, torch.sum)
    torch.testing.assert_close(losses[0], separate[0], atol=1e-12, rtol=0)  # the forward alone is exact
    assert (losses[1:] - separate[1:]).abs().max() > 1e-4


@pytest.mark.parametrize("model", [pytest.param("vgg16", marks=pytest.mark.slow), "nin"])  # VGG: 30 s of float64
def test_plain_networks_stack_exactly(model, float64):
    """VGG-16 (flatten, linear classifier) and NIN (a last convolution without a normalizer): one
    MBN-2 training step (VGG on 32x32 images: it pools 5 times), stacked equals separate."""
    models, data, double = build("mbn-2", model, size=32 if model == "vgg16" else SIZE, steps=1, n=2)
    stacked = stack(copy.deepcopy(models))
    separate = train_separately(models, data, double)
    losses = train_manually(stacked, data, double, torch.sum)
    torch.testing.assert_close(losses, separate, atol=1e-12, rtol=0)
    assert_same_models(stacked, models)


def test_unstack_round_trip_and_what_is_refused(resnet8):
    models, _, _ = build("mbn-2")
    stacked = stack(models)
    for k, m in enumerate(models):
        ours, ref = unstack(stacked, k), m.state_dict()
        assert all(torch.equal(ours[key], ref[key]) for key in ref)
        fresh = make_model(make_cfg(["norm=mbn", "norm.memory_size=2", "norm.lam=[0.5]"]))
        fresh.load_state_dict(ours)  # loads into an ordinary model
    import models as zoo  # torch's own BatchNorm2d stacks too (bench.py's reference loop uses it)
    plain = []
    for seed in range(2):
        torch.manual_seed(seed)
        plain.append(zoo.build_model("resnet20", 10, nn.BatchNorm2d, nn.ReLU))
    x = [torch.randn(2, 3, 8, 8) for _ in plain]
    out = stack(copy.deepcopy(plain))(stack_inputs(x))
    for k, m in enumerate(plain):
        torch.testing.assert_close(out[:, k], m(x[k]), atol=1e-5, rtol=1e-5)
    # statistics across channels, or read from the producing convolution's weights
    for norm, layer in (("gn", "GroupNorm2d"), ("cbn", "CrossIterationBatchNorm2d"), ("normprop", "NormProp2d"),
                        ("mabn", "MovingAverageBatchNorm2d")):
        model = "nin" if norm == "normprop" else "resnet20"
        with pytest.raises(UserError, match=f"cannot stack .*{layer}"):
            stack([make_model(make_cfg([f"norm={norm}", f"model={model}"])) for _ in range(2)])
    with pytest.raises(UserError, match="cannot stack"):  # Revisiting-BN's input BN wrapper
        stack([make_model(make_cfg(["norm=rbn", "data.input_norm=bn"])) for _ in range(2)])
    with pytest.raises(UserError, match="one architecture"):
        stack([make_model(make_cfg(["model=resnet20"])), make_model(make_cfg(["model=resnet56"]))])
    a, b = (make_model(make_cfg(["norm=mbn"])) for _ in range(2))
    b.bn1.memory.head.fill_(3)  # trained for a different number of steps
    with pytest.raises(UserError, match="'memory.head' differs"):
        stack([a, b])


def test_stacked_run_equals_separate_runs(float64, monkeypatch, resnet8):
    """The framework's path: StackedRun over seeds 0 and 1 (MBN-2, synthetic data with augmentation,
    an lr milestone) equals two `Run`s with seed=0 and seed=1 — each model its own initialisation
    and its own data order. In float64 (the data pipeline's batches cast), where equality is
    ~1e-15; in float32 this tiny setup amplifies rounding differences to 1e-3 within 4 steps."""
    from mbn.data import Batches

    served = Batches.next_batch
    monkeypatch.setattr(Batches, "next_batch", lambda self: (lambda x, y, v: (x.double(), y, v))(*served(self)))
    seeds, steps = [0, 1], 4
    base = ["model=resnet20", "norm=mbn", "data=synthetic", "data.train_size=32", "data.test_size=16",
            "train.batch_size=8", f"train.steps={steps}", "norm.lam=[0.5]", "schedule.milestones=[0.5]"]
    stacked = StackedRun(make_cfg(base), torch.device("cpu"), seeds)
    stacked.start_epoch(0)
    for i in range(steps):
        stacked.schedule(i)
        stacked.step()
    for k, seed in enumerate(seeds):
        torch.manual_seed(seed)
        run = Run(make_cfg(base + [f"seed={seed}"]), torch.device("cpu"))
        run.train_batches.start_epoch(0)
        for i in range(steps):
            run.schedule(i)
            run.step()
        torch.testing.assert_close(stacked.step.loss_sum[k], run.step.loss_sum, rtol=1e-12, atol=0)
        assert stacked.step.errors[k] == run.step.errors
        ours, ref = unstack(stacked.model, k), run.model.state_dict()
        for key in ref:
            torch.testing.assert_close(ours[key], ref[key], rtol=1e-10, atol=1e-12, msg=lambda s: f"{key}: {s}")
    # different seeds did train different models on different data
    assert not torch.allclose(unstack(stacked.model, 0)["conv1.weight"], unstack(stacked.model, 1)["conv1.weight"])


def test_bench_times_stacked_seeds_on_cpu(capsys):
    """scripts/bench.py's (g) and (h) on a CPU: img/s of all seeds, the seed count in the row."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", os.path.join(REPO, "scripts", "bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--device", "cpu", "--only", "g", "h", "--seeds", "2", "--batch-sizes", "4",
                       "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [row["key"] for row in rows] == ["g", "h"]
    assert all(row["seeds"] == 2 and row["images_per_s"] > 0 and "2 seeds stacked" in row["config"] for row in rows)
