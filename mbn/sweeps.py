"""The paper's experiments as grids of config overrides: one entry per table or figure.

A grid is a list of blocks; a block maps a config key to the values to sweep (Cartesian
product). `scripts/sweep.py` turns a block into one Hydra multirun; `scripts/make_tables.py`
expands the same blocks to find each cell's runs by their run id (mbn.naming)."""
import itertools
from dataclasses import dataclass
from typing import Dict, List, Sequence

MODELS = ["nin", "resnet20", "resnet56", "vgg16"]
NORMS = ["normprop", "bn", "brn", "mbn"]
BS128_STEPS_PER_EPOCH = 50_000 // 128  # CIFAR, last partial batch dropped: 390


@dataclass
class Grid:
    name: str
    title: str
    blocks: List[Dict[str, Sequence]]
    row: str                 # config key whose value names the table row
    col: str                 # config key whose value names the column
    rows: Sequence = ()
    cols: Sequence = ()
    row_label: str = ""
    col_label: str = ""
    metric: str = "test_err"  # final-epoch value reported
    sweep: str = ""           # whose runs it reads (default: its own name)

    def __post_init__(self):
        self.sweep = self.sweep or self.name


def _cifar_table(name, data):
    return Grid(name, f"{data.upper()} test error (%) (paper Table {name[-1]})",
                [{"data": [data], "model": MODELS, "norm": ["bn", "brn", "mbn"]},
                 {"data": [data], "model": ["nin", "vgg16"], "norm": ["normprop"]}],
                row="norm.name", col="model.name", rows=NORMS, cols=MODELS, row_label="method", col_label="model")


def _imagenet_table(name, metric, what):
    return Grid(name, f"ImageNet {what} error (%), single crop (paper Table 3)",
                [{"experiment": ["imagenet"], "model": ["vgg16_imagenet", "resnet18", "resnet34", "resnet50"],
                  "norm": ["bn", "mbn"]}],
                row="model.name", col="norm.name", rows=["vgg16_imagenet", "resnet18", "resnet34", "resnet50"],
                cols=["bn", "mbn"], row_label="model", col_label="method", metric=metric, sweep="table3")


def grids(epochs: int, steps_per_epoch: int = BS128_STEPS_PER_EPOCH) -> Dict[str, Grid]:
    """All experiments at a schedule of `epochs` (the paper: 200). Table 4 gives every batch size
    the SGD step budget of the batch-128 run."""
    steps = epochs * steps_per_epoch
    return {g.name: g for g in [
        _cifar_table("table1", "cifar10"),
        _cifar_table("table2", "cifar100"),
        Grid("table4", "ResNet-56 CIFAR-10 test error (%) by batch size, same number of SGD steps (paper Table 4)",
             [{"model": ["resnet56"], "norm": ["bn", "mbn"], "train.batch_size": [8, 16, 32, 64, 128],
               "train.steps": [steps]}],
             row="train.batch_size", col="norm.name", rows=[8, 16, 32, 64, 128], cols=["bn", "mbn"],
             row_label="batch size", col_label="method"),
        Grid("table5", "ResNet-56 MBN CIFAR-10 test error (%) by λ schedule (paper Table 5)",
             [{"model": ["resnet56"], "norm": ["mbn"],
               "norm.lam": [[0.0], [0.1], [0.5], [0.9], [0.1, 0.5, 0.9]]}],
             row="norm.lam", col="norm.name", rows=[[0.0], [0.1], [0.5], [0.9], [0.1, 0.5, 0.9]], cols=["mbn"],
             row_label="λ", col_label="method"),
        Grid("table6", "ResNet-20 MBN CIFAR-10 test error (%) by memory size (paper Table 6)",
             [{"model": ["resnet20"], "norm": ["mbn"], "norm.memory_size": [10, 20, 40]}],
             row="norm.memory_size", col="norm.name", rows=[10, 20, 40], cols=["mbn"],
             row_label="memory size", col_label="method"),
        _imagenet_table("table3", "test_err", "top-1"),
        _imagenet_table("table3_top5", "test_err5", "top-5"),
        Grid("figure1", "ResNet-56 CIFAR-10: single vs double forward (paper Figure 1)",
             [{"model": ["resnet56"], "norm": ["bn", "brn", "mbn"], "train.double_forward": [False, True]}],
             row="norm.name", col="train.double_forward", rows=["bn", "brn", "mbn"], cols=[False, True],
             row_label="method", col_label="double forward"),
        Grid("figure2", "CIFAR-10 train/test error curves, BN vs MBN (paper Figure 2)",
             [{"model": ["resnet20", "resnet56", "vgg16"], "norm": ["bn", "mbn"]}],
             row="model.name", col="norm.name", rows=["resnet20", "resnet56", "vgg16"], cols=["bn", "mbn"],
             row_label="model", col_label="method"),
    ]}


def format_value(v) -> str:
    """A value as a Hydra override understands it."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    return str(v)


def multirun_overrides(block: Dict[str, Sequence]) -> List[str]:
    """One Hydra multirun's overrides for a block (a list-valued key sweeps with choice())."""
    out = []
    for key, values in block.items():
        vals = [format_value(v) for v in values]
        if any(isinstance(v, (list, tuple)) for v in values):
            out.append(f"{key}=choice({','.join(vals)})" if len(vals) > 1 else f"{key}={vals[0]}")
        else:
            out.append(f"{key}={','.join(vals)}")
    return out


def expand(block: Dict[str, Sequence]) -> List[List[str]]:
    """Every single run of a block, as plain overrides."""
    keys = list(block)
    return [[f"{k}={format_value(v)}" for k, v in zip(keys, combo)]
            for combo in itertools.product(*(block[k] for k in keys))]
