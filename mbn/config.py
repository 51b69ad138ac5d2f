"""Structured config schemas behind `configs/`: Hydra rejects unknown keys and wrong types
with its own clear message. Each yaml in a group starts from the schema registered here."""
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
    name: str = MISSING              # cifar10 | cifar100 | synthetic
    num_classes: int = 10
    root: str = "data"               # holds cifar-10-batches-py/ or cifar-100-python/
    download: bool = True            # let torchvision download when the files are missing
    augment: bool = True             # pad-4 random crop + horizontal flip
    train_size: int = 2048           # synthetic only
    test_size: int = 512             # synthetic only
    seed: int = 0                    # synthetic only: the dataset is a function of this seed
    image_size: int = 224            # imagenet only: crop size
    workers: int = 8                 # imagenet only: DataLoader worker processes


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
    log_every: int = 50              # steps between progress/step logs


@dataclass
class TrainConfig:
    epochs: int = 200
    steps: Optional[int] = None      # SGD step budget; when set it replaces epochs
    batch_size: int = 128
    eval_batch_size: int = 1000
    double_forward: bool = MISSING   # train.yaml: ${norm.double_forward}, the paper's default
    stop_after: Optional[int] = None  # stop this invocation after N epochs (resume later)
    progress: bool = True            # tqdm bar


@dataclass
class PerfConfig:
    """null/auto = the fast setting on a GPU (bf16 autocast, channels_last, torch.compile) and the
    exact one on a CPU (fp32, eager). Normalizer statistics and memory always stay fp32."""
    precision: str = "auto"          # auto | fp32 | bf16
    channels_last: Optional[bool] = None
    compile: Optional[bool] = None
    compile_mode: str = "default"    # default | reduce-overhead (CUDA graphs) | max-autotune


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


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="optim", name="schema", node=OptimConfig)
    cs.store(group="schedule", name="schema", node=ScheduleConfig)
    cs.store(group="logger", name="schema", node=LoggerConfig)
    for name, spec in NORMS.items():
        cs.store(group="norm", name=f"{name}_schema", node=spec.config)
