"""Run directories, indexed and found by the config they ran.

A cell's runs are the finished (or diverged) run directories whose recorded config equals the
cell's, after filling the keys that the run's code did not have yet (`filled_identity`). A run
directory none of whose files can be read whole is named in a one-line warning and skipped: one
damaged run never stops a table, a figure or a collection."""
import dataclasses
import json
import math
import os
import sys
from typing import Dict, List, Optional

from mbn import UserError
from mbn.cli import describe_os_error
from mbn.naming import identity, run_id
from mbn.results.configs import (compose_cached, config_value, filled_identity, flat, identity_key, merge_overrides,
                                 steps_per_epoch_at_128, value_from_overrides)
from mbn.sweeps import BS128_STEPS_PER_EPOCH, LABEL, Grid, expand_labeled

FINISHED, DIVERGED, PARTIAL = "finished", "diverged", "partial"
IN_TABLES = (FINISHED, DIVERGED)  # a diverged run counts in its cell (`diverged k/n`), a partial one not yet


class DamagedFile(UserError):
    """A file that cannot be read whole (cut short, not JSON, unreadable); the message names it."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise DamagedFile(f"{path}: not UTF-8 text (damaged)") from None
    except OSError as e:
        raise DamagedFile(describe_os_error(e, "reading")) from None


def read_json(path: str, kind=dict):
    """A JSON file holding one `kind` (dict: an object); DamagedFile names the file otherwise."""
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DamagedFile(f"{path}: not valid JSON at line {e.lineno} ({e.msg}); cut short or edited?") from None
    if not isinstance(value, kind):
        raise DamagedFile(f"{path}: holds a {type(value).__name__}, not a JSON {kind.__name__}")
    return value


def read_jsonl(path: str) -> List[dict]:
    """One JSON object per line (metrics.jsonl)."""
    out = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            raise DamagedFile(f"{path}: line {i} is not JSON (cut short?)") from None
        if not isinstance(value, dict):
            raise DamagedFile(f"{path}: line {i} is not a JSON object")
        out.append(value)
    return out


def _non_finite(v) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


def status_of(summary: dict) -> str:
    """finished, diverged (metrics.json says so, or a loss or the test error is not finite: runs
    recorded before every loss was checked) or partial (stopped, preempted, still running)."""
    if summary.get("status") == DIVERGED or any(_non_finite(summary.get(k)) for k in ("train_loss", "test_loss",
                                                                                      "test_err")):
        return DIVERGED
    if not summary or summary.get("finished") is False or summary.get("status", FINISHED) != FINISHED:
        return PARTIAL
    return FINISHED


RECORD_TYPES = {"config": dict, "overrides": list, "git": dict, "perf": dict, "versions": dict, "device": str,
                "started": str}


def _check_record(record: dict, path: str) -> dict:
    for key, kind in RECORD_TYPES.items():
        if key in record and record[key] is not None and not isinstance(record[key], kind):
            raise DamagedFile(f"{path}: '{key}' is a {type(record[key]).__name__}, not a {kind.__name__}")
    return record


def load_run(path: str) -> Optional[dict]:
    """A run directory: its summary (metrics.json), per-epoch history (metrics.jsonl, read for
    finished and diverged runs), run record and status. None for a folder that is no run directory
    (neither metrics.json nor run_record.json) or whose files cannot be read (warned, skipped)."""
    files = {f: os.path.join(path, f) for f in ("metrics.json", "metrics.jsonl", "run_record.json")}
    if not os.path.isfile(files["metrics.json"]) and not os.path.isfile(files["run_record.json"]):
        return None
    try:
        summary = read_json(files["metrics.json"]) if os.path.isfile(files["metrics.json"]) else {}
        status = status_of(summary)
        history = (read_jsonl(files["metrics.jsonl"])
                   if status in IN_TABLES and os.path.isfile(files["metrics.jsonl"]) else [])
        record = (_check_record(read_json(files["run_record.json"]), files["run_record.json"])
                  if os.path.isfile(files["run_record.json"]) else {})
    except DamagedFile as e:
        warn(f"{e}; run skipped")
        return None
    return {"dir": path, "name": os.path.basename(os.path.normpath(path)), "summary": summary,
            "history": history, "record": record, "status": status}


class RunIndex:
    """The run directories under a folder (finished, diverged and partial), findable by the config
    they ran."""

    def __init__(self, root: str):
        self.by_name, self.by_identity = {}, {}
        for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            if not os.path.isdir(os.path.join(root, name)):
                continue
            run = load_run(os.path.join(root, name))
            if run is None:
                continue
            self.by_name[name] = run
            ident = filled_identity(run["record"])
            if ident is not None:
                self.by_identity.setdefault(identity_key(ident), []).append(run)

    def find(self, ident: dict) -> List[dict]:
        """Runs of exactly this identity (mbn.naming.identity of a config): the directory named by
        today's run id, and every run whose recorded config (filled with today's defaults) equals it."""
        found = {}
        rid = run_id(ident)
        if rid in self.by_name:
            found[rid] = self.by_name[rid]
        for run in self.by_identity.get(identity_key(flat(ident)), []):
            found.setdefault(run["name"], run)
        return list(found.values())


_INDEXES = {}


def run_index(root: str) -> RunIndex:
    """One index per directory and process (tables and figures share it)."""
    key = os.path.abspath(root)
    if key not in _INDEXES:
        _INDEXES[key] = RunIndex(root)
    return _INDEXES[key]


def seed_of(run) -> Optional[int]:
    """The seed a run was found for (lookup), else the one its record names."""
    return run.get("seed", (run["record"].get("config") or {}).get("seed"))


def pair_fields(run) -> Dict[str, object]:
    """What two runs of one seed must share to be a pair (besides the seed): the data, the schedule
    (epochs, step budget, lr schedule), the precision they computed in and the device type."""
    ident = filled_identity(run["record"]) or {}
    device = run["record"].get("device")
    return {"data": {k: v for k, v in ident.items() if k.startswith("data.")},
            "schedule": {k: v for k, v in ident.items()
                         if k in ("train.epochs", "train.steps") or k.startswith("schedule.")},
            "precision": (run["record"].get("perf") or {}).get("precision", "unknown"),
            "device type": "unknown" if not device else "cpu" if str(device).startswith("cpu") else "cuda"}


def pair_mismatch(a: dict, b: dict) -> str:
    """'' when runs a and b may pair; else what differs, e.g. 'precision bf16 ≠ fp32'."""
    fa, fb = pair_fields(a), pair_fields(b)
    out = []
    for what in fa:
        if isinstance(fa[what], dict):
            out += [f"{k} {fa[what].get(k)} ≠ {fb[what].get(k)}" for k in sorted(set(fa[what]) | set(fb[what]))
                    if fa[what].get(k) != fb[what].get(k)]
        elif fa[what] != fb[what]:
            out.append(f"{what} {fa[what]} ≠ {fb[what]}")
    return ", ".join(out)


class Cells(dict):
    """(row, col) -> the runs found for the cell (one per seed); `configs`: (row, col) -> the cell's
    composed config (None where today's configs cannot compose it)."""

    def __init__(self):
        super().__init__()
        self.configs = {}


def lookup(grid: Grid, sweep: dict, runs_root: str) -> Cells:
    """The finished and diverged runs (one per seed found) of every cell of the grid. A cell that
    today's configs cannot compose (a normalizer or option this checkout lacks) is empty."""
    index = run_index(runs_root)
    cells = Cells()
    for block in grid.blocks:
        for overrides, row_label in expand_labeled(block):
            asked = merge_overrides(overrides + [f"train.epochs={sweep['epochs']}"], sweep["extra"])
            try:
                cfg = compose_cached(asked)  # the seed is set below: nothing in the configs depends on it
            except Exception as e:  # noqa: BLE001
                key = (row_label if grid.row == LABEL else value_from_overrides(asked, grid.row),
                       value_from_overrides(asked, grid.col))
                cells.setdefault(key, [])
                cells.configs.setdefault(key, None)
                print(f"[results] {grid.name}: {' '.join(overrides)} cannot be composed here "
                      f"({type(e).__name__}); shown as missing")
                continue
            key = (row_label if grid.row == LABEL else config_value(cfg, grid.row), config_value(cfg, grid.col))
            cells.setdefault(key, [])
            cells.configs[key] = cfg
            base = identity(cfg)
            for seed in sweep["seeds"]:
                ident = dict(base, seed=seed)
                runs = [r for r in index.find(ident) if r["status"] in IN_TABLES]
                if len(runs) > 1:  # the same config run twice (e.g. under an older run id): keep the newest
                    runs.sort(key=lambda r: (r["name"] == run_id(ident), r["record"].get("started", "")))
                    print(f"[results] {grid.name}: {len(runs)} runs of one config and seed; using {runs[-1]['name']}")
                if runs and runs[-1] not in cells[key]:
                    runs[-1].setdefault("seed", seed)
                    cells[key].append(runs[-1])
    for name, (source, _) in grid.derived.items():  # a derived row or column re-reads its source's runs
        pairs = ([((name, c), (source, c)) for c in grid.cols] if name in grid.rows
                 else [((r, name), (r, source)) for r in grid.rows])
        for key, src in pairs:
            if src in cells:
                cells[key] = cells[src]
                cells.configs[key] = cells.configs.get(src)
    return cells


def read_sweep(path: str) -> dict:
    """A sweep_<table>.json: the schedule (epochs), the seeds and the extra overrides of a sweep."""
    sweep = read_json(path)
    checks = {"epochs": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
              "seeds": lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
              "extra": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)}
    what = {"epochs": "a positive integer", "seeds": "a list of integers", "extra": "a list of overrides"}
    for key, ok in checks.items():
        if not ok(sweep.get(key)):
            raise DamagedFile(f"{path}: '{key}' is missing or not {what[key]}; scripts/sweep.py or "
                              "scripts/collect_runs.py writes it")
    return sweep


