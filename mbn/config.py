"""Structured config schemas behind `configs/`, each key declared with what it is and its
constraints (`key(...)`, mbn/validate.py): Hydra rejects wrong types, `mbn.validate.problems`
checks every declared range, choice and relation, and --help is written from the same
declarations. Nothing here imports torch (see `norm_configs`)."""
import ast
import functools
import glob
import os
from dataclasses import dataclass, field, is_dataclass
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from mbn.validate import (Each, Folder, Matches, NotBelow, OneOf, Pattern, Range, Stages, When, count, fractions, key,  # noqa: F401
                          nonnegative, optional, positive, unit, whole)

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
NORMS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "norms")


def group_options(group: str) -> list:
    """The options of a config group: the yaml files in configs/<group>/."""
    return sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIGS, group, "*.yaml")))


def config_groups() -> dict:
    """{group: its options} for every config group (the folders of configs/)."""
    return {g: group_options(g) for g in sorted(os.listdir(CONFIGS)) if os.path.isdir(os.path.join(CONFIGS, g))}


def norm_names() -> list:
    return sorted(norm_configs())


@dataclass
class NormConfig:
    """What every normalizer's config has (each normalizer's file declares the rest)."""
    name: str = key("bn", "the normalizer", OneOf(norm_names))
    double_forward: bool = key(False, "the method's default training scheme (train.double_forward)")
    eps: float = key(1e-5, "the normalizer's eps", positive)


@dataclass
class ModelConfig:
    name: str = key(MISSING, "the network", OneOf(lambda: group_options("model")))


CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}


@dataclass
class DataConfig:
    """What every dataset has; each dataset's schema below adds only the fields it reads, so a
    config (and the run record) never lists settings that do not apply."""
    name: str = key(MISSING, "the dataset", OneOf(lambda: group_options("data")))
    num_classes: int = key(10, "the number of classes", count, Matches("data.name", CIFAR_CLASSES))
    input_norm: str = key("${oc.select:norm.input_norm,dataset}",
                          "the input scaling (dataset: standardized with the training set's channel mean/std; bn: "
                          "[0, 1] images for the model's own input BN, norm=rbn; default: the norm's input_norm)",
                          OneOf(["dataset", "bn"]), When("bn", "norm.input_norm"),
                          When("bn", "data.name", OneOf(["cifar10", "cifar100", "synthetic"])),
                          note="data.input_norm=dataset works with every dataset and normalizer")


@dataclass
class CifarConfig(DataConfig):
    name: str = key(MISSING, "the dataset", OneOf(list(CIFAR_CLASSES)))
    root: str = key("data", "the folder holding cifar-10-batches-py/ or cifar-100-python/", Folder())
    download: bool = key(True, "let torchvision download the files when they are missing")
    augment: bool = key(True, "pad-4 random crop + horizontal flip")


@dataclass
class SyntheticConfig(DataConfig):
    name: str = key(MISSING, "the dataset", OneOf(["synthetic"]))
    augment: bool = key(True, "pad-4 random crop + horizontal flip")
    train_size: int = key(2048, "the synthetic training set size", count, NotBelow("train.batch_size"))
    test_size: int = key(512, "the synthetic test set size", count)
    seed: int = key(0, "the seed the dataset is generated from", whole)


@dataclass
class ImageNetConfig(DataConfig):
    name: str = key(MISSING, "the dataset", OneOf(["imagenet"]))
    root: str = key("data/imagenet", "ImageFolder tree: <root>/train/<class>/*, <root>/val/<class>/*", Folder())
    download: bool = key(False, "ImageNet is never downloaded", OneOf([False]))
    image_size: int = key(224, "the crop size", count)
    workers: int = key(8, "DataLoader worker processes", whole)


@dataclass
class OptimConfig:
    name: str = key("sgd", "the optimizer", OneOf(["sgd"]))
    lr: float = key(0.1, "the learning rate", positive, note="the paper's is 0.1")
    momentum: float = key(0.9, "SGD's momentum", unit)
    weight_decay: float = key(1e-4, "the weight decay", nonnegative)
    nesterov: bool = key(False, "Nesterov momentum", None, When(True, "optim.momentum", positive))


@dataclass
class ScheduleConfig:
    name: str = key("step", "the lr schedule", OneOf(["step"]))
    milestones: List[float] = key([0.4, 0.6], "the lr milestones (lr times gamma at these fractions of training)",
                                  fractions)
    gamma: float = key(0.1, "the lr decay factor", positive)


@dataclass
class LoggerConfig:
    name: str = key("console", "the logger", OneOf(["console", "wandb", "none"]),
                    note="console: a progress bar and epoch lines; wandb: also W&B; none: epoch lines only")
    project: str = key("mbn", "W&B project", Pattern(r".+", "a non-empty name"))
    entity: Optional[str] = key(None, "W&B entity (null: the key's default)")
    mode: Optional[str] = key(None, "the W&B mode", OneOf(["online", "offline", "disabled"], optional=True),
                              note="null: online with an API key (offline if the server does not answer), else "
                                   "offline")


