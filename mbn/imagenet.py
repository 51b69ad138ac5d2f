"""ImageNet (paper Table 3): an ImageFolder tree read by a multi-worker CPU DataLoader with the
standard pipeline: RandomResizedCrop + flip for training, resize + center crop for evaluation."""
import os

import torch
from torch.utils.data import DataLoader, DistributedSampler

from mbn import UserError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the usual ImageNet statistics


class LoaderBatches:
    """Same interface as mbn.data.Batches over a DataLoader: epoch(e) yields device batches;
    shuffling is a function of (seed, epoch), sharded over ranks by a DistributedSampler. Batches
    come from the host, so a CUDA graph cannot capture them (`capturable` is False)."""

    capturable = False

    def __init__(self, dataset, batch_size, device, train, seed, rank, world, workers, channels_last):
        self.device = torch.device(device)
        self.train, self.seed = train, seed
        per_rank = batch_size // world if train else batch_size
        if train and (batch_size % world or per_rank < 1):
            raise UserError(f"train.batch_size={batch_size} must be a positive multiple of the number of processes ({world})")
        self.sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=True) if train else None
        self.loader = DataLoader(dataset, per_rank, sampler=self.sampler, shuffle=False, num_workers=workers,
                                 pin_memory=self.device.type == "cuda", drop_last=train)
        self.num_samples = len(dataset)
        self.num_batches = len(self.loader)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self):
        return self.num_batches

    def start_epoch(self, epoch: int = 0) -> None:
        self._batches = self.epoch(epoch)

    def next_batch(self):
        x, y = next(self._batches)
        return x, y, torch.ones_like(y, dtype=torch.bool)

    def resized(self, batch_size: int):
        return self

    def epoch(self, epoch: int = 0, num_batches: int = None):
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            self.loader.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)  # augmentation
        for i, (x, y) in enumerate(self.loader):
            if num_batches is not None and i >= num_batches:
                break
            yield (x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format),
                   y.to(self.device, non_blocking=True))


def imagenet_loaders(cfg, device, rank=0, world=1, channels_last=False):
    from torchvision import datasets, transforms

    from mbn.data import folder_exists

    root, size = cfg.data.root, cfg.data.image_size
    for split in ("train", "val"):
        if not (folder_exists(root) and folder_exists(os.path.join(root, split))):
            raise UserError(f"ImageNet not found: expected {os.path.join(root, split)}/<class>/<image> "
                            "(torchvision ImageFolder layout, e.g. train/n01440764/*.JPEG); set data.root=<dir>")
    normalize = transforms.Normalize(MEAN, STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    val_tf = transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size),
                                 transforms.ToTensor(), normalize])
    train = datasets.ImageFolder(os.path.join(root, "train"), train_tf)
    val = datasets.ImageFolder(os.path.join(root, "val"), val_tf)
    if len(train.classes) != cfg.data.num_classes:
        raise UserError(f"{root}/train has {len(train.classes)} classes but data.num_classes={cfg.data.num_classes}; "
                        f"set data.num_classes={len(train.classes)}")
    workers = cfg.data.workers
    return (LoaderBatches(train, cfg.train.batch_size, device, True, cfg.seed, rank, world, workers, channels_last),
            LoaderBatches(val, cfg.train.eval_batch_size, device, False, 0, 0, 1, workers, channels_last))