def load_grid(runs_root: str, name: str):
    """(sweep, grid, cells, runs) for table/figure `name` from a runs directory, or None when
    there is no sweep file for it there (scripts/sweep.py writes one; collect_runs.py infers one
    for runs launched without it). A damaged sweep file raises DamagedFile."""
    from mbn.sweeps import grids

    source = grids(200)[name].sweep
    path = os.path.join(runs_root, f"sweep_{source}.json")
    if not os.path.isfile(path):
        return None
    sweep = read_sweep(path)
    per_epoch = sweep.get("steps_per_epoch_at_128") or (
        BS128_STEPS_PER_EPOCH if not sweep["extra"] else steps_per_epoch_at_128(sweep["extra"]))
    grid = grids(sweep["epochs"], per_epoch)[name]
    cells = lookup(grid, sweep, runs_root)
    runs = {r["name"]: r for rs in cells.values() for r in rs}
    return sweep, grid, cells, list(runs.values())


def is_synthetic(sweep: dict, runs: List[dict]) -> bool:
    """Runs on synthetic data (or asked to be): titled so, never compared with the paper."""
    if any(o.split("=", 1) == ["data", "synthetic"] for o in sweep.get("extra", [])):
        return True
    return any(((r["record"].get("config") or {}).get("data") or {}).get("name") == "synthetic" for r in runs)


