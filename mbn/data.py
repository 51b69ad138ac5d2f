"""CIFAR-10/100 and a synthetic CIFAR-shaped dataset, served as device-resident batches.

The whole dataset lives as one uint8 tensor on the training device; shuffling, random crop
(pad 4) and horizontal flip run there as tensor ops, seeded per epoch, so an epoch's batches
are a pure function of (seed, epoch) and a resumed run sees exactly the same data.
"""
import errno
import math
import os
import pickle
import stat
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mbn import UserError
from mbn.cli import environment_fault
from mbn.config import CIFAR_CLASSES

LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}
OFFLINE_HINT = ("rebuild the offline copy with `python ../shared/data/build_cifar.py --root {root} "
                "--dataset cifar10`")


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, 32, 32) uint8
    labels: torch.Tensor  # (N,) int64


def folder_exists(path: str, key: str = "data.root") -> bool:
    """Whether the folder `path` exists; a path this user may not read, or a file where a folder
    belongs, is said so (one line naming `key`), never reported as missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        raise UserError(f"{key}: {path} runs through a file, not a folder; set {key}=<folder>") from None
    except PermissionError as e:
        raise environment_fault(e, f"cannot read {key}:") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{key}={path} is a file, not a folder; set {key} to the folder that holds the dataset")
    if not os.access(path, os.R_OK | os.X_OK):
        raise environment_fault(PermissionError(errno.EACCES, "Permission denied", path), f"cannot read {key}:")
    return True


def _read_pickles(folder, names, label_key, classes, rebuild):
    images, labels = [], []
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(entry[label_key])
            # a damaged or foreign file must not reach the loss (an IndexError mid-epoch, files
            # already written) nor pair images with the wrong labels
            if y.shape != (len(x),):
                raise ValueError(f"{y.size} labels for {len(x)} images")
            if not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"labels of type {y.dtype}, expected integers")
            if len(y) and not 0 <= y.min() <= y.max() < classes:
                raise ValueError(f"labels {y.min()}..{y.max()}, expected 0..{classes - 1}")
            images.append(x)
            labels.append(y.astype(np.int64))
        except PermissionError as e:  # the machine's, not a damaged file
            raise environment_fault(e, "cannot read") from None
        except Exception as e:  # noqa: BLE001  (a cut-short or foreign file fails in many ways)
            text = str(e).strip().splitlines()
            raise UserError(f"{path} is unreadable ({type(e).__name__}{': ' + text[0] if text else ''}); "
                            f"{rebuild}") from None
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def load_cifar(name: str, root: str, download: bool = False):
    """Read torchvision's on-disk layout directly (no md5 tables: the offline CIFAR-10 copy is
    pixel-exact but cannot carry torchvision's checksums). Returns (train, test) Splits."""
    folder_name, train_files, test_files, label_key = LAYOUT[name]
    folder = os.path.join(root, folder_name)
    expected = train_files + test_files
    present = folder_exists(root) and folder_exists(folder, "data.root")
    missing = [f for f in expected if not present or not os.path.isfile(os.path.join(folder, f))]
    failed = None
    if missing and download:
        failed = _download(name, root)
        missing = [f for f in expected if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        what = (f"{name} not found in {folder}/" if len(missing) == len(expected) else
                f"{name} is incomplete: {folder}/ lacks {', '.join(missing)}")
        how = "set data.root=<dir holding it>"
        how += (", or " + OFFLINE_HINT.format(root=root)) if name == "cifar10" else ""
        how += (f"; downloading it failed ({failed})" if failed else
                ", or run with data.download=true where the internet is reachable" if not download else "")
        raise UserError(f"{what} (torchvision's layout: {', '.join(expected)}); {how}")
    rebuild = (OFFLINE_HINT.format(root=root) if name == "cifar10" else
               f"delete {folder}/ and rerun{'' if download else ' with data.download=true'} to download it again")
    train = _read_pickles(folder, train_files, label_key, CIFAR_CLASSES[name], rebuild)
    test = _read_pickles(folder, test_files, label_key, CIFAR_CLASSES[name], rebuild)
    return train, test


def _download(name, root):
    """torchvision's download; None on success, else why it failed (for the error message). It
    creates data.root only where its parent exists (a mistyped path is not built), and removes it
    again if the download failed and left it empty."""
    import torchvision

    parent = os.path.dirname(os.path.abspath(root))
    if not os.path.isdir(root) and not os.path.isdir(parent):
        return f"data.root={root} does not exist, nor does {parent}/; create it or fix data.root"
    created = not os.path.isdir(root)
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    try:
        cls(root, train=True, download=True)
    except Exception as e:  # noqa: BLE001  (offline, proxy, disk: all end in the same advice)
        if created and os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}{': ' + text[0] if text else ''}"
    return None


