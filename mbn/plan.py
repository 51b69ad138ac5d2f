"""The paper's suite as a plan: every run of its CIFAR tables and figures and of our studies, in
priority order, with each run's status in a runs directory and the GPU time the rest will take.

- Priority (`SUITE`): first the cells that decide the paper's main claim (Table 1, ResNet-20: BN-1,
  BRN-2, MBN-2), then ResNet-56, Tables 6, 5, 4, the figures, the rest of Tables 1 and 2, the MBN
  ablation and the small-batch study. A run that two blocks share (Figure 2's runs are Table 1's)
  is planned in the first and only counted in the others.
- Status: a run is found the way the tables find it (mbn.results.RunIndex: by the config it
  recorded, so a run made before a config key existed still counts): finished, diverged, partial
  (a checkpoint to continue from) or missing.
- Time (`Bench`): images/s per model, normalizer, forward scheme and batch size from
  results/bench.md, and its packed-processes ratio for runs sharing the GPU; "no estimate" where
  the bench lacks the pair.

`scripts/sweep.py plan` prints it; `scripts/sweep.py next` runs its unfinished runs within a time
budget (`execute`)."""
import copy
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from mbn import UserError
from mbn.naming import identity, run_changing, run_id
from mbn.results import DIVERGED, FINISHED, PARTIAL, REPO, RunIndex, compose, merge_overrides, steps_per_epoch_at_128
from mbn.sweeps import expand, grids

MISSING = "missing"
STATUSES = (FINISHED, PARTIAL, DIVERGED, MISSING)
CHECKPOINT = "checkpoint.pt"  # mbn.checkpoint.CHECKPOINT (that module imports torch; this one must not)
BENCH = os.path.join(REPO, "results", "bench.md")
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
EVAL_COST = 1 / 3       # a test image costs one forward, a training image a forward and a backward (~2 forwards)
STARTUP_S = 60.0        # a run's start: imports, data, compiling (issue 19: about a minute per configuration)


@dataclass(frozen=True)
class Step:
    """One block of the plan: a grid (mbn.sweeps), optionally limited to some models."""
    table: str
    title: str
    models: Optional[tuple] = None


SUITE = [
    Step("table1", "Table 1, ResNet-20: BN-1, BRN-2, MBN-2 (the paper's main claim)", ("resnet20",)),
    Step("table1", "Table 1, ResNet-56", ("resnet56",)),
    Step("table6", "Table 6: MBN memory size"),
    Step("table5", "Table 5: MBN λ schedule"),
    Step("table4", "Table 4: batch size at equal SGD steps"),
    Step("figure1", "Figure 1: single vs double forward"),
    Step("figure2", "Figure 2: BN vs MBN training curves"),
    Step("table1", "Table 1, NIN and VGG-16 (NormProp included)", ("nin", "vgg16")),
    Step("table2", "Table 2: CIFAR-100"),
    Step("mbn_ablation", "MBN ablation (our study)"),
    Step("small_batch_steps", "small-batch study, equal SGD steps (our study)"),
    Step("small_batch_epochs", "small-batch study, equal epochs (our study)"),
]
ALIASES = {"small_batch": ("small_batch_steps", "small_batch_epochs")}
NOT_PLANNED = "Table 3 (ImageNet, 8 GPUs) is not in the plan: python scripts/sweep.py table3 runs it"


def table_names() -> List[str]:
    """What --tables accepts."""
    return sorted({s.table for s in SUITE} | set(ALIASES))


def expand_tables(names: Optional[Sequence[str]]) -> Optional[set]:
    if not names:
        return None
    out = set()
    for n in names:
        if n not in table_names():
            raise UserError(f"--tables: unknown table {n!r}; choose from {', '.join(table_names())}")
        out.update(ALIASES.get(n, (n,)))
    return out


def choices(group: str) -> List[str]:
    """The options of a config group: the yaml files in configs/<group>/."""
    folder = os.path.join(REPO, "configs", group)
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))


def restrict(block: Optional[dict], key: str, wanted) -> Optional[dict]:
    """The block with `key` limited to `wanted` (None: unchanged); None when nothing is left."""
    if block is None or wanted is None or key not in block:
        return block
    kept = [v for v in block[key] if v in wanted]
    return dict(block, **{key: kept}) if kept else None


