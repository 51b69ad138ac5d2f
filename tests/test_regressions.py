"""Direct tests for bugs that once passed the suite (issue 13), each planted and seen to fail:
BRN's lower clip of r, the global RNG after a resume, the CIFAR loader's own crop padding, the
normalizers' momentum, the table statistics and run-id hashing."""
import json
import math
import random
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mbn.checkpoint import load_checkpoint, rng_state, set_rng_state
from mbn.data import Batches, Split, make_loaders
from mbn.engine import fit
from mbn.naming import RUN_FREE, run_changing, run_id
from mbn.norms import BatchRenorm2d, build_norm
from mbn.results import compose, load_grid, mean_std, merge_overrides, render, table_rows
from mbn.sweeps import expand
from tests.conftest import make_cfg
from tests.test_scale import make_image_folder

C = 5


def _batch(n=8, seed=0, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, 3, 4, generator=g, dtype=torch.float64) * scale + shift


def _stats(x):
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False), x.numel() // x.size(1)


# ------------------------------------------------------------------------------ BRN clipping
def test_brn_clips_r_to_both_bounds_and_d_to_both_signs():
    """r = clip(σ_B/σ, 1/r_max, r_max) and d = clip((μ_B − μ)/σ, −d_max, d_max): moving averages
    far above and below the batch's statistics drive every bound, the lower ones included."""
    m = BatchRenorm2d(C, r_max=3.0, d_max=5.0).double()
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 2.0, C))
        m.bias.copy_(torch.linspace(-1.0, 1.0, C))
        m.running_std.copy_(torch.tensor([0.1, 0.5, 1.0, 4.0, 20.0]))  # σ_B ≈ 1: σ_B/σ ≈ 10 .. 0.05
        m.running_mean.copy_(torch.tensor([-3.0, -0.1, 0.0, 0.2, 40.0]))
    m.r_max.fill_(2.0)
    m.d_max.fill_(0.5)
    m.record = False
    x = _batch()
    mean, var, _ = _stats(x)
    std = torch.sqrt(var + m.eps)
    ratio = std / m.running_std
    d_raw = (mean - m.running_mean) / m.running_std
    assert (ratio > 2.0).any() and (ratio < 0.5).any() and ((ratio > 0.5) & (ratio < 2.0)).any()
    assert (d_raw > 0.5).any() and (d_raw < -0.5).any() and (d_raw.abs() < 0.5).any()
    r = torch.minimum(torch.maximum(ratio, torch.tensor(0.5)), torch.tensor(2.0))
    d = torch.minimum(torch.maximum(d_raw, torch.tensor(-0.5)), torch.tensor(0.5))
    v = lambda t: t.view(1, C, 1, 1)  # noqa: E731
    expected = ((x - v(mean)) / v(std) * v(r) + v(d)) * v(m.weight) + v(m.bias)
    m.train()
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ RNG and resume
def _draws():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randint(0, 10**6, (2,)).tolist()


def test_rng_state_round_trip_continues_every_global_stream(tmp_path):
    """After set_rng_state(rng_state()) — also through torch.save/torch.load, as in a checkpoint —
    python's, numpy's and torch's global generators continue exactly as if nothing had happened."""
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()
    state = rng_state()
    torch.save({"rng": state}, tmp_path / "c.pt")
    expected = [_draws() for _ in range(3)]
    for restore in (state, torch.load(tmp_path / "c.pt", weights_only=False)["rng"]):
        random.seed(99)
        np.random.seed(99)
        torch.manual_seed(99)  # some other stream in between
        set_rng_state(restore)
        assert [_draws() for _ in range(3)] == expected


def test_resume_continues_the_global_rng_stream(tmp_path):
    """The ImageNet loader with data.workers=0 augments with torch's global RNG in this process:
    a run stopped after one epoch and resumed draws the same crops as an uninterrupted run, so
    weights, histories and the final RNG state all agree."""
    make_image_folder(tmp_path / "imagenet")
    overrides = ["experiment=imagenet", f"data.root={tmp_path / 'imagenet'}", "data.num_classes=3",
                 "data.image_size=32", "data.workers=0", "model=resnet20", "norm=bn", "train.batch_size=4",
                 "train.eval_batch_size=6", "train.epochs=2", "train.progress=false", "device=cpu"]
    straight, chunked = tmp_path / "straight", tmp_path / "chunked"
    fit(make_cfg(overrides), str(straight))
    fit(make_cfg(overrides + ["train.stop_after=1"]), str(chunked))
    fit(make_cfg(overrides + ["resume=true"]), str(chunked))
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(chunked / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["rng"]["python"] == b["rng"]["python"]
    assert np.array_equal(a["rng"]["numpy"][1], b["rng"]["numpy"][1])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


# ------------------------------------------------------------------------------ CIFAR augmentation
def _unique_images(n, seed=0):
    """Images with every pixel in 1..255 (so zero padding is visible), labels = their index."""
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(1, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n))


