"""The paper's experiments, and the studies that test them, as grids of config overrides.

A grid is a list of blocks; a block maps a config key to the values to sweep (Cartesian
product). `scripts/sweep.py` turns a block into one Hydra multirun; `scripts/make_tables.py`
expands the same blocks to find each cell's runs (mbn.results). A block may carry a `_label`:
a row name, with `{key}` replaced by the value of that key, for grids whose rows are variants
rather than the values of one config key (the ablation).

Every grid names a reference cell for each cell (`ref_row`, `ref_col`; None: the cell's own row
or column): the tables show each cell's paired difference to it."""
import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

MODELS = ["nin", "resnet20", "resnet56", "vgg16"]
NORMS = ["normprop", "bn", "brn", "mbn"]
BS128_STEPS_PER_EPOCH = 50_000 // 128  # CIFAR, last partial batch dropped: 390
PAPER_EPOCHS = 200  # "All the experiments are performed with 200 training epochs"; Table 4: 200 × 390 steps
LABEL = "_label"  # a block entry that names the row, not a config key

# the small-batch study (issue 11): every normalizer of the seed papers, batch sizes down to 2
SMALL_BATCH_NORMS = ["bn", "brn", "mbn", "cbn", "mabn", "rbn", "gn"]
SMALL_BATCHES = [2, 4, 8, 16, 32, 64, 128]
PAPER_SMALLEST_BATCH = 8  # Table 4's batch sizes: 8 .. 128
LR_AT_128 = 0.1


@dataclass
class Grid:
    name: str
    title: str
    blocks: List[Dict[str, Sequence]]
    row: str                 # config key whose value names the table row ("_label": the block's label)
    col: str                 # config key whose value names the column
    rows: Sequence = ()
    cols: Sequence = ()
    row_label: str = ""
    col_label: str = ""
    metric: str = "test_err"  # the final epoch's value (mbn.results)
    sweep: str = ""           # whose runs it reads (default: its own name)
    ref_row: object = None    # the reference cell's row (None: the cell's own)
    ref_col: object = None    # the reference cell's column (None: the cell's own)
    ref_text: str = "BN-1 in the same column (same model, data, batch size and schedule)"
    claims: str = "paper"     # "paper": the sign of the paper's own difference; "same": it claims none
    derived: Dict[str, Tuple[str, str]] = field(default_factory=dict)  # row -> (source row, metric)
    paper_table: bool = True  # the paper has numbers for this grid (results/paper.json)
    train_err: bool = False   # show the final train error beside the test error (underfitting shows there)
    row_notes: Dict[object, str] = field(default_factory=dict)  # row -> a note shown with its label
    epochs: int = PAPER_EPOCHS  # the schedule the grid was built for (grids())
    steps_per_epoch: int = BS128_STEPS_PER_EPOCH

    def __post_init__(self):
        self.sweep = self.sweep or self.name
        if self.row == LABEL and not self.rows:
            self.rows = [lab for b in self.blocks for _, lab in expand_labeled(b)] + list(self.derived)

    def metric_of(self, row, col) -> str:
        """The metric a cell reports: a derived row's or column's, else the grid's."""
        return (self.derived.get(row) or self.derived.get(col) or (None, self.metric))[1]

    def on_paper_schedule(self) -> bool:
        """The paper's 200 epochs (Table 4: their step budget at batch 128 on CIFAR's 50,000 images)."""
        return self.epochs == PAPER_EPOCHS and self.steps_per_epoch == BS128_STEPS_PER_EPOCH


def _cifar_table(name, data):
    return Grid(name, f"{data.upper()} test error (%) (paper Table {name[-1]})",
                [{"data": [data], "model": MODELS, "norm": ["bn", "brn", "mbn"]},
                 {"data": [data], "model": ["nin", "vgg16"], "norm": ["normprop"]}],
                row="norm.name", col="model.name", rows=NORMS, cols=MODELS, row_label="method", col_label="model",
                ref_row="bn", train_err=True)


def _imagenet_table(name, metric, what):
    return Grid(name, f"ImageNet {what} error (%), single crop (paper Table 3)",
                [{"experiment": ["imagenet"], "model": ["vgg16_imagenet", "resnet18", "resnet34", "resnet50"],
                  "norm": ["bn", "mbn"]}],
                row="model.name", col="norm.name", rows=["vgg16_imagenet", "resnet18", "resnet34", "resnet50"],
                cols=["bn", "mbn"], row_label="model", col_label="method", metric=metric, sweep="table3",
                ref_col="bn", ref_text="BN-1 for the same network")


def lam_shift(epochs: int, delay_epochs: float = 5) -> List[float]:
    """λ milestones `delay_epochs` after each lr drop (40 % and 60 %), as fractions of training;
    the delay is capped at a fifth of training so that both switches happen on short schedules."""
    d = min(delay_epochs / epochs, 0.2)
    return [round(0.4 + d, 6), round(0.6 + d, 6)]


MBN_PAPER = "MBN-2, the paper's defaults (k = 10, η = 0.9, λ = {0.1, 0.5, 0.9}, newest slot λ, memory inference)"