def check_restriction(grid_list, models, norms) -> None:
    """--models/--norms that leave none of these grids' cells is a mistake in the command (a
    sweep or plan of nothing would look done): one line naming what the grids have."""
    if models is None and norms is None:
        return
    blocks = [b for g in grid_list for b in g.blocks]
    if any(restrict(restrict(b, "model", models), "norm", norms) for b in blocks):
        return
    have = {key: sorted({str(v) for b in blocks for v in b.get(key, ())}) for key in ("model", "norm")}
    raise UserError(f"--models/--norms leave no run of {', '.join(g.name for g in grid_list)}, whose cells have "
                    f"models {', '.join(have['model']) or '(any)'} and norms {', '.join(have['norm']) or '(any)'}")


def default_name(epochs: int, extra: Sequence[str]) -> str:
    """A runs folder's name: e<epochs>, plus the data when an extra override replaces the grids'
    (e2-synthetic)."""
    data = [o.split("=", 1)[1] for o in extra if o.split("=", 1)[0] == "data"]
    return f"e{epochs}" + "".join(f"-{d}" for d in data if d != "cifar10")


# ------------------------------------------------------------------------------ configs, fast
_GROUPS = None
_BASES = {}


def cell_config(overrides: Sequence[str]):
    """What mbn.results.compose(overrides) returns, about 20x faster for a whole suite: Hydra
    composes each choice of config groups once, then the key=value overrides are applied to a copy
    with the function Hydra itself applies them with after composing."""
    global _GROUPS
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if _GROUPS is None:
        top = os.path.join(REPO, "configs")
        _GROUPS = {d for d in os.listdir(top) if os.path.isdir(os.path.join(top, d))}
    overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    groups = tuple(sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") in _GROUPS))  # one per group
    if groups not in _BASES:
        try:
            _BASES[groups] = compose(list(groups))
        except Exception as e:  # noqa: BLE001 - Hydra's errors: a choice this checkout lacks
            _BASES[groups] = e
    if isinstance(_BASES[groups], Exception):
        raise _BASES[groups]
    cfg = copy.deepcopy(_BASES[groups])
    values = [o for o in overrides if o not in groups]
    ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides(values), cfg)
    return cfg


# ------------------------------------------------------------------------------ estimates
_ROW = re.compile(r"^\| (?P<model>[\w-]+) \| \((?P<key>\w)\) ours (?P<norm>[A-Za-z]+)-(?P<fwd>[12]) \| "
                  r"(?P<batch>\d+) \| (?P<ips>[\d.]+) \|(?P<rest>.*)$")
_PACKED = re.compile(r"^- packed:(?P<n>\d+)-processes: .*vs_one_process=(?P<ratio>[\d.]+)")


class Bench:
    """Training throughput from results/bench.md (scripts/gpu_check.py): images/s of one process
    per (model, normalizer, double forward, batch) for the framework's default fast path, and the
    aggregate of N concurrent processes over one."""

    def __init__(self, path: str = BENCH):
        self.path, self.device, self.rates, self.packed = path, None, {}, {}
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line.startswith("- device: "):
                    self.device = line[len("- device: "):].strip()
                m = _ROW.match(line)
                if m:  # "(b) ours BN-1" and the like; "(f) ours BN-1, no CUDA graph" is not a default run
                    key = (m["model"], m["norm"].lower(), m["fwd"] == "2")
                    self.rates.setdefault(key, {})[int(m["batch"])] = float(m["ips"])
                m = _PACKED.match(line)
                if m:
                    self.packed[int(m["n"])] = float(m["ratio"])

    def images_per_s(self, model: str, norm: str, double: bool, batch: int) -> Optional[float]:
        """One process's training img/s; between two measured batch sizes interpolated on log-log
        axes, outside them None (as for a pair the bench lacks)."""
        by = self.rates.get((model, norm, bool(double)))
        if not by:
            return None
        if batch in by:
            return by[batch]
        lo = max((b for b in by if b < batch), default=None)
        hi = min((b for b in by if b > batch), default=None)
        if lo is None or hi is None:
            return None
        w = math.log(batch / lo) / math.log(hi / lo)
        return math.exp((1 - w) * math.log(by[lo]) + w * math.log(by[hi]))

    def speedup(self, jobs: int) -> float:
        """Aggregate throughput of `jobs` runs sharing the GPU over one run: the measured packed
        ratio, linear from 1 process to the measured count, and no more gain beyond it."""
        points = sorted({1: 1.0, **self.packed}.items())
        if jobs <= 1 or len(points) == 1:
            return 1.0
        for (n0, r0), (n1, r1) in zip(points, points[1:]):
            if jobs <= n1:
                return r0 + (r1 - r0) * (jobs - n0) / (n1 - n0)
        return points[-1][1]

    def describe(self, jobs: int) -> str:
        where = os.path.relpath(self.path, REPO) if self.path.startswith(REPO) else self.path
        if not self.rates:
            return f"no estimates: {where} has no throughput rows"
        conc = (f"{jobs} runs at once: {self.speedup(jobs):.2f}x one run's throughput"
                + (f" (packed {max(self.packed)}-process ratio)" if self.packed else " (no packed ratio measured)")
                if jobs > 1 else "one run at a time")
        return (f"estimates from {where} ({self.device or 'device not stated'}; {conc}), plus "
                f"{STARTUP_S:.0f} s start-up per run; a test image counted as {EVAL_COST:.2g} of a training image")


