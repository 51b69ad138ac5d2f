"""Runs -> tables and figures. Every number comes from a run directory's metrics files; every
table says which schedule, seeds, devices, commits and runs produced it.

- Statistics: mean ± sample std over seeds, and each cell's paired difference to its grid's
  reference cell (per seed, over the seeds both have) with a Student-t 95 % interval.
- Finding runs: a cell's runs are the finished run directories whose recorded config equals the
  cell's, after filling the keys that the run's code did not have yet with today's defaults
  (`RunIndex`), so config keys added later do not orphan old runs.
- Committed outputs are never replaced by ones made from other runs without `force`."""
import csv
import io
import json
import math
import os
import statistics
import subprocess
from typing import Dict, List, Optional

from mbn import UserError
from mbn.naming import identity, run_id
from mbn.sweeps import BS128_STEPS_PER_EPOCH, LABEL, Grid, expand_labeled, value_label

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(REPO, "results", "paper.json")
label = value_label


# ------------------------------------------------------------------------------ statistics
def t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df >= 1, in closed form (Abramowitz & Stegun
    26.7.3 for odd df, 26.7.4 for even df; θ = atan(t / √df))."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sinθ (1 + 1/2 c² + 1·3/(2·4) c⁴ + ... up to c^(df-2))
        term = total = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    term = total = 1.0  # odd: 2/π (θ + sinθ cosθ (1 + 2/3 c² + 2·4/(3·5) c⁴ + ... up to c^(df-3)))
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + s * math.cos(theta) * total)


def t_quantile(q: float, df: int) -> float:
    """The q-quantile (q in (0.5, 1)) of Student's t with df degrees of freedom, by bisection on
    the closed-form distribution (exact to double precision)."""
    if not 0.5 < q < 1:
        raise ValueError(f"q must lie in (0.5, 1), got {q}")
    target = 2 * q - 1
    lo, hi = 0.0, 1.0
    while t_two_sided_mass(hi, df) < target:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_two_sided_mass(mid, df) < target else (lo, mid)
    return (lo + hi) / 2


def mean_std(values):
    n = len(values)
    if n == 0:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if n > 1 else None), n


def paired_difference(values: Dict[int, float], ref: Dict[int, float], level: float = 0.95) -> Optional[dict]:
    """Mean of the per-seed differences values[s] − ref[s] over the seeds both have, with a
    two-sided Student-t interval at `level` (n >= 2; lo = hi = None for n = 1); None for n = 0."""
    seeds = sorted(set(values) & set(ref))
    diffs = [values[s] - ref[s] for s in seeds]
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"n": 1, "mean": mean, "lo": None, "hi": None, "seeds": seeds}
    half = t_quantile(0.5 + level / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"n": len(diffs), "mean": mean, "lo": mean - half, "hi": mean + half, "seeds": seeds}


def verdict(claim: Optional[str], delta: Optional[dict]) -> str:
    """The paper's claim about a cell against our interval. claim "<": the cell beats the
    reference (lower error); ">": it is worse; "=": no difference."""
    if claim is None:
        return "no claim"
    if delta is None:
        return "missing"
    if delta["lo"] is None:
        return "n = 1"
    lo, hi = delta["lo"], delta["hi"]
    if lo <= 0 <= hi:
        return "within noise"
    if claim == "=":
        return "fails"
    below = hi < 0
    return "holds" if below == (claim == "<") else "fails"


# ------------------------------------------------------------------------------ configs and runs
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


_COMPOSED = {}


def compose_cached(overrides):
    """compose(), remembered (a table composes the same cells for every seed and every table)."""
    key = tuple(overrides)
    if key not in _COMPOSED:
        try:
            _COMPOSED[key] = compose(list(overrides))
        except Exception as e:  # noqa: BLE001 - Hydra's and OmegaConf's errors: a key or choice this checkout lacks
            _COMPOSED[key] = e
    if isinstance(_COMPOSED[key], Exception):
        raise _COMPOSED[key]
    return _COMPOSED[key]