# ------------------------------------------------------------------------------ runs without a sweep file
PAPER_GRIDS = ["table1", "table2", "table3", "table4", "table5", "table6", "figure1", "figure2"]


def profile_name(epochs, synthetic: bool) -> str:
    """The folder a schedule's runs and tables live in: e<epochs>[-synthetic]."""
    return f"e{epochs}" + ("-synthetic" if synthetic else "")


def by_schedule(runs: List[dict]) -> Dict[str, List[dict]]:
    """Runs grouped by their profile (profile_name) from their records."""
    out = {}
    for r in runs:
        epochs = ((r["record"].get("config") or {}).get("train") or {}).get("epochs")
        if epochs is None:
            raise UserError(f"{r['dir']}: its run_record.json names no schedule (train.epochs); "
                            "collect it by hand or leave it out")
        out.setdefault(profile_name(epochs, is_synthetic({}, [r])), []).append(r)
    return out


def schedule_name(runs: List[dict]) -> str:
    """The one profile a set of runs belongs to (UserError for several)."""
    names = sorted(by_schedule(runs))
    if len(names) != 1:
        raise UserError(f"the runs have {len(names)} schedules ({', '.join(names) or 'none'}); "
                        "each schedule's runs belong in their own folder")
    return names[0]


def infer_sweeps(runs_root: str) -> Dict[str, dict]:
    """Sweep files for runs that came without one (e.g. launched by hand): for each of the paper's
    grids whose cells these runs fill at least two of (one comparison): the runs' schedule, the
    seeds found, and as extra overrides those every run was given that the grid does not sweep
    (a grid is skipped where the runs all set a swept key, e.g. the model, to a value outside it;
    data=synthetic excepted)."""
    from mbn.naming import run_changing
    from mbn.sweeps import format_value, grids

    runs = [r for r in run_index(runs_root).by_name.values() if r["status"] in IN_TABLES]
    if not runs:
        return {}
    epochs = int(schedule_name(runs).split("-")[0][1:])
    seeds = sorted({seed_of(r) for r in runs if seed_of(r) is not None})
    given = [[o for o in r["record"].get("overrides", []) if run_changing(o.split("=", 1)[0])
              and o.split("=", 1)[0] not in ("seed", "train.epochs")] for r in runs]
    common = [o for o in given[0] if all(o in g for g in given[1:])]
    ran = {g: {((r["record"].get("config") or {}).get(g) or {}).get("name") for r in runs}
           for g in ("model", "norm")}
    out = {}
    for name in PAPER_GRIDS:
        grid = grids(epochs)[name]
        # only the cells of models and normalizers these runs used (composing a cell takes ~0.2 s)
        blocks = [{k: [v for v in vals if v in ran[k]] if k in ran else vals for k, vals in b.items()}
                  for b in grid.blocks]
        grid = dataclasses.replace(grid, blocks=[b for b in blocks if all(b.values())])
        swept = {}
        for block in grid.blocks:
            for k, vals in block.items():
                swept.setdefault(k, set()).update(format_value(v) for v in vals)
        extra = [o for o in common if o.partition("=")[2] not in swept.get(o.partition("=")[0], ())]
        if any(o.partition("=")[0] in swept and o != "data=synthetic" for o in extra):
            continue  # the runs change what the grid sweeps (e.g. another model): not this grid
        sweep = {"table": name, "epochs": epochs, "seeds": seeds, "extra": extra, "models": None,
                 "inferred": "written by scripts/collect_runs.py from the run records (the runs came without "
                             "a sweep file): the seeds found, the overrides every run shares"}
        filled = [k for k, rs in lookup(grid, sweep, runs_root).items() if rs]
        if len(filled) >= 2:
            out[grid.sweep] = dict(sweep, models=sorted({str(k[0] if grid.row == "model.name" else k[1])
                                                          for k in filled}) if "model.name" in (grid.row, grid.col)
                                   else None)
    _INDEXES.pop(os.path.abspath(runs_root), None)
    return out