def run_cost(cfg, bench: Bench):
    """(seconds one process takes per epoch, epochs) for a run, from the bench; seconds None when
    the bench lacks the model/normalizer/batch or measured other perf settings."""
    t, d, perf = cfg.train, cfg.data, cfg.perf
    batch = int(t.batch_size)
    train_n = d.get("train_size") or CIFAR_TRAIN
    test_n = d.get("test_size") or CIFAR_TEST
    per_epoch = max(1, train_n // batch)                       # the last partial batch is dropped
    steps = int(t.steps or t.epochs * per_epoch)
    epochs = math.ceil(steps / per_epoch)
    default_perf = (perf.precision in ("auto", "bf16") and perf.channels_last in (None, True)
                    and perf.compile in (None, True) and perf.cuda_graph in (None, True))
    ips = bench.images_per_s(cfg.model.name, cfg.norm.name, t.double_forward, batch) if default_perf else None
    if ips is None:
        return None, epochs
    return (steps * batch + epochs * test_n * EVAL_COST) / ips / epochs, epochs


# ------------------------------------------------------------------------------ the plan
@dataclass
class PlannedRun:
    table: str                  # the grid whose cell it is (first planned); its sweep file names grid.sweep
    overrides: List[str]        # the cell's overrides, the schedule and the extra ones (no seed)
    seed: int
    run_id: str
    dir: str                    # where it is or will be
    status: str = MISSING
    epochs: int = 0
    epochs_done: int = 0
    epoch_s: Optional[float] = None  # one process, one epoch (None: no estimate)
    ident: dict = field(default_factory=dict, repr=False)  # mbn.naming.identity of its config

    def seconds_left(self, jobs: int, bench: Bench) -> Optional[float]:
        """Wall seconds to finish when `jobs` runs share the GPU (None: no estimate)."""
        if self.status in (FINISHED, DIVERGED):
            return 0.0
        if self.epoch_s is None:
            return None
        return STARTUP_S + self.epoch_s * (self.epochs - self.epochs_done) * jobs / bench.speedup(jobs)

    def first_epoch_s(self, jobs: int, bench: Bench) -> float:
        """Wall seconds until its first epoch ends. A run the bench lacks needs at least its
        start-up: it never starts where a run of higher priority was passed over for want of that."""
        return STARTUP_S + (0.0 if self.epoch_s is None else self.epoch_s * jobs / bench.speedup(jobs))


@dataclass
class Block:
    step: Step
    runs: List[PlannedRun] = field(default_factory=list)   # every run its cells need
    new: List[PlannedRun] = field(default_factory=list)    # those no earlier block planned
    uncomposable: List[str] = field(default_factory=list)  # cells this checkout cannot build


@dataclass
class Plan:
    runs_dir: str
    epochs: int
    seeds: List[int]
    extra: List[str]
    blocks: List[Block]
    bench: Bench
    steps_per_epoch_at_128: int

    def unique(self) -> List[PlannedRun]:
        """Every planned run once, in priority order."""
        return [r for b in self.blocks for r in b.new]

    def counts(self, runs) -> Dict[str, int]:
        return {s: sum(r.status == s for r in runs) for s in STATUSES}

    def sweep_file(self, table: str) -> dict:
        """What scripts/sweep.py writes as runs/<profile>/sweep_<table>.json for the tables."""
        extra = [o for o in self.extra if run_changing(o.split("=", 1)[0])]  # not data.root, stop_after, ...
        return {"table": table, "epochs": self.epochs, "seeds": self.seeds, "extra": extra, "models": None,
                "norms": None, "steps_per_epoch_at_128": self.steps_per_epoch_at_128}


def cell_runs(grid_name: str, block: dict, epochs: int, seeds, extra, runs_dir, bench):
    """(runs, uncomposable cells) of one grid block: a PlannedRun per cell and seed."""
    runs, bad = [], []
    for overrides in expand(block):
        asked = merge_overrides(overrides + [f"train.epochs={epochs}"], extra)
        try:
            cfg = cell_config(asked)
        except Exception as e:  # noqa: BLE001 - a normalizer or option this checkout lacks
            bad.append(f"{' '.join(overrides)} ({type(e).__name__})")
            continue
        base = identity(cfg)
        epoch_s, n_epochs = run_cost(cfg, bench)
        for seed in seeds:
            rid = run_id(dict(base, seed=seed))
            runs.append(PlannedRun(grid_name, asked, seed, rid, os.path.join(runs_dir, rid), epochs=n_epochs,
                                   epoch_s=epoch_s, ident=dict(base, seed=seed)))
    return runs, bad


def find_status(run: PlannedRun, index: RunIndex) -> None:
    """Set the run's status from what the runs directory holds: the most advanced of the runs
    recorded with its config (finished before diverged before partial); a partial run only with a
    checkpoint to continue from (without one it starts over: missing)."""
    found = index.find(run.ident)
    for status in (FINISHED, DIVERGED, PARTIAL):
        for r in found:
            if r.get("status", FINISHED) != status:
                continue
            if status == PARTIAL and not os.path.isfile(os.path.join(r["dir"], CHECKPOINT)):
                continue
            run.status, run.dir = status, r["dir"]
            if status == PARTIAL:
                run.epochs_done = min(run.epochs, epochs_done(r["dir"]))
            return
    run.status = MISSING


def epochs_done(run_dir: str) -> int:
    """Epochs a partial run has logged (metrics.jsonl lines that are whole)."""
    import json

    n = 0
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                try:
                    n += isinstance(json.loads(line), dict)
                except ValueError:
                    pass
    except OSError:
        pass
    return n


def build(runs_dir: str, epochs: int, seeds: Sequence[int], extra: Sequence[str] = (), tables=None,
          models=None, norms=None, bench: Optional[Bench] = None) -> Plan:
    """The plan for a runs directory: the SUITE's blocks (only `tables`, `models`, `norms` when
    given), every run's status in runs_dir and its estimated time."""
    bench = bench or Bench()
    extra = list(extra)
    per_epoch = steps_per_epoch_at_128(extra)
    all_grids = grids(epochs, per_epoch)
    check_restriction([all_grids[t] for t in dict.fromkeys(s.table for s in SUITE)
                       if tables is None or t in tables], models, norms)
    index = RunIndex(runs_dir)
    planned: Dict[str, PlannedRun] = {}
    blocks = []
    for step in SUITE:
        if tables is not None and step.table not in tables:
            continue
        block, in_block = Block(step), set()
        for grid_block in all_grids[step.table].blocks:
            b = restrict(restrict(restrict(grid_block, "model", step.models), "model", models), "norm", norms)
            if b is None:
                continue
            runs, bad = cell_runs(step.table, b, epochs, seeds, extra, runs_dir, bench)
            block.uncomposable += bad
            for r in runs:
                if r.run_id not in planned:
                    planned[r.run_id] = r
                    block.new.append(r)
                if r.run_id not in in_block:  # two cells may be one run (the ablation's k = 10 is MBN-2)
                    in_block.add(r.run_id)
                    block.runs.append(planned[r.run_id])
        if block.runs or block.uncomposable:  # --models/--norms may leave a block nothing
            blocks.append(block)
    for r in planned.values():
        find_status(r, index)
    return Plan(os.path.abspath(runs_dir), epochs, list(seeds), list(extra), blocks, bench, per_epoch)


# ------------------------------------------------------------------------------ printing
def duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "no estimate"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def gpu_seconds(runs: Sequence[PlannedRun], jobs: int, bench: Bench):
    """(GPU seconds the unfinished runs still need with `jobs` sharing the GPU, how many of them
    have no estimate): runs share the GPU, so each one's wall time counts 1/jobs."""
    left = [r.seconds_left(jobs, bench) for r in runs]
    return sum(s for s in left if s is not None) / max(1, jobs), sum(s is None for s in left)


def gpu_time_text(runs: Sequence[PlannedRun], jobs: int, bench: Bench) -> str:
    seconds, unknown = gpu_seconds(runs, jobs, bench)
    todo = [r for r in runs if r.status not in (FINISHED, DIVERGED)]
    if not todo:
        return "done"
    if unknown == len(todo):
        return "no estimate"
    return duration(seconds) + (f" + {unknown} run{'s' * (unknown > 1)} with no estimate" if unknown else "")


def render(plan: Plan, jobs: int) -> str:
    """The plan as a table: per block its runs, their status and the GPU time left."""
    where = os.path.relpath(plan.runs_dir) if plan.runs_dir.startswith(os.getcwd()) else plan.runs_dir
    lines = [f"Plan for {where}: {plan.epochs} epoch{'s' * (plan.epochs != 1)}, seeds {' '.join(map(str, plan.seeds))}"
             + (f", extra overrides: {' '.join(plan.extra)}" if plan.extra else ""),
             plan.bench.describe(jobs) + ".", "",
             "| # | block | runs | finished | partial | diverged | missing | GPU time left |",
             "|---|---|---|---|---|---|---|---|"]
    for i, b in enumerate(plan.blocks, 1):
        c = plan.counts(b.runs)
        shared = len(b.runs) - len(b.new)
        title = b.step.title + (f" ({shared} shared with blocks above)" if shared else "")
        lines.append(f"| {i} | {title} | {len(b.runs)} | {c[FINISHED]} | {c[PARTIAL]} | {c[DIVERGED]} | "
                     f"{c[MISSING]} | {gpu_time_text(b.new, jobs, plan.bench)} |")
    runs = plan.unique()
    c = plan.counts(runs)
    lines.append(f"| | **total** (each run once) | {len(runs)} | {c[FINISHED]} | {c[PARTIAL]} | {c[DIVERGED]} | "
                 f"{c[MISSING]} | {gpu_time_text(runs, jobs, plan.bench)} |")
    for b in plan.blocks:
        if b.uncomposable:
            lines.append(f"\n{b.step.title}: cannot be built by this checkout, left out: {'; '.join(b.uncomposable)}")
    lines.append("\n" + NOT_PLANNED)
    return "\n".join(lines)


def folder_size(path: str) -> int:
    """Bytes of the files under a folder (0 when it does not exist)."""
    total = 0
    for parent, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(parent, f)).st_size
            except OSError:  # removed while we walked (a run replacing its checkpoint)
                pass
    return total