def merge_overrides(base: List[str], extra: List[str]) -> List[str]:
    """base overrides with extra ones replacing those of the same key."""
    keys = {e.split("=", 1)[0].lstrip("+~") for e in extra}
    return [b for b in base if b.split("=", 1)[0] not in keys] + list(extra)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def load_run(path: str):
    """A finished run directory: summary, per-epoch history, run record; None if unfinished or
    diverged (a diverged run's metrics.json says so; it never enters a table)."""
    if not os.path.isfile(os.path.join(path, "metrics.json")):
        return None
    if read_json(os.path.join(path, "metrics.json")).get("finished") is False:
        return None
    history = []
    if os.path.isfile(os.path.join(path, "metrics.jsonl")):
        with open(os.path.join(path, "metrics.jsonl")) as f:
            history = [json.loads(line) for line in f if line.strip()]
    record_path = os.path.join(path, "run_record.json")
    record = read_json(record_path) if os.path.isfile(record_path) else {}
    return {"dir": path, "name": os.path.basename(os.path.normpath(path)),
            "summary": read_json(os.path.join(path, "metrics.json")), "history": history, "record": record}


def flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _key(flat_identity: dict) -> str:
    return json.dumps(flat_identity, sort_keys=True)


def filled_identity(record: dict) -> Optional[dict]:
    """The flat identity of a recorded config on today's keys: a key the run's code did not have
    takes today's default for the run's own overrides (re-composed); a key today's configs no
    longer have is dropped. None when the record has no config."""
    config = record.get("config") or {}
    if not config:
        return None
    recorded = flat(identity(config))
    overrides = [o for o in record.get("overrides", []) if not o.startswith("seed=")]
    groups = [f"{g}={config[g]['name']}" for g in ("model", "norm", "data")
              if isinstance(config.get(g), dict) and "name" in config[g]]
    for attempt in (overrides, groups):
        try:
            defaults = flat(identity(compose_cached(attempt)))
            break
        except Exception:  # noqa: BLE001 - an override today's configs reject: try the group choices only
            continue
    else:
        return recorded
    return {k: recorded.get(k, v) for k, v in defaults.items()}


class RunIndex:
    """The finished runs under a directory, findable by the config they ran."""

    def __init__(self, root: str):
        self.by_name, self.by_identity = {}, {}
        for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            run = load_run(os.path.join(root, name))
            if run is None:
                continue
            self.by_name[name] = run
            ident = filled_identity(run["record"])
            if ident is not None:
                self.by_identity.setdefault(_key(ident), []).append(run)

    def find(self, ident: dict) -> List[dict]:
        """Runs of exactly this identity (mbn.naming.identity of a config): the directory named by
        today's run id, and every run whose recorded config (filled with today's defaults) equals it."""
        found = {}
        rid = run_id(ident)
        if rid in self.by_name:
            found[rid] = self.by_name[rid]
        for run in self.by_identity.get(_key(flat(ident)), []):
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


def _get(cfg, dotted):
    from omegaconf import OmegaConf

    v = OmegaConf.select(cfg, dotted)
    if v is not None and not isinstance(v, (str, int, float, bool)):
        v = tuple(OmegaConf.to_container(v))
    return v


def _from_overrides(overrides, dotted):
    """A cell key read from its overrides, for a cell today's configs cannot compose."""
    import yaml

    for o in overrides:
        k, _, v = o.partition("=")
        if k in (dotted, dotted[:-len(".name")] if dotted.endswith(".name") else None):
            v = yaml.safe_load(v)
            return tuple(v) if isinstance(v, list) else v
    return None


def lookup(grid: Grid, sweep: dict, runs_root: str) -> Dict[tuple, List[dict]]:
    """(row, col) -> the finished runs (one per seed found) of every cell of the grid. A cell that
    today's configs cannot compose (a normalizer or option this checkout lacks) is empty."""
    index = run_index(runs_root)
    cells = {}
    for block in grid.blocks:
        for overrides, row_label in expand_labeled(block):
            asked = merge_overrides(overrides + [f"train.epochs={sweep['epochs']}"], sweep["extra"])
            try:
                cfg = compose_cached(asked)  # the seed is set below: nothing in the configs depends on it
            except Exception as e:  # noqa: BLE001
                key = (row_label if grid.row == LABEL else _from_overrides(asked, grid.row),
                       _from_overrides(asked, grid.col))
                cells.setdefault(key, [])
                print(f"[results] {grid.name}: {' '.join(overrides)} cannot be composed here "
                      f"({type(e).__name__}); shown as missing")
                continue
            key = (row_label if grid.row == LABEL else _get(cfg, grid.row), _get(cfg, grid.col))
            cells.setdefault(key, [])
            base = identity(cfg)
            for seed in sweep["seeds"]:
                ident = dict(base, seed=seed)
                runs = index.find(ident)
                if len(runs) > 1:  # the same config run twice (e.g. under an older run id): keep the newest
                    runs.sort(key=lambda r: (r["name"] == run_id(ident), r["record"].get("started", "")))
                    print(f"[results] {grid.name}: {len(runs)} runs of one config and seed; using {runs[-1]['name']}")
                if runs and runs[-1] not in cells[key]:
                    runs[-1].setdefault("seed", seed)
                    cells[key].append(runs[-1])
    for row, (source, _) in grid.derived.items():
        for c in grid.cols:
            if (source, c) in cells:
                cells[(row, c)] = cells[(source, c)]
    return cells


