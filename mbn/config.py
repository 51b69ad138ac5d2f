"""Structured config schemas behind `configs/`: Hydra rejects unknown keys and wrong types
with its own clear message. Each yaml in a group starts from a schema registered here; the
checks of values (ranges, lengths) are in mbn/validate.py."""
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from mbn.norms import NORMS


@dataclass
class ModelConfig:
    name: str = MISSING


@dataclass
class DataConfig:
    """What every dataset has; each dataset's schema below adds only the fields it reads, so a
    config (and the run record) never lists settings that do not apply."""
    name: str = MISSING              # cifar10 | cifar100 | synthetic | imagenet
    num_classes: int = 10
    # dataset: standardize images with the training set's channel mean/std | bn: leave them in [0, 1]
    # for the model's own input BN (Revisiting-BN, norm=rbn). Default: the normalizer's norm.input_norm
    input_norm: str = "${oc.select:norm.input_norm,dataset}"


@dataclass
class CifarConfig(DataConfig):
    root: str = "data"               # holds cifar-10-batches-py/ or cifar-100-python/
    download: bool = True            # let torchvision download when the files are missing
    augment: bool = True             # pad-4 random crop + horizontal flip


@dataclass
class SyntheticConfig(DataConfig):
    augment: bool = True
    train_size: int = 2048
    test_size: int = 512
    seed: int = 0                    # the dataset is a function of this seed


@dataclass
class ImageNetConfig(DataConfig):
    root: str = "data/imagenet"      # ImageFolder tree: <root>/train/<class>/*, <root>/val/<class>/*
    download: bool = False           # never downloaded
    image_size: int = 224            # crop size
    workers: int = 8                 # DataLoader worker processes


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False


@dataclass
class ScheduleConfig:
    name: str = "step"
    milestones: List[float] = field(default_factory=lambda: [0.4, 0.6])  # fractions of training
    gamma: float = 0.1


@dataclass
class LoggerConfig:
    name: str = "console"            # console | wandb | none
    project: str = "mbn"
    entity: Optional[str] = None
    mode: Optional[str] = None       # W&B mode; null = offline unless an API key is configured


@dataclass
class TrainConfig:
    epochs: int = 200
    steps: Optional[int] = None      # SGD step budget; when set it replaces epochs
    batch_size: int = 128
    eval_batch_size: int = 1000
    double_forward: bool = MISSING   # train.yaml: ${norm.double_forward}, the paper's default
    stop_after: Optional[int] = None  # stop this invocation after N epochs (resume later)
    progress: bool = True            # tqdm bar
    time_limit: Optional[float] = None  # seconds: end this invocation at the last epoch boundary
                                     # that fits, with a checkpoint (resume later)
    precise_batches: int = 200       # PreciseBN at the end: training batches for test_err_precise (0: off)


@dataclass
class PerfConfig:
    """null/auto = the fast setting on a GPU (bf16 autocast, channels_last, torch.compile) and the
    exact one on a CPU (fp32, eager). Normalizer statistics and memory always stay fp32."""
    precision: str = "auto"          # auto | fp32 | bf16
    channels_last: Optional[bool] = None
    compile: Optional[bool] = None
    compile_mode: str = "default"    # default | reduce-overhead | max-autotune
    cuda_graph: Optional[bool] = None  # the whole training step as one CUDA graph replay (auto: on CUDA)
    compile_cache: Optional[str] = None  # a folder for torch.compile's caches, kept across processes and
                                     # machines (warm starts); null: $MBN_COMPILE_CACHE, else torch's own


@dataclass
class Config:
    model: ModelConfig = MISSING
    norm: Any = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    resume: Optional[bool] = None    # null: continue a checkpoint / skip a finished run found in
                                     # the run dir; true: must continue; false: must start fresh
    name: str = "default"            # experiment name: run dir, W&B group


# Each yaml in a group starts from its schema (`defaults: - /<name>@_here_`). The schemas are
# stored at the top level, not in the groups, so they are never offered as a choice (model=...).
SCHEMAS = {"model_schema": ModelConfig, "data_cifar_schema": CifarConfig,
           "data_synthetic_schema": SyntheticConfig, "data_imagenet_schema": ImageNetConfig,
           "optim_schema": OptimConfig, "schedule_schema": ScheduleConfig, "logger_schema": LoggerConfig}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, node in SCHEMAS.items():
        cs.store(name=name, node=node)
    for name, spec in NORMS.items():
        cs.store(name=f"norm_{name}_schema", node=spec.config)