def _pixels(x, mean, std):
    """Undo the loader's normalization: back to 0..255 integers."""
    return ((x.double() * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)) * 255).round().to(torch.int64)


def test_loader_crops_from_a_4_pixel_zero_padding_and_flips():
    """Every augmented training image is its original shifted by at most 4 pixels each way with
    zero fill, then maybe mirrored (torchvision's RandomCrop(32, padding=4) + horizontal flip); the
    extreme shifts ±4 and both flip states occur. Labels (= image index) say which original."""
    split = _unique_images(384)
    mean, std = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64), torch.tensor([0.2, 0.25, 0.3], dtype=torch.float64)
    batches = Batches(split, 64, mean, std, "cpu", train=True, augment=True, seed=0)
    padded = F.pad(split.images.to(torch.int64), (4, 4, 4, 4))
    found = []
    for x, y in batches.epoch(0):
        out = _pixels(x, mean, std)
        src = padded[y]
        matches = torch.zeros(len(y), 9, 9, 2, dtype=torch.bool)
        for top in range(9):
            for left in range(9):
                crop = src[:, :, top:top + 32, left:left + 32]
                matches[:, top, left, 0] = (crop == out).flatten(1).all(1)
                matches[:, top, left, 1] = (crop.flip(-1) == out).flatten(1).all(1)
        assert (matches.flatten(1).sum(1) == 1).all(), "an augmented image is no 4-pixel crop of its original"
        found.append(matches.flatten(1).float().argmax(1))
    idx = torch.cat(found)
    assert len(idx) == 384
    top, left, flip = idx // 18 - 4, idx // 2 % 9 - 4, idx % 2
    for shift in (top, left):
        assert shift.min() == -4 and shift.max() == 4
        assert len(set(shift.tolist())) == 9
    assert 0.3 < flip.double().mean() < 0.7