def steps_per_epoch_at_128(extra) -> int:
    """SGD steps of a batch-128 epoch for the data these overrides select (Table 4's budget)."""
    cfg = compose(merge_overrides([], extra))
    n = cfg.data.train_size if cfg.data.name == "synthetic" else 50_000
    return max(1, n // 128)


def load_grid(runs_root: str, name: str):
    """(sweep, grid, cells, runs) for table/figure `name` from a runs directory, or None when
    there is no sweep file for it there (scripts/sweep.py writes one; collect_runs.py infers one
    for runs launched without it)."""
    from mbn.sweeps import grids

    source = grids(200)[name].sweep
    path = os.path.join(runs_root, f"sweep_{source}.json")
    if not os.path.isfile(path):
        return None
    sweep = read_json(path)
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


# ------------------------------------------------------------------------------ tables
def provenance(runs: List[dict], sweep: dict) -> dict:
    records = [r["record"] for r in runs]
    commits = sorted({((r.get("git") or {}).get("commit") or "unknown")[:10]
                      + ("+dirty" if (r.get("git") or {}).get("dirty") else "") for r in records})
    dates = sorted(r["started"][:10] for r in records if r.get("started"))
    out = {"schedule": f"{sweep['epochs']} epochs" + ("" if sweep["epochs"] == 200 else " (shortened; the paper: 200)"),
           "seeds asked": len(sweep["seeds"]), "extra overrides": " ".join(sweep["extra"]) or "none",
           "devices": sorted({r.get("device", "unknown") for r in records}) or ["none"],
           "precision": sorted({str((r.get("perf") or {}).get("precision", "unknown")) for r in records}) or ["none"],
           "commits": commits or ["none"],
           "torch": sorted({(r.get("versions") or {}).get("torch", "unknown") for r in records}) or ["none"],
           "dates": f"{dates[0]} .. {dates[-1]}" if dates else "none", "runs found": len(runs)}
    if sweep.get("inferred"):
        out["sweep"] = sweep["inferred"]
    return out


def _values(runs, metric) -> Dict[int, float]:
    out = {}
    for r in runs:
        v = r["summary"].get(metric)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[seed_of(r)] = float(v)
    return out


def _claim(grid: Grid, paper_delta) -> Optional[str]:
    if grid.claims == "same":
        return "="
    if paper_delta is None:
        return None
    return "<" if paper_delta < 0 else ">" if paper_delta > 0 else "="


def table_rows(grid: Grid, cells, paper: dict, synthetic: bool = False):
    """One row per cell: our mean ± std and n, the paired difference to the grid's reference cell,
    and (real data, a table of the paper) the paper's numbers and the verdict on its claim."""
    use_paper = bool(paper) and not synthetic and grid.paper_table
    rows = []
    for r in grid.rows:
        r = tuple(r) if isinstance(r, list) else r
        for c in grid.cols:
            key = (r, c)
            if key not in cells:
                continue  # not defined by the method (NormProp on a ResNet)
            metric = grid.derived.get(r, (None, grid.metric))[1]
            values = _values(cells[key], metric)
            mean, std, n = mean_std(list(values.values()))
            ref_key = (r if grid.ref_row is None else grid.ref_row, c if grid.ref_col is None else grid.ref_col)
            is_ref = ref_key == key
            delta = None if is_ref else paired_difference(values, _values(cells.get(ref_key, []), grid.metric))
            row = {grid.row_label: label(r), grid.col_label: label(c), "mean": mean, "std": std, "n": n,
                   "runs": len(cells[key]), "reference": is_ref, "delta": delta}
            if use_paper:
                ref = paper.get(label(r), {}).get(label(c))
                ref_paper = paper.get(label(ref_key[0]), {}).get(label(ref_key[1]))
                pd = None if is_ref or ref is None or ref_paper is None else round(ref - ref_paper, 4)
                claim = None if is_ref else _claim(grid, pd)
                in_ci = (None if pd is None or delta is None or delta["lo"] is None
                         else delta["lo"] <= pd <= delta["hi"])
                row.update(paper=ref, diff=(mean - ref) if mean is not None and ref is not None else None,
                           paper_delta=pd, claim=claim, paper_delta_in_ci=in_ci,
                           verdict="—" if is_ref else verdict(claim, delta))
            rows.append(row)
    return rows


def _fmt(x, digits=2):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _fmt_delta(row) -> str:
    if row["reference"]:
        return "reference"
    d = row["delta"]
    if d is None:
        return "—"
    if d["lo"] is None:
        return f"{d['mean']:+.2f} (n = 1)"
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] (n = {d['n']})"


