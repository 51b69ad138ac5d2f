"""A table's rows: per cell our mean ± std over seeds, the diverged seeds, the paired difference to
the grid's reference cell over the seeds that really pair, and — on the paper's schedule, real data,
a table the paper has numbers for — the paper's numbers and a verdict on its claim, with Holm's
correction over the table's tests."""
import math
from typing import Dict, List, Optional

from mbn.results.configs import config_value
from mbn.results.runs import DIVERGED, FINISHED, pair_mismatch, seed_of
from mbn.results.stats import MIN_PAIRS, holm, mean_std, paired_difference, tost_p, verdict
from mbn.sweeps import BS128_STEPS_PER_EPOCH, PAPER_EPOCHS, Grid, value_label

label = value_label
DEFAULT_MARGIN = 0.3  # pp: Table 6's equivalence margin (make_tables.py --margin)

# config keys whose value is named beside a row's label where a cell's config has them: choices that
# change what a method computes without changing its name
LABELLED_KEYS = {"norm.recipe": "recipe"}


def no_verdict_reason(grid: Grid, synthetic: bool, paper: dict) -> Optional[str]:
    """Why a table carries no paper columns and no verdicts; None where it does."""
    if synthetic:
        return "synthetic data: the table tests the pipeline, not the paper"
    if not grid.paper_table or not paper:
        return "the paper has no numbers for this table; it compares our cells with each other"
    if not grid.on_paper_schedule():
        budget = f"{grid.epochs} epochs" + ("" if grid.steps_per_epoch == BS128_STEPS_PER_EPOCH
                                            else f" of {grid.steps_per_epoch} steps at batch 128")
        return (f"these runs have a schedule of {budget}; the paper's numbers come from its {PAPER_EPOCHS} epochs "
                f"(Table 4: {PAPER_EPOCHS} × 390 SGD steps at every batch size), which a shortened schedule "
                "cannot test (the paper's numbers: `results/paper.json`)")
    return None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _by_seed(runs: List[dict]) -> Dict[int, dict]:
    return {seed_of(r): r for r in runs}


def _values(runs: Dict[int, dict], metric: str) -> Dict[int, float]:
    """Finished runs' values of a metric, by seed."""
    return {s: float(r["summary"][metric]) for s, r in runs.items()
            if r["status"] == FINISHED and _finite(r["summary"].get(metric))}


def _commit(run) -> str:
    git = run["record"].get("git") or {}
    return (git.get("commit") or "unknown")[:10] + ("+dirty" if git.get("dirty") else "")


def _row_label(grid: Grid, r, cfg) -> str:
    text = label(r)
    details = [f"{name}: {config_value(cfg, key)}" for key, name in LABELLED_KEYS.items()
               if cfg is not None and config_value(cfg, key) is not None]
    if r in grid.row_notes:
        details.append(grid.row_notes[r])
    return f"{text} ({'; '.join(details)})" if details else text


def _pairs(grid: Grid, key, ref_key, cells) -> dict:
    """The cell's paired difference to its reference over the seeds whose runs really pair; the
    seeds that do not (and what differs), the commits where they differ, diverged seeds."""
    metric, ref_metric = grid.metric_of(*key), grid.metric_of(*ref_key)
    mine, ref = _by_seed(cells[key]), _by_seed(cells.get(ref_key, []))
    out = {"unpaired": {}, "ref_diverged": sum(r["status"] == DIVERGED for r in ref.values()), "ref_n": len(ref)}
    values, ref_values = _values(mine, metric), _values(ref, ref_metric)
    for s in sorted(set(values) & set(ref_values)):
        differs = pair_mismatch(mine[s], ref[s])
        if differs:
            out["unpaired"][s] = differs
            del values[s]
    delta = paired_difference(values, ref_values)
    if delta is not None:
        commits = ({_commit(mine[s]) for s in delta["seeds"]}, {_commit(ref[s]) for s in delta["seeds"]})
        out["commits"] = commits if len(commits[0] | commits[1]) > 1 else None
    out["delta"] = delta
    return out