def test_loader_normalizes_with_the_training_sets_channel_statistics():
    """Without augmentation, the training set as the loader serves it has per-channel mean 0 and
    (population) standard deviation 1, and the test set is normalized with the same statistics."""
    cfg = make_cfg(["data=synthetic", "data.train_size=128", "data.test_size=64", "data.augment=false",
                    "train.batch_size=32", "train.eval_batch_size=64", "device=cpu"])
    train, test = make_loaders(cfg, torch.device("cpu"))
    xs = torch.cat([x for x, _ in train.epoch(0)]).double()
    assert xs.shape == (128, 3, 32, 32)
    torch.testing.assert_close(xs.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(xs.std((0, 2, 3), correction=0), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-5)
    raw = train.images.double() / 255
    mean, std = raw.mean((0, 2, 3)), raw.std((0, 2, 3), correction=0)
    xt = torch.cat([x for x, _ in test.epoch()]).double()
    expected = (test.images.double() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(xt, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ momentum
@pytest.mark.parametrize("norm,momentum", [("bn", 0.1), ("mbn", 0.1), ("brn", 0.01)])
def test_running_averages_follow_the_configured_momentum(norm, momentum):
    """With the shipped configs, each recorded batch moves the running averages by `momentum`
    (PyTorch's BN: 0.1, with the unbiased batch variance; BRN: 0.01 on the mean and σ)."""
    layer = build_norm(make_cfg([f"norm={norm}"]).norm)(C).double().train()
    x1, x2 = _batch(seed=1, shift=2.0, scale=3.0), _batch(seed=2, shift=-1.0, scale=0.5)
    mean, var = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for x in (x1, x2):
        layer(x)
        m, v, n = _stats(x)
        mean = (1 - momentum) * mean + momentum * m
        if norm == "brn":
            var = (1 - momentum) * var + momentum * torch.sqrt(v + layer.eps)  # σ, not σ²
        else:
            var = (1 - momentum) * var + momentum * v * n / (n - 1)
    torch.testing.assert_close(layer.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_std if norm == "brn" else layer.running_var, var, rtol=1e-12, atol=1e-12)
    assert int(layer.num_batches_tracked) == 2


# ------------------------------------------------------------------------------ tables
def test_mean_std_is_the_sample_statistics():
    mean, std, n = mean_std([1.0, 2.0, 4.0])
    assert n == 3 and mean == pytest.approx(7 / 3)
    assert std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert mean_std([5.0]) == (5.0, None, 1)  # one seed: no spread claimed
    assert mean_std([]) == (None, None, 0)


SWEEP_EXTRA = ["data=synthetic", "data.train_size=64", "data.test_size=32", "train.batch_size=32"]


def _fake_run(root, overrides, test_err):
    """A finished run directory as the trainer leaves it, named by its config's run id."""
    cfg = compose(overrides)
    d = root / run_id(cfg)
    d.mkdir()
    history = [{"epoch": e, "test_err": test_err + 10 * (2 - e), "train_err": 50.0} for e in (1, 2)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    (d / "metrics.json").write_text(json.dumps({"test_err": test_err, "finished": True}))
    (d / "run_record.json").write_text(json.dumps({
        "config": {}, "git": {"commit": "0123456789abcdef", "dirty": False}, "device": "cpu (test)",
        "versions": {"torch": torch.__version__}, "started": "2026-01-01T00:00:00+0000"}))


def test_table_cells_are_mean_and_sample_std_over_seeds(tmp_path):
    """Hand-made run dirs for table 6 (three seeds per memory size, one cell with a single
    seed): each cell shows the mean over its seeds ± the sample standard deviation (n − 1)."""
    root = tmp_path / "e2"
    root.mkdir()
    (root / "sweep_table6.json").write_text(json.dumps({"table": "table6", "epochs": 2, "seeds": [0, 1, 2],
                                                        "extra": SWEEP_EXTRA}))
    values = {"10": [7.0, 8.0, 12.0], "20": [9.5, 10.5, 11.0], "40": [20.0]}
    from mbn.sweeps import grids

    for block in grids(2)["table6"].blocks:
        for overrides in expand(block):
            k = next(o.split("=")[1] for o in overrides if o.startswith("norm.memory_size="))
            for seed, err in enumerate(values[k]):
                _fake_run(root, merge_overrides(overrides + [f"seed={seed}", "train.epochs=2"], SWEEP_EXTRA), err)
    sweep, grid, cells, runs = load_grid(str(root), "table6")
    assert len(runs) == 7
    rows = {r["memory size"]: r for r in table_rows(grid, cells, {})}
    for k, errs in values.items():
        assert rows[k]["n"] == len(errs) and rows[k]["mean"] == pytest.approx(statistics.fmean(errs))
        if len(errs) > 1:
            sample = math.sqrt(sum((e - statistics.fmean(errs)) ** 2 for e in errs) / (len(errs) - 1))
            assert rows[k]["std"] == pytest.approx(sample)
        else:
            assert rows[k]["std"] is None
    md, _ = render(grid, list(rows.values()), {})
    assert f"| 10 | mbn | {statistics.fmean(values['10']):.2f} ± {statistics.stdev(values['10']):.2f} | 3 |" in md
    assert "| 40 | mbn | 20.00 | 1 |" in md


# ------------------------------------------------------------------------------ run ids
BASE = ["data=cifar10", "model=resnet20", "norm=bn"]


@pytest.mark.parametrize("change", ["norm=mbn", "seed=1", "model=resnet56", "optim.lr=0.05",
                                    "train.batch_size=64", "train.epochs=3", "train.double_forward=true",
                                    "norm.eps=1e-3", "data.augment=false", "schedule.gamma=0.2"])
def test_run_id_changes_with_what_the_run_computes(change):
    assert run_changing(change.split("=")[0])
    assert run_id(make_cfg(BASE + [change])) != run_id(make_cfg(BASE))


@pytest.mark.parametrize("change", ["device=cuda", "logger=none", "logger=wandb", "logger.project=other",
                                    "data.root=/somewhere/else", "data.download=true", "train.progress=false",
                                    "train.eval_batch_size=17", "train.stop_after=1", "resume=true", "name=other"])
def test_run_id_ignores_run_free_settings(change):
    key = change.split("=")[0]
    assert not run_changing(key) and any(key == f or key.startswith(f + ".") for f in RUN_FREE)
    assert run_id(make_cfg(BASE + [change])) == run_id(make_cfg(BASE))


def test_run_changing_matches_whole_key_components():
    assert not run_changing("hydra.run.dir") and not run_changing("+logger.mode")
    assert run_changing("data.root_factor") and run_changing("devices")