def rule_text(grid: Grid, use_paper: bool) -> List[str]:
    ref = grid.ref_text
    lines = [f"**Δ vs reference (95% CI)**: reference = {ref}. For every seed both cells have, this cell's "
             "test error minus the reference's (runs of one seed share initialization and data order); the "
             "mean of those differences and a two-sided 95 % Student-t interval (n ≥ 2; `n = 1`: one pair, no "
             "interval). Negative: lower error than the reference."]
    if use_paper:
        if grid.claims == "same":
            rule = ("here the paper claims no difference (its text: \"relatively stable across different memory "
                    "sizes\"): `within noise` = our interval contains 0, consistent with the claim; `fails` = "
                    "it excludes 0")
        else:
            rule = ("read as the sign of the paper's own difference to the reference, paper Δ: `holds` = our "
                    "interval lies entirely on that side of 0; `fails` = entirely on the other side; "
                    "`within noise` = it contains 0")
        lines += ["", f"**verdict** on the paper's claim, {rule}; `n = 1` = no interval yet. **paper Δ in CI**: "
                  "whether the paper's difference lies inside our interval. The paper's numbers are 200-epoch "
                  "results; it does not say whether they are final- or best-epoch values, nor over how many "
                  "runs. Ours are final-epoch values."]
    return lines


