"""Runs -> tables and figures. Every number comes from a run directory's metrics files; every
table says which schedule, seeds, devices and commits produced it."""
import csv
import io
import json
import math
import os
import statistics
from typing import Dict, List

from mbn.naming import run_id
from mbn.sweeps import Grid, expand

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(REPO, "results", "paper.json")


def compose(overrides):
    """The job config Hydra would build for these overrides (launcher settings ignored)."""
    overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mbn.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def merge_overrides(base: List[str], extra: List[str]) -> List[str]:
    """base overrides with extra ones replacing those of the same key."""
    keys = {e.split("=", 1)[0].lstrip("+~") for e in extra}
    return [b for b in base if b.split("=", 1)[0] not in keys] + list(extra)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def load_run(path: str):
    """A finished run directory: summary, per-epoch history, run record; None if unfinished."""
    if not os.path.isfile(os.path.join(path, "metrics.json")):
        return None
    with open(os.path.join(path, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f if line.strip()]
    return {"dir": path, "summary": read_json(os.path.join(path, "metrics.json")), "history": history,
            "record": read_json(os.path.join(path, "run_record.json"))}


def lookup(grid: Grid, sweep: dict, runs_root: str) -> Dict[tuple, List[dict]]:
    """(row, col) -> the finished runs (one per seed found) of every cell of the grid, found by
    the run id of the config the sweep asked for."""
    cells = {}
    for block in grid.blocks:
        for overrides in expand(block):
            for seed in sweep["seeds"]:
                cfg = compose(merge_overrides(overrides + [f"seed={seed}", f"train.epochs={sweep['epochs']}"],
                                              sweep["extra"]))
                key = (_get(cfg, grid.row), _get(cfg, grid.col))
                run = load_run(os.path.join(runs_root, run_id(cfg)))
                cells.setdefault(key, [])
                if run:
                    cells[key].append(run)
    return cells


def load_grid(runs_root: str, name: str):
    """(sweep, grid, cells, runs) for table/figure `name` from a runs directory, or None when
    scripts/sweep.py left no sweep file there."""
    from mbn.sweeps import grids

    source = grids(200)[name].sweep
    path = os.path.join(runs_root, f"sweep_{source}.json")
    if not os.path.isfile(path):
        print(f"[results] {name}: no {path} (run scripts/sweep.py {source} first); skipped")
        return None
    sweep = read_json(path)
    grid = grids(sweep["epochs"])[name]
    cells = lookup(grid, sweep, runs_root)
    return sweep, grid, cells, [r for rs in cells.values() for r in rs]


def _get(cfg, dotted):
    from omegaconf import OmegaConf

    v = OmegaConf.select(cfg, dotted)
    return tuple(v) if not isinstance(v, (str, int, float, bool)) and v is not None else v


def mean_std(values):
    n = len(values)
    if n == 0:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if n > 1 else None), n


def label(v) -> str:
    if isinstance(v, tuple):
        return "{" + ", ".join(f"{x:g}" for x in v) + "}"
    if isinstance(v, bool):
        return "double" if v else "single"
    return str(v)


def provenance(runs: List[dict], sweep: dict) -> dict:
    records = [r["record"] for r in runs]
    commits = sorted({(r["git"]["commit"] or "unknown")[:10] + ("+dirty" if r["git"]["dirty"] else "") for r in records})
    dates = sorted(r["started"][:10] for r in records)
    return {"schedule": f"{sweep['epochs']} epochs" + ("" if sweep["epochs"] == 200 else " (shortened; the paper: 200)"),
            "seeds asked": len(sweep["seeds"]), "extra overrides": " ".join(sweep["extra"]) or "none",
            "devices": sorted({r["device"] for r in records}) or ["none"],
            "commits": commits or ["none"], "torch": sorted({r["versions"]["torch"] for r in records}) or ["none"],
            "dates": f"{dates[0]} .. {dates[-1]}" if dates else "none", "runs found": len(runs)}


def table_rows(grid: Grid, cells, paper: dict):
    rows = []
    for r in grid.rows:
        for c in grid.cols:
            key = (tuple(r) if isinstance(r, list) else r, c)
            if key not in cells:
                continue  # not defined by the method (NormProp on a ResNet)
            errs = [run["summary"][grid.metric] for run in cells[key]]
            mean, std, n = mean_std(errs)
            ref = paper.get(label(key[0]), {}).get(label(c)) if paper else None
            rows.append({grid.row_label: label(key[0]), grid.col_label: label(c), "mean": mean, "std": std, "n": n,
                         "paper": ref, "diff": (mean - ref) if mean is not None and ref is not None else None})
    return rows


def _fmt(x, digits=2):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render(grid: Grid, rows, prov: dict, note: str = ""):
    """Markdown and CSV of a table."""
    md = [f"# {grid.title}", "", "Generated by `scripts/make_tables.py` from the run directories; do not edit.", ""]
    md += [f"- {k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in prov.items()]
    if note:
        md += ["", note]
    md += ["", f"| {grid.row_label} | {grid.col_label} | ours: test error % (mean ± std) | n | paper | ours − paper |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        ours = "missing" if r["n"] == 0 else _fmt(r["mean"]) + (f" ± {_fmt(r['std'])}" if r["std"] is not None else "")
        diff = "—" if r["diff"] is None else f"{r['diff']:+.2f}"
        md.append(f"| {r[grid.row_label]} | {r[grid.col_label]} | {ours} | {r['n']} | {_fmt(r['paper'])} | {diff} |")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([grid.row_label, grid.col_label, "mean", "std", "n", "paper", "diff"])
    for r in rows:
        w.writerow([r[grid.row_label], r[grid.col_label]] + ["" if r[k] is None else r[k]
                                                             for k in ("mean", "std", "n", "paper", "diff")])
    return "\n".join(md) + "\n", buf.getvalue()


def curves(runs: List[dict], key: str):
    """Per-epoch mean, min and max of `key` over seeds (runs of equal length)."""
    length = min(len(r["history"]) for r in runs)
    epochs = [runs[0]["history"][i]["epoch"] for i in range(length)]
    values = [[r["history"][i][key] for r in runs] for i in range(length)]
    return epochs, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]