@dataclass
class TrainConfig:
    epochs: int = key(200, "the number of epochs", count, note="or set train.steps")
    steps: Optional[int] = key(None, "the step budget (SGD steps; replaces train.epochs)", optional(count))
    batch_size: int = key(128, "the batch size", count)
    eval_batch_size: int = key(1000, "the evaluation batch size", count)
    double_forward: bool = key(MISSING, "record statistics in a second forward after the step "
                                        "(default: the normalizer's)")
    stop_after: Optional[int] = key(None, "the epochs of this invocation (continue later)", optional(count))
    progress: bool = key(True, "show a progress bar")
    time_limit: Optional[float] = key(None, "this invocation's time limit in seconds (it ends at the last epoch "
                                            "boundary that fits, with a checkpoint)", optional(positive))
    precise_batches: int = key(200, "the training batches PreciseBN averages over at the end (test_err_precise)",
                               whole, note="0 turns it off")


@dataclass
class PerfConfig:
    """null/auto = the fast setting on a GPU (bf16 autocast, channels_last, torch.compile) and the
    exact one on a CPU (fp32, eager). Normalizer statistics and memory always stay fp32."""
    precision: str = key("auto", "autocast precision", OneOf(["auto", "fp32", "bf16"]))
    channels_last: Optional[bool] = key(None, "channels_last memory format (null: on a GPU)")
    compile: Optional[bool] = key(None, "torch.compile the model (null: on a GPU)")
    compile_mode: str = key("default", "torch.compile's mode", OneOf(["default", "reduce-overhead", "max-autotune"]))
    cuda_graph: Optional[bool] = key(None, "the whole training step as one CUDA graph replay (null: on CUDA)")
    compile_cache: Optional[str] = key("${oc.env:MBN_COMPILE_CACHE,null}", "torch.compile's cache, kept across "
                                       "processes and machines", Folder(optional=True),
                                       note="null: torch's own")


DEVICE = Pattern(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N")


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
    seed: int = key(0, "the seed", Range(0, 2**31, high_open=True, integer=True))
    deterministic: bool = key(False, "deterministic algorithms (slower on a GPU)")
    device: str = key("auto", "the device", DEVICE)
    resume: Optional[bool] = key(None, "whether to continue the run dir's run", note="null: continue a checkpoint "
                                 "or skip a finished run found in it; true: must continue; false: must start fresh")
    name: str = key("default", "the experiment's name (runs/<name>/, the W&B group)",
                    Pattern(r"[^/\\]+", "a name without slashes"))


# ------------------------------------------------------------------ the normalizers' schemas
_LIGHT = ("dataclasses", "typing", "mbn.validate", "mbn.config", "__future__")


def _literal(node) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def _declared_configs(path: str) -> Optional[dict]:
    """{name: config dataclass} of one normalizer file, read without running it: its dataclasses,
    their torch-free imports and its literal constants are executed on their own, the name is
    taken from its `register("<name>", NormSpec(<Layer>, <Config>, ...))` line. None where that does not work (a
    config that uses something else of its module): the caller then imports the package."""
    tree = ast.parse(open(path).read(), path)
    keep, names = [], {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if all(m and m.split(".")[0] in ("dataclasses", "typing", "__future__") or m in _LIGHT for m in modules):
                keep.append(node)
        elif isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list):
            keep.append(node)
        elif isinstance(node, ast.Assign) and _literal(node.value):  # a constant the config may name
            keep.append(node)
        elif (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
              and ast.unparse(node.value.func) == "register"):
            args = node.value.args
            spec = args[1] if len(args) > 1 and isinstance(args[1], ast.Call) else None
            config = (spec.args[1] if spec is not None and len(spec.args) > 1 else
                      next((k.value for k in spec.keywords if k.arg == "config"), None) if spec is not None else None)
            if not isinstance(args[0], ast.Constant) or not isinstance(config, ast.Name):
                return None
            names[args[0].value] = config.id
    namespace = {"__name__": "mbn.norms." + os.path.basename(path)[:-3], "NormConfig": NormConfig}
    try:
        exec(compile(ast.Module(body=keep, type_ignores=[]), path, "exec"), namespace)
        found = {name: namespace[cls] for name, cls in names.items()}
    except Exception:  # noqa: BLE001  (NameError and the like: the slow path imports the module)
        return None
    return found if all(is_dataclass(c) for c in found.values()) else None


@functools.lru_cache(maxsize=None)
def _norm_configs() -> tuple:
    found = {}
    for path in sorted(glob.glob(os.path.join(NORMS_DIR, "*.py"))):
        if os.path.basename(path) in ("__init__.py", "base.py", "registry.py"):
            continue
        configs = _declared_configs(path)
        if configs is None:  # import the normalizers (torch): correct, only slower
            from mbn.norms import NORMS

            return tuple((name, spec.config) for name, spec in sorted(NORMS.items()))
        found.update(configs)
    return tuple(sorted(found.items()))


def norm_configs() -> dict:
    """{name: config dataclass} of every normalizer in mbn/norms/, without importing torch."""
    return dict(_norm_configs())


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
    for name, config in norm_configs().items():
        cs.store(name=f"norm_{name}_schema", node=config)