def render(grid: Grid, rows, prov: dict, note: str = "", synthetic: bool = False, runs: List[dict] = ()):
    """Markdown and CSV of a table."""
    use_paper = any("paper" in r for r in rows)
    title = grid.title
    if synthetic:
        title = f"SYNTHETIC DATA (not the paper's data; not comparable with its numbers): {title}"
    md = [f"# {title}", "", "Generated by `scripts/make_tables.py` from the run directories; do not edit.", ""]
    md += [f"- {k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in prov.items()]
    if note:
        md += ["", note]
    md += [""] + rule_text(grid, use_paper)
    head = [grid.row_label, grid.col_label, "ours: test error % (mean ± std)", "n", "Δ vs reference (95% CI)"]
    if use_paper:
        head += ["paper", "paper Δ", "paper Δ in CI", "verdict"]
    md += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["n"] == 0:
            ours = "missing" if not r["runs"] else f"missing ({r['runs']} runs without this metric)"
        else:
            ours = _fmt(r["mean"]) + (f" ± {_fmt(r['std'])}" if r["std"] is not None else "")
        cells = [r[grid.row_label], r[grid.col_label], ours, str(r["n"]), _fmt_delta(r)]
        if use_paper:
            in_ci = {None: "—", True: "yes", False: "no"}[r["paper_delta_in_ci"]]
            pd = "—" if r["paper_delta"] is None else f"{r['paper_delta']:+.2f}"
            cells += [_fmt(r["paper"]), pd, in_ci, r["verdict"]]
        md.append("| " + " | ".join(cells) + " |")
    if runs:
        md += ["", "## Runs", ""] + [f"- `{name}`" for name in sorted(r["name"] for r in runs)]
    buf = io.StringIO()
    w = csv.writer(buf)
    keys = ["mean", "std", "n"]
    w.writerow([grid.row_label, grid.col_label] + keys + ["delta_mean", "delta_lo", "delta_hi", "delta_n"]
               + (["paper", "diff", "paper_delta", "paper_delta_in_ci", "verdict"] if use_paper else []))
    for r in rows:
        d = r["delta"] or {}
        vals = [r[k] for k in keys] + [d.get("mean"), d.get("lo"), d.get("hi"), d.get("n")]
        if use_paper:
            vals += [r["paper"], r["diff"], r["paper_delta"], r["paper_delta_in_ci"], r["verdict"]]
        w.writerow([r[grid.row_label], r[grid.col_label]] + ["" if v is None else v for v in vals])
    return "\n".join(md) + "\n", buf.getvalue()


def curves(runs: List[dict], key: str):
    """Per-epoch mean, min and max of `key` over seeds (runs of equal length)."""
    length = min(len(r["history"]) for r in runs)
    epochs = [runs[0]["history"][i]["epoch"] for i in range(length)]
    values = [[r["history"][i][key] for r in runs] for i in range(length)]
    return epochs, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


# ------------------------------------------------------------------------------ committed outputs
def tracked(path: str) -> bool:
    """Whether git tracks this file (it is committed, or staged to be)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return False
    try:
        r = subprocess.run(["git", "-C", folder, "ls-files", "--error-unmatch", os.path.basename(path)],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


PNG_RUNS_KEY = "mbn runs"


def recorded_runs(path: str) -> Optional[set]:
    """The run names an output says it was made from (a table's `## Runs` list, a figure's PNG
    text chunk); None when it does not say."""
    if path.endswith(".png"):
        from PIL import Image

        try:
            with Image.open(path) as im:
                text = getattr(im, "text", {}).get(PNG_RUNS_KEY)
        except OSError:
            return None
        return set(text.split()) if text is not None else None
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    if "## Runs" not in lines:
        return None
    return {ln[3:-1] for ln in lines[lines.index("## Runs") + 1:] if ln.startswith("- `") and ln.endswith("`")}


def check_replace(path: str, runs: List[dict], force: bool, made_from: Optional[str] = None) -> None:
    """Refuse (UserError) to replace a committed output made from other runs than `runs`, unless
    `force`. `made_from`: the file that records the runs (a table's .md for its .csv)."""
    if force or not os.path.exists(path) or not tracked(path):
        return
    source = made_from or path
    before = recorded_runs(source) if os.path.exists(source) else None
    now = {r["name"] for r in runs}
    if before == now:
        return
    why = "does not list the runs it was made from" if before is None else (
        f"was made from {len(before)} runs, {len(before - now)} of them not among the {len(now)} found now")
    raise UserError(f"{os.path.relpath(path)} is committed and {why}; pass --force to replace it, "
                    "or write elsewhere with --out")


# ------------------------------------------------------------------------------ runs without a sweep file
PAPER_GRIDS = ["table1", "table2", "table3", "table4", "table5", "table6", "figure1", "figure2"]


def schedule_name(runs: List[dict]) -> str:
    """The profile a set of runs belongs to, from their records: e<epochs>[-synthetic]."""
    epochs = {(r["record"].get("config") or {}).get("train", {}).get("epochs") for r in runs}
    if len(epochs) != 1 or None in epochs:
        raise UserError(f"the runs have several or unknown schedules ({sorted(map(str, epochs))} epochs); "
                        "collect each schedule into its own folder with --out")
    return f"e{epochs.pop()}" + ("-synthetic" if is_synthetic({}, runs) else "")


def infer_sweeps(runs_root: str) -> Dict[str, dict]:
    """Sweep files for runs that came without one (e.g. launched by hand): for each of the paper's
    grids whose cells these runs fill at least two of (one comparison): the runs' schedule, the
    seeds found, and as extra overrides those every run was given that the grid does not sweep
    (a grid is skipped where the runs all set a swept key, e.g. the model, to a value outside it;
    data=synthetic excepted)."""
    from mbn.naming import run_changing
    from mbn.sweeps import format_value, grids

    runs = list(run_index(runs_root).by_name.values())
    if not runs:
        return {}
    epochs = int(schedule_name(runs).split("-")[0][1:])
    seeds = sorted({seed_of(r) for r in runs if seed_of(r) is not None})
    given = [[o for o in r["record"].get("overrides", []) if run_changing(o.split("=", 1)[0])
              and o.split("=", 1)[0] not in ("seed", "train.epochs")] for r in runs]
    common = [o for o in given[0] if all(o in g for g in given[1:])]
    out = {}
    for name in PAPER_GRIDS:
        grid = grids(epochs)[name]
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