def synthetic(num_classes: int, train_size: int, test_size: int, seed: int = 0):
    """CIFAR-shaped uint8 images: a smooth random colour pattern per class plus per-image noise
    and shifts, so that a network can learn it and augmentation matters. Deterministic in seed."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=32, mode="bicubic", align_corners=False)

    def make(n):
        labels = torch.randint(0, num_classes, (n,), generator=g)
        noise = torch.randn(n, 3, 32, 32, generator=g) * 0.25
        x = templates[labels] * 0.8 + 0.1 + noise
        shift = torch.randint(-3, 4, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        return Split((x.clamp(0, 1) * 255).round().to(torch.uint8), labels)

    return make(train_size), make(test_size)


def load_dataset(cfg):
    """data config -> (train Split, test Split) on the CPU."""
    if cfg.name == "synthetic":
        return synthetic(cfg.num_classes, cfg.train_size, cfg.test_size, cfg.seed)
    if cfg.name in LAYOUT:
        return load_cifar(cfg.name, cfg.root, cfg.download)
    raise UserError(f"unknown dataset {cfg.name!r}; choose data=cifar10, cifar100, synthetic or imagenet")


def channel_stats(images: torch.Tensor):
    """Per-channel mean and std of uint8 images on the 0-1 scale, computed from the data."""
    x = images.to(torch.float64) / 255
    return x.mean((0, 2, 3)), x.std((0, 2, 3), correction=0)


def crop_flip_indices(n, size, pad, generator, device):
    """Row and column indices into a `pad`-padded image for a random crop of `size` and a random
    horizontal flip per sample: the distribution of torchvision's RandomCrop(size, padding=pad)
    followed by RandomHorizontalFlip()."""
    top = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=device)
    left = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator, device=device)
    flip = torch.rand(n, 1, generator=generator, device=device) < 0.5
    ar = torch.arange(size, device=device)
    rows = top + ar
    cols = left + torch.where(flip, size - 1 - ar, ar)
    return rows, cols


def crop_flip(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, pad: int) -> torch.Tensor:
    padded = F.pad(images, (pad, pad, pad, pad))  # zeros, as torchvision's default fill
    n = images.size(0)
    idx = torch.arange(n, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2)


class Batches:
    """A device-resident split served in fixed-size batches by device ops alone, so that a CUDA
    graph can capture the batch together with the step that consumes it.

    `start_epoch(e)` makes the epoch's plan on the device — the permutation and every sample's
    crop/flip offsets, seeded by (seed, epoch), so a resumed run sees exactly the same data — and
    rewinds a device cursor; each `next_batch()` gathers the cursor's batch and advances it.
    Training: reshuffled every epoch, the last partial batch dropped (static shapes). Evaluation:
    in order, the last batch padded and `valid` marking its real samples (never dropped). With
    several processes every rank draws the same global batch and keeps its slice, so the global
    batch equals a single-process run's."""

    capturable = True

    def __init__(self, split: Split, batch_size: int, mean, std, device, train: bool, augment: bool,
                 seed: int = 0, channels_last: bool = False, rank: int = 0, world: int = 1, pad: int = 4):
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size, self.train, self.augment, self.seed, self.pad = batch_size, train, augment, seed, pad
        self.device = torch.device(device)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        n = len(self.labels)
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1 (got {batch_size}); set train.batch_size / train.eval_batch_size")
        if train and n < batch_size:
            raise UserError(f"train.batch_size={batch_size} is larger than the training set ({n} images)")
        if train and batch_size % world:
            raise UserError(f"train.batch_size={batch_size} must be divisible by the number of processes ({world})")
        self.num_batches = n // batch_size if train else math.ceil(n / batch_size)
        self.num_samples = n
        self.rank, self.world = rank, world
        # the plan: static tensors, rewritten in place every epoch
        shape = (self.num_batches, batch_size)
        self.order = torch.arange(self.num_batches * batch_size, device=device).remainder(n).view(shape)
        self.valid = (torch.arange(self.num_batches * batch_size, device=device) < n).view(shape)
        size = split.images.size(-1)
        self.rows = torch.arange(pad, pad + size, device=device).expand(*shape, size).clone()
        self.cols = self.rows.clone()
        self.cursor = torch.zeros(1, dtype=torch.long, device=device)

    def __len__(self):
        return self.num_batches

    def generator(self, epoch: int):
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + epoch)
        return g

    def start_epoch(self, epoch: int = 0) -> None:
        if self.train:
            g = self.generator(epoch)
            n, used = self.num_samples, self.order.numel()
            self.order.copy_(torch.randperm(n, generator=g, device=self.device)[:used].view_as(self.order))
            if self.augment:
                rows, cols = crop_flip_indices(used, self.images.size(-1), self.pad, g, self.device)
                self.rows.copy_(rows.view_as(self.rows))
                self.cols.copy_(cols.view_as(self.cols))
        self.cursor.zero_()

    def next_batch(self):
        """(x, y, valid) of the cursor's batch, normalized, in the model's memory format."""
        idx = self.order.index_select(0, self.cursor).view(-1)
        valid = self.valid.index_select(0, self.cursor).view(-1)
        x, y = self.images.index_select(0, idx), self.labels.index_select(0, idx)
        if self.train and self.augment:
            x = crop_flip(x, self.rows.index_select(0, self.cursor)[0], self.cols.index_select(0, self.cursor)[0],
                          self.pad)
        if self.world > 1 and self.train:
            part = slice(self.rank * len(y) // self.world, (self.rank + 1) * len(y) // self.world)
            x, y, valid = x[part], y[part], valid[part]
        self.cursor.add_(1)
        x = ((x.float() / 255 - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        return x, y, valid

    def epoch(self, epoch: int = 0, num_batches: int = None):
        """Iterate over (x, y) host-side (the last evaluation batch trimmed to its real samples)."""
        self.start_epoch(epoch)
        for i in range(num_batches if num_batches is not None else self.num_batches):
            x, y, _ = self.next_batch()
            real = min(self.batch_size, self.num_samples - i * self.batch_size) if not self.train else len(y)
            yield x[:real], y[:real]

    def resized(self, batch_size: int) -> "Batches":
        """The same split, augmentation and seed in batches of another size (PreciseBN)."""
        split = Split(self.images, self.labels)
        return Batches(split, batch_size, self.mean.view(-1), self.std.view(-1), self.device, self.train, self.augment,
                       self.seed, self.memory_format == torch.channels_last, 0, 1, self.pad)


def make_loaders(cfg, device, rank: int = 0, world: int = 1, channels_last: bool = False):
    """(train batches, test batches) for the configured dataset."""
    input_norm = cfg.data.get("input_norm", "dataset")  # bn: [0, 1] images, for the model's own input BN
    if input_norm != "dataset" and (input_norm != "bn" or cfg.norm.get("input_norm") is None
                                    or cfg.data.name == "imagenet"):
        raise UserError(f"data.input_norm={input_norm} with norm={cfg.norm.name}, data={cfg.data.name}: use 'dataset'; "
                        "'bn' ([0, 1] images) needs CIFAR or synthetic data and a normalizer with an input BN "
                        "(one with a norm.input_norm key, e.g. norm=rbn)")
    if cfg.data.name == "imagenet":
        from mbn.imagenet import imagenet_loaders

        return imagenet_loaders(cfg, device, rank, world, channels_last)
    train, test = load_dataset(cfg.data)
    mean, std = channel_stats(train.images) if input_norm == "dataset" else (torch.zeros(3), torch.ones(3))
    return (Batches(train, cfg.train.batch_size, mean, std, device, True, cfg.data.augment, cfg.seed,
                    channels_last, rank, world),
            Batches(test, cfg.train.eval_batch_size, mean, std, device, False, False, 0, channels_last))