def table_rows(grid: Grid, cells, paper: dict, synthetic: bool = False, margin: float = DEFAULT_MARGIN):
    """One row per cell: our mean ± std (finished seeds) and n (seeds found, diverged included), the
    diverged seeds, the final train error where the grid shows it, the paired difference to the
    reference cell, and where verdicts can mean something (`no_verdict_reason`) the paper's numbers,
    the minimum detectable effect, Holm-adjusted p-values and the verdict."""
    judge = no_verdict_reason(grid, synthetic, paper) is None
    configs = getattr(cells, "configs", {})
    rows = []
    for r in grid.rows:
        r = tuple(r) if isinstance(r, list) else r
        for c in grid.cols:
            key = (r, c)
            if key not in cells:
                continue  # not defined by the method (NormProp on a ResNet)
            runs = _by_seed(cells[key])
            values = _values(runs, grid.metric_of(r, c))
            diverged = sum(run["status"] == DIVERGED for run in runs.values())
            mean, std, _ = mean_std(values.values())
            train = mean_std(_values(runs, "train_err").values())
            ref_key = (r if grid.ref_row is None else grid.ref_row, c if grid.ref_col is None else grid.ref_col)
            is_ref = ref_key == key
            row = {grid.row_label: _row_label(grid, r, configs.get(key)), grid.col_label: label(c),
                   "mean": mean, "std": std, "n": len(values) + diverged, "diverged": diverged,
                   "train_mean": train[0], "train_std": train[1], "runs": len(cells[key]), "reference": is_ref,
                   "delta": None, "unpaired": {}, "commits": None, "ref_diverged": 0, "key": key}
            if not is_ref:
                row.update(_pairs(grid, key, ref_key, cells))
                if diverged or row["ref_diverged"]:  # no interval over the survivors
                    row["delta"] = None
            if judge:
                ours = paper.get(label(r), {}).get(label(c))
                theirs = paper.get(label(ref_key[0]), {}).get(label(ref_key[1]))
                pd = None if is_ref or ours is None or theirs is None else round(ours - theirs, 4)
                d = row["delta"] if row["delta"] is not None and not row["delta"]["zero_width"] else None
                row.update(paper=ours, diff=(mean - ours) if mean is not None and ours is not None else None,
                           paper_delta=pd, claim=None if is_ref else _claim(grid, pd),
                           paper_delta_in_ci=(None if pd is None or d is None or d["lo"] is None
                                              else d["lo"] <= pd <= d["hi"]),
                           mde=None if d is None else d["half"], p=None, p_holm=None)
            rows.append(row)
    if judge:
        _judge(rows, margin)
    return rows


def _claim(grid: Grid, paper_delta) -> Optional[str]:
    if grid.claims == "same":
        return "="
    if paper_delta is None:
        return None
    return "<" if paper_delta < 0 else ">" if paper_delta > 0 else "="


def _judge(rows: List[dict], margin: float) -> None:
    """p-values of the cells that can be tested (a claim, >= MIN_PAIRS pairs, a spread, no diverged
    seed), Holm-adjusted over the table, and every row's verdict."""
    tested = {}
    for i, row in enumerate(rows):
        d = row["delta"]
        if row["claim"] is not None and d is not None and d["n"] >= MIN_PAIRS and not d["zero_width"]:
            row["p"] = tost_p(d, margin) if row["claim"] == "=" else d["p"]
            tested[i] = row["p"]
    for i, p in holm(tested).items():
        rows[i]["p_holm"] = p
    for row in rows:
        if row["reference"]:
            row["verdict"] = "—"
        elif row["claim"] is not None and (row["diverged"] or row["ref_diverged"]):
            row["verdict"] = (f"diverged {row['diverged']}/{row['n']}" if row["diverged"]
                              else f"reference diverged {row['ref_diverged']}/{row['ref_n']}")
        else:
            row["verdict"] = verdict(row["claim"], row["delta"], row["p_holm"], row["paper_delta"])


def provenance(runs: List[dict], sweep: dict) -> dict:
    records = [r["record"] for r in runs]
    dates = sorted(r["started"][:10] for r in records if r.get("started"))
    out = {"schedule": f"{sweep['epochs']} epochs" + ("" if sweep["epochs"] == PAPER_EPOCHS
                                                       else f" (shortened; the paper: {PAPER_EPOCHS})"),
           "seeds asked": len(sweep["seeds"]), "extra overrides": " ".join(sweep["extra"]) or "none",
           "devices": sorted({r.get("device", "unknown") for r in records}) or ["none"],
           "precision": sorted({str((r.get("perf") or {}).get("precision", "unknown")) for r in records}) or ["none"],
           "commits": sorted({_commit(r) for r in runs}) or ["none"],
           "torch": sorted({(r.get("versions") or {}).get("torch", "unknown") for r in records}) or ["none"],
           "dates": f"{dates[0]} .. {dates[-1]}" if dates else "none", "runs found": len(runs)}
    diverged = sum(r.get("status") == DIVERGED for r in runs)
    if diverged:
        out["runs found"] = f"{len(runs)} ({diverged} diverged)"
    if sweep.get("inferred"):
        out["sweep"] = sweep["inferred"]
    return out