# λ falls as the lr falls: the paper's three values for the same fractions of training, in reverse
# order. MBN-2 led while the lr was 0.1 (λ = 0.1) and fell behind when λ rose with each lr drop; if a
# high λ at a small lr causes that, this schedule ends with a lower train error than MBN-2's.
LAM_FALLING = [0.9, 0.5, 0.1]


def _ablation(epochs: int) -> Grid:
    """ResNet-20 / CIFAR-10: each MBN option that could explain a gap to the paper, one at a time,
    every variant paired with BN-1 on the same seeds (issues 10 §2, 17 §5)."""
    base = {"model": ["resnet20"], "norm": ["mbn"]}
    shift = lam_shift(epochs)
    delay = round((shift[0] - 0.4) * epochs, 2)
    blocks = [
        {"model": ["resnet20"], "norm": ["bn"], LABEL: "BN-1 (reference)"},
        {"model": ["resnet20"], "norm": ["bn"], "train.double_forward": [True],
         LABEL: "BN-2 (double forward: running averages from the second forward)"},
        {**base, LABEL: MBN_PAPER},
        # λ = 0 through MBN's own code, single forward like BN-1: a control that must equal BN-1
        {**base, "norm.lam": [[0.0]], "train.double_forward": [False],
         LABEL: "MBN λ = 0, single forward (control: must equal BN-1)"},
        {**base, "norm.newest_weight": ["one"], LABEL: "newest slot weight 1 (α_k = 1, the sentence before eq. 8)"},
        {**base, "norm.lam": [[0.5], [0.1], [0.9]], LABEL: "λ = {norm.lam} throughout"},
        {**base, "norm.lam": [LAM_FALLING], LABEL: "λ = {norm.lam}: λ falls as the lr falls"},
        {**base, "norm.lam_milestones": [shift],
         LABEL: f"λ steps {delay:g} epochs after each lr drop (at {{norm.lam_milestones}} of training)"},
        {**base, "norm.memory_size": [2, 5, 10, 20], LABEL: "memory size k = {norm.memory_size}"},
        {**base, "norm.eta": [0.5, 0.9, 1.0], LABEL: "η = {norm.eta}"},
        {**base, "norm.grad": ["renorm"], LABEL: "gradient: BN's, memory as constant Batch-Renorm r, d"},
        {**base, "perf.precision": ["fp32", "bf16"], LABEL: "precision {perf.precision}"},
        {**base, "train.double_forward": [False], LABEL: "MBN-1 (single forward)"},
    ]
    derived = {"MBN-2 inference: memory (the paper)": (MBN_PAPER, "test_err"),
               "MBN-2 inference: running averages": (MBN_PAPER, "test_err_running"),
               "MBN-2 inference: precise (PreciseBN, final weights)": (MBN_PAPER, "test_err_precise"),
               "BN-1 inference: precise (PreciseBN, final weights)": ("BN-1 (reference)", "test_err_precise")}
    return Grid("mbn_ablation", "ResNet-20 CIFAR-10 test error (%): MBN ablation, every variant paired with BN-1",
                blocks, row=LABEL, col="model.name", cols=["resnet20"], row_label="variant", col_label="model",
                ref_row="BN-1 (reference)", ref_text="BN-1 on the same seeds", derived=derived, paper_table=False,
                train_err=True)


BN_PRECISE = "bn (PreciseBN)"  # BN's runs, inferred with statistics recomputed with the final weights


def _small_batch(protocol: str, epochs: int, steps_per_epoch: int) -> Grid:
    notes = {}
    if protocol == "steps":
        blocks = [{"model": ["resnet20"], "norm": SMALL_BATCH_NORMS, "train.batch_size": SMALL_BATCHES,
                   "train.steps": [epochs * steps_per_epoch]}]
        how = "every batch size given the batch-128 run's SGD steps, lr 0.1 (the paper's Table 4 rule)"
        notes = {bs: f"below {PAPER_SMALLEST_BATCH}: outside the paper's rule, no verdict"
                 for bs in SMALL_BATCHES if bs < PAPER_SMALLEST_BATCH}
    else:
        blocks = [{"model": ["resnet20"], "norm": SMALL_BATCH_NORMS, "train.batch_size": [bs],
                   "optim.lr": [small_batch_lr(bs)]} for bs in SMALL_BATCHES]
        how = "every batch size given the same epochs, lr 0.1 · batch / 128"
    return Grid(f"small_batch_{protocol}", f"ResNet-20 CIFAR-10 test error (%) by batch size and normalizer: {how}",
                blocks, row="train.batch_size", col="norm.name", rows=SMALL_BATCHES,
                cols=SMALL_BATCH_NORMS + [BN_PRECISE], row_label="batch size", col_label="method", ref_col="bn",
                ref_text="BN (running averages) at the same batch size", paper_table=False,
                derived={BN_PRECISE: ("bn", "test_err_precise")}, row_notes=notes)


def small_batch_lr(batch_size: int) -> float:
    return round(LR_AT_128 * batch_size / 128, 10)