def size_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


# ------------------------------------------------------------------------------ running
def drop_checkpoints(runs: Sequence[PlannedRun], runs_dir: str) -> List[str]:
    """Delete the checkpoint of every finished run inside runs_dir (train.py recognises a
    finished run by its metrics.json): a runs folder then holds checkpoints only where there is
    something to continue, and is small enough to carry to the next machine."""
    removed = []
    top = os.path.abspath(runs_dir) + os.sep
    for r in runs:
        path = os.path.join(r.dir, CHECKPOINT)
        if r.status == FINISHED and os.path.abspath(path).startswith(top) and os.path.isfile(path):
            os.remove(path)
            removed.append(r.run_id)
    return removed


@dataclass
class Outcome:
    run: PlannedRun
    returncode: Optional[int]   # None: not started (its first epoch would not fit), or stopped at the budget's end
    started: bool = True
    stopped: bool = False       # still running at the budget's end: stopped (its last checkpoint is kept)


def execute(queue: Sequence[PlannedRun], jobs: int, deadline: float, hard_end: float,
            start: Callable[[PlannedRun], object], first_epoch_s: Callable[[PlannedRun], Optional[float]],
            clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
            say: Callable[[str], None] = print, grace_s: float = 20.0) -> List[Outcome]:
    """Run the queue in its order, `jobs` at a time. A run starts only while, by its estimate, its
    first epoch ends before `deadline` (a run without an estimate: while time is left); each run
    stops itself at its last epoch boundary before the deadline (start(run) gives it
    $MBN_DEADLINE), and whatever still runs at `hard_end`, or when Ctrl-C comes, is stopped with its
    last checkpoint. start(run) returns a handle with poll() and stop(signal). One Outcome per run."""
    import signal

    pending, running, out = list(queue), [], []

    def stop_all(first):
        for sig, wait in ((first, grace_s), (signal.SIGKILL, 5.0)):
            for _, proc in running:
                if proc.poll() is None:
                    proc.stop(sig)
            end = clock() + wait
            while clock() < end and any(p.poll() is None for _, p in running):
                sleep(0.2)
            if all(p.poll() is not None for _, p in running):
                break
        out.extend(Outcome(run, proc.poll(), stopped=True) for run, proc in running)
        running.clear()

    try:
        while pending or running:
            for run, proc in list(running):
                rc = proc.poll()
                if rc is not None:
                    running.remove((run, proc))
                    out.append(Outcome(run, rc))
            if clock() >= hard_end and running:
                say(f"[next] the budget is spent: stopping {len(running)} run(s); each keeps its last checkpoint")
                stop_all(signal.SIGTERM)
            while pending and len(running) < jobs:
                run = pending.pop(0)
                need, left = first_epoch_s(run), deadline - clock()
                if left <= 0 or (need is not None and need > left):
                    out.append(Outcome(run, None, started=False))
                    continue
                running.append((run, start(run)))
            if running:
                sleep(0.5)
    except KeyboardInterrupt:
        stop_all(signal.SIGINT)
        raise
    return out
