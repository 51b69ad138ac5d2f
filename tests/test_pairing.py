"""Runs of one seed are paired across normalizers (issue 10 §1): the same initial convolution and
linear weights and the same training batches, so a per-seed difference measures the normalizer
and nothing else. The paired differences in the tables rest on this."""
import pytest
import torch

from mbn.data import make_loaders
from mbn.norms import NORMS
from tests.conftest import make_cfg

try:  # the builders moved out of the engine (issue 11); either place will do
    from mbn.build import make_model
except ImportError:  # pragma: no cover
    from mbn.engine import make_model

SMALL = ["data=synthetic", "data.train_size=64", "data.test_size=32", "train.batch_size=32"]


def _norms_for(model):
    plain = model in ("nin", "vgg16")
    return [n for n in sorted(NORMS) if plain or NORMS[n].residual_ok]


def _weights(model, norm, seed):
    cfg = make_cfg(SMALL + [f"model={model}", f"norm={norm}", f"seed={seed}"])
    torch.manual_seed(seed)
    net = make_model(cfg)
    # by name without a wrapper's prefix (Revisiting-BN wraps the model to normalize its input)
    return {name.removeprefix("net."): m.weight.detach().clone() for name, m in net.named_modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


@pytest.mark.parametrize("model", ["resnet20", "nin"])
def test_same_seed_same_initial_weights_for_every_normalizer(model):
    norms = _norms_for(model)
    assert {"bn", "brn", "mbn"} <= set(norms)
    ref = _weights(model, "bn", 1)
    for norm in norms:
        w = _weights(model, norm, 1)
        assert w.keys() == ref.keys(), f"{norm}: other conv/linear layers than bn"
        for name in ref:
            a, b = w[name], ref[name]
            if norm == "normprop":  # its build gives every filter the length norm.filter_norm: same directions
                a, b = (t / t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1)) for t in (a, b))
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{model} {norm}: {name} differs from bn's")
            else:
                assert torch.equal(a, b), f"{model} {norm}: {name} differs from bn's"
    other = _weights(model, "bn", 0)
    assert not any(torch.equal(other[k], v) for k, v in ref.items())  # the seed matters


def test_same_seed_same_training_batches_for_every_normalizer():
    """The same images, crops, flips and labels in the same order. How pixels are scaled may be
    the method's own (Revisiting-BN normalizes its input online), so images are compared on the
    0-1 scale, before the loader's standardization."""
    def batches(norm, seed):
        cfg = make_cfg(SMALL + ["model=resnet20", f"norm={norm}", f"seed={seed}"])
        train, _ = make_loaders(cfg, torch.device("cpu"))
        return [(x * train.std + train.mean, y.clone()) for x, y in train.epoch(1)]

    ref = batches("bn", 3)
    for norm in _norms_for("resnet20"):
        got = batches(norm, 3)
        assert len(got) == len(ref) == 2
        for (x, y), (rx, ry) in zip(got, ref):
            assert torch.equal(y, ry), f"{norm}: other labels than bn's"
            torch.testing.assert_close(x, rx, rtol=0, atol=1e-6, msg=f"{norm}: other images than bn's")
    assert not torch.equal(batches("bn", 0)[0][1], ref[0][1])  # the seed matters
