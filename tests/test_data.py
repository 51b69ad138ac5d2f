"""Data: torchvision's layout without md5 tables, augmentation identical to torchvision's."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from mbn import UserError
from mbn.data import Batches, channel_stats, crop_flip, crop_flip_indices, load_cifar, synthetic
from tests.conftest import SHARED_DATA


def test_crop_flip_equals_torchvision_for_the_same_offsets():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    rows, cols = crop_flip_indices(16, 32, 4, torch.Generator().manual_seed(1), "cpu")
    out = crop_flip(images, rows, cols, 4)
    for i in range(16):
        top = int(rows[i, 0])
        flipped = bool(cols[i, 0] > cols[i, 1])
        left = int(cols[i, -1]) if flipped else int(cols[i, 0])
        ref = TF.crop(TF.pad(images[i], [4]), top, left, 32, 32)  # RandomCrop(32, padding=4)
        if flipped:
            ref = TF.hflip(ref)  # RandomHorizontalFlip
        assert torch.equal(out[i], ref)


def test_crop_offsets_and_flips_are_uniform():
    rows, cols = crop_flip_indices(90_000, 32, 4, torch.Generator().manual_seed(2), "cpu")
    tops = torch.bincount(rows[:, 0], minlength=9).float() / 90_000
    assert tops.numel() == 9 and (tops - 1 / 9).abs().max() < 0.01
    flips = (cols[:, 0] > cols[:, 1]).float().mean()
    assert abs(flips - 0.5) < 0.01


def test_batches_are_a_function_of_seed_and_epoch():
    train, _ = synthetic(10, 64, 16, seed=0)
    mean, std = channel_stats(train.images)
    make = lambda seed: Batches(train, 16, mean, std, "cpu", True, True, seed)  # noqa: E731
    a = [x for x, _ in make(0).epoch(3)]
    b = [x for x, _ in make(0).epoch(3)]
    c = [x for x, _ in make(0).epoch(4)]
    d = [x for x, _ in make(1).epoch(3)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])


def test_training_batches_drop_last_and_eval_covers_everything():
    train, test = synthetic(10, 70, 30, seed=0)
    mean, std = channel_stats(train.images)
    tb = Batches(train, 16, mean, std, "cpu", True, False, 0)
    assert len(tb) == 4 and all(len(y) == 16 for _, y in tb.epoch(0))
    labels = torch.cat([y for _, y in tb.epoch(0)])
    assert len(set(labels.tolist())) > 1
    eb = Batches(test, 16, mean, std, "cpu", False, False)
    xs = torch.cat([x for x, _ in eb.epoch()])
    assert xs.shape[0] == 30
    expected = (test.images.double() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(xs.double(), expected, rtol=1e-6, atol=1e-6)


def test_synthetic_is_deterministic():
    a, b = synthetic(10, 32, 8, seed=3), synthetic(10, 32, 8, seed=3)
    assert torch.equal(a[0].images, b[0].images) and torch.equal(a[1].labels, b[1].labels)
    assert a[0].images.dtype == torch.uint8 and a[0].images.shape == (32, 3, 32, 32)


def write_fake_cifar(root, name):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, files, key = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels"
    else:
        folder, files, key = "cifar-100-python", ["train", "test"], "fine_labels"
    os.makedirs(os.path.join(root, folder))
    content = {}
    for f in files:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 4).tolist()
        content[f] = (data, labels)
        with open(os.path.join(root, folder, f), "wb") as fh:
            pickle.dump({"data": data, key: labels, "batch_label": f}, fh, protocol=2)
    return content


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_reads_torchvision_layout_without_md5(tmp_path, name):
    content = write_fake_cifar(str(tmp_path), name)
    train, test = load_cifar(name, str(tmp_path), download=False)
    test_file = "test_batch" if name == "cifar10" else "test"
    first = next(f for f in content if f != test_file)
    assert torch.equal(train.images[0], torch.from_numpy(content[first][0][0].reshape(3, 32, 32)))
    assert test.labels.tolist() == content[test_file][1]


def test_missing_cifar_names_the_fix(tmp_path):
    with pytest.raises(UserError, match="build_cifar.py --root") as e:
        load_cifar("cifar10", str(tmp_path), download=False)
    assert "cifar-10-batches-py" in str(e.value)
    with pytest.raises(UserError, match="data.download=true"):
        load_cifar("cifar100", str(tmp_path), download=False)


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED_DATA, "build_cifar.py")), reason="no ../shared/data")
def test_real_cifar10_from_the_offline_copy(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(SHARED_DATA, "build_cifar.py"), "--root", str(tmp_path),
                        "--dataset", "cifar10", "--no-numpy"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    train, test = load_cifar("cifar10", str(tmp_path))
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    # anchors from ../shared/data/README.md
    assert train.images[0, :, 0, 0].tolist() == [59, 62, 63] and train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert test.images[0, :, 0, 0].tolist() == [158, 112, 49] and test.labels[:4].tolist() == [3, 8, 8, 0]
    mean, std = channel_stats(train.images)
    torch.testing.assert_close(mean, torch.tensor([0.49139968, 0.48215841, 0.44653091], dtype=torch.float64), atol=1e-7, rtol=0)
    torch.testing.assert_close(std, torch.tensor([0.24703223, 0.24348513, 0.26158784], dtype=torch.float64), atol=1e-7, rtol=0)