def grids(epochs: int, steps_per_epoch: int = BS128_STEPS_PER_EPOCH) -> Dict[str, Grid]:
    """All experiments at a schedule of `epochs` (the paper: 200). Table 4 gives every batch size
    the SGD step budget of the batch-128 run."""
    steps = epochs * steps_per_epoch
    made = [
        _cifar_table("table1", "cifar10"),
        _cifar_table("table2", "cifar100"),
        Grid("table4", "ResNet-56 CIFAR-10 test error (%) by batch size, same number of SGD steps (paper Table 4)",
             [{"model": ["resnet56"], "norm": ["bn", "mbn"], "train.batch_size": [8, 16, 32, 64, 128],
               "train.steps": [steps]}],
             row="train.batch_size", col="norm.name", rows=[8, 16, 32, 64, 128], cols=["bn", "mbn"],
             row_label="batch size", col_label="method", ref_col="bn", ref_text="BN-1 at the same batch size"),
        Grid("table5", "ResNet-56 MBN CIFAR-10 test error (%) by λ schedule (paper Table 5)",
             # λ = {0} is BN (the paper: its number is BN-1's): MBN with λ = 0 throughout trains and
             # infers as BN, and runs with single forward like BN-1
             [{"model": ["resnet56"], "norm": ["mbn"], "norm.lam": [[0.0]], "train.double_forward": [False]},
              {"model": ["resnet56"], "norm": ["mbn"], "norm.lam": [[0.1], [0.5], [0.9], [0.1, 0.5, 0.9]]}],
             row="norm.lam", col="norm.name", rows=[[0.0], [0.1], [0.5], [0.9], [0.1, 0.5, 0.9]], cols=["mbn"],
             row_label="λ", col_label="method", ref_row=(0.1, 0.5, 0.9),
             ref_text="the paper's schedule λ = {0.1, 0.5, 0.9}, the setting the paper says beats every constant"),
        Grid("table6", "ResNet-20 MBN CIFAR-10 test error (%) by memory size (paper Table 6)",
             [{"model": ["resnet20"], "norm": ["mbn"], "norm.memory_size": [10, 20, 40]}],
             row="norm.memory_size", col="norm.name", rows=[10, 20, 40], cols=["mbn"],
             row_label="memory size", col_label="method", ref_row=10,
             ref_text="memory size 10 (our default in Tables 1-5)", claims="same"),
        _imagenet_table("table3", "test_err", "top-1"),
        _imagenet_table("table3_top5", "test_err5", "top-5"),
        Grid("figure1", "ResNet-56 CIFAR-10: single vs double forward (paper Figure 1)",
             [{"model": ["resnet56"], "norm": ["bn", "brn", "mbn"], "train.double_forward": [False, True]}],
             row="norm.name", col="train.double_forward", rows=["bn", "brn", "mbn"], cols=[False, True],
             row_label="method", col_label="double forward", ref_col=False,
             # the figure's claims are each method's gain from the second forward (its text: MBN-2
             # 0.30 below MBN-1, BRN-2 0.47 below BRN-1, BN "negligibly"); Table 1 compares with BN-1
             ref_text="the same method with a single forward (X-2 vs X-1)"),
        Grid("figure2", "CIFAR-10 train/test error curves, BN vs MBN (paper Figure 2)",
             [{"model": ["resnet20", "resnet56", "vgg16"], "norm": ["bn", "mbn"]}],
             row="model.name", col="norm.name", rows=["resnet20", "resnet56", "vgg16"], cols=["bn", "mbn"],
             row_label="model", col_label="method", ref_col="bn", ref_text="BN-1 for the same model"),
        _ablation(epochs),
        _small_batch("steps", epochs, steps_per_epoch),
        _small_batch("epochs", epochs, steps_per_epoch),
    ]
    for g in made:
        g.epochs, g.steps_per_epoch = epochs, steps_per_epoch
    return {g.name: g for g in made}


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
        if key == LABEL:
            continue
        vals = [format_value(v) for v in values]
        if any(isinstance(v, (list, tuple)) for v in values):
            out.append(f"{key}=choice({','.join(vals)})" if len(vals) > 1 else f"{key}={vals[0]}")
        else:
            out.append(f"{key}={','.join(vals)}")
    return out


def value_label(v) -> str:
    """How a config value names a row or column: {0.1, 0.5} for lists, single/double for booleans."""
    if isinstance(v, (list, tuple)):
        return "{" + ", ".join(f"{x:g}" for x in v) + "}"
    if isinstance(v, bool):
        return "double" if v else "single"
    return str(v)


def expand_labeled(block: Dict[str, Sequence]) -> List[Tuple[List[str], Optional[str]]]:
    """Every single run of a block: (plain overrides, its row label or None)."""
    keys = [k for k in block if k != LABEL]
    out = []
    for combo in itertools.product(*(block[k] for k in keys)):
        label = block.get(LABEL)
        if label is not None:
            for k, v in zip(keys, combo):
                label = label.replace("{" + k + "}", value_label(v))
        out.append(([f"{k}={format_value(v)}" for k, v in zip(keys, combo)], label))
    return out


def expand(block: Dict[str, Sequence]) -> List[List[str]]:
    """Every single run of a block, as plain overrides."""
    return [o for o, _ in expand_labeled(block)]
