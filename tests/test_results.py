"""Tables from runs: the t quantile and paired intervals, verdicts, the lookup of runs recorded
before config keys were added, the ablation and small-batch tables, sweeps inferred for runs
without a sweep file, and the refusal to replace committed outputs made from other runs. Runs
here are hand-made directories (no training): numbers chosen so every rule is exercised."""
import json
import math
import os
import subprocess
import sys

import matplotlib
import pytest
from omegaconf import OmegaConf

from mbn import UserError
from mbn.naming import run_id
from mbn.results import (_INDEXES, check_replace, compose_cached, infer_sweeps, load_grid, merge_overrides,
                         paired_difference, recorded_runs, schedule_name, t_critical, table_rows)
from mbn import sweeps
from mbn.sweeps import SMALL_BATCH_NORMS, SMALL_BATCHES, expand, expand_labeled, grids, lam_shift, small_batch_lr
from tests.conftest import REPO, run_cli

matplotlib.use("Agg")


def script(name, module=False):
    """scripts/<name>.py's main (or the module): called in-process, it reuses the configs the
    hand-made runs composed (a subprocess would start Hydra and compose every cell again)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_script_{name}", os.path.join(REPO, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod if module else mod.main


# ------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("df,expected", [  # two-sided 95 % critical values of Student's t (standard tables)
    (1, 12.706204736), (2, 4.302652730), (3, 3.182446305), (4, 2.776445105), (5, 2.570581836),
    (9, 2.262157163), (10, 2.228138852), (20, 2.085963447), (29, 2.045229642), (30, 2.042272456),
    (60, 2.000297822), (120, 1.979930405)])
def test_t_critical_matches_the_tables(df, expected):
    assert t_critical(df) == pytest.approx(expected, abs=1e-8)


def test_paired_difference_over_shared_seeds():
    ours = {0: 9.0, 1: 9.5, 2: 9.0, 7: 1.0}   # seed 7 has no reference: left out
    ref = {0: 10.0, 1: 11.5, 2: 12.0, 5: 3.0}
    d = paired_difference(ours, ref)
    assert d["n"] == 3 and d["seeds"] == [0, 1, 2] and d["mean"] == pytest.approx(-2.0)
    half = 4.302652730 * 1.0 / math.sqrt(3)  # differences −1, −2, −3: sample std 1
    assert d["lo"] == pytest.approx(-2.0 - half, abs=1e-8) and d["hi"] == pytest.approx(-2.0 + half, abs=1e-8)
    assert d["half"] == pytest.approx(half, abs=1e-8) and not d["zero_width"]
    one = paired_difference({0: 5.0}, {0: 4.0, 1: 3.0})
    assert (one["n"], one["mean"], one["lo"], one["hi"], one["p"], one["seeds"]) == (1, 1.0, None, None, None, [0])
    assert paired_difference({1: 5.0}, {0: 4.0}) is None


# ------------------------------------------------------------------------------ hand-made runs
def fake_run(root, overrides, metrics, name=None, drop=(), started="2026-01-01T00:00:00+0000", record=None,
             status="finished"):
    """A run directory as the trainer leaves it. `drop`: dotted config keys left out of the record,
    as by code older than those keys; `name`: a directory name other than the run id; `record`:
    run-record entries to set (device, perf); `status`: the metrics.json status (e.g. diverged)."""
    seeds = [int(o[5:]) for o in overrides if o.startswith("seed=")]
    config = OmegaConf.to_container(compose_cached([o for o in overrides if not o.startswith("seed=")]),
                                    resolve=True)
    config["seed"] = seeds[-1] if seeds else config["seed"]
    for key in drop:
        *parents, last = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        del node[last]
    d = root / (name or run_id(config))
    d.mkdir(parents=True)
    err = metrics.get("test_err", 50.0)
    history = [{"epoch": e, "test_err": err + 5 * (2 - e), "train_err": 40.0 - e} for e in (1, 2)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    (d / "metrics.json").write_text(json.dumps({**metrics, "finished": status == "finished", "status": status}))
    (d / "run_record.json").write_text(json.dumps({
        "config": config, "overrides": list(overrides), "git": {"commit": "0123456789abcdef", "dirty": False},
        "device": "cpu (test)", "versions": {"torch": "test"}, "started": started, **(record or {})}))
    return d


def write_sweep(root, table, epochs, seeds, extra=()):
    root.mkdir(parents=True, exist_ok=True)
    (root / f"sweep_{table}.json").write_text(json.dumps({"table": table, "epochs": epochs, "seeds": list(seeds),
                                                          "extra": list(extra)}))


def cell_overrides(grid, want, seed, epochs, extra=()):
    """The overrides of the grid's cell whose block overrides include all of `want`."""
    for block in grid.blocks:
        for overrides in expand(block):
            if all(w in overrides for w in want):
                return merge_overrides(overrides + [f"seed={seed}", f"train.epochs={epochs}"], list(extra))
    raise KeyError(want)


def md_rows(path):
    rows = {}
    for line in open(path, encoding="utf-8"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 4 and cells[3].isdigit():
            rows[(cells[0], cells[1])] = cells
    return rows


# Table 1's ResNet-20 column and NIN's BN/NormProp, three seeds, real-data configs (not trained)
TABLE1 = {("bn", "resnet20"): [10.0, 10.2, 9.9], ("mbn", "resnet20"): [9.0, 9.3, 9.1],
          ("brn", "resnet20"): [11.0, 11.2, 10.8], ("bn", "nin"): [8.0, 8.4, 8.1],
          ("normprop", "nin"): [8.3, 8.1, 8.2]}


def test_shortened_table1_has_paired_differences_and_no_verdicts(tmp_path):
    """A 2-epoch Table 1: ours, n, the train error and the paired Δ with its interval; no paper
    columns, and the header says why."""
    root = tmp_path / "e2"
    grid = grids(2)["table1"]
    write_sweep(root, "table1", 2, [0, 1, 2])
    for (norm, model), errs in TABLE1.items():
        for seed, err in enumerate(errs):
            fake_run(root, cell_overrides(grid, [f"norm={norm}", f"model={model}"], seed, 2),
                     {"test_err": err, "train_err": err - 3})
    out = tmp_path / "out"
    assert script("make_tables")(["--runs", str(root), "--out", str(out), "--tables", "table1"]) == 0
    md = (out / "table1.md").read_text()
    rows = md_rows(out / "table1.md")
    assert "Δ vs reference (95% CI)" in md and "BN-1 in the same column" in md and "Student-t" in md
    assert "**No paper Δ and no verdicts**: these runs have a schedule of 2 epochs" in md
    head = next(line for line in md.splitlines() if line.startswith("| method"))
    assert "paper" not in head and "verdict" not in head and "MDE" not in head
    # MBN − BN per seed: −1.0, −0.9, −0.8 -> mean −0.9, half width t(0.975, 2) · 0.1 / √3
    half = 4.302652730 * 0.1 / math.sqrt(3)
    mbn = rows[("mbn", "resnet20")]
    assert mbn[2:5] == ["9.13 ± 0.15", "3", "6.13 ± 0.15"]
    assert mbn[5] == f"-0.90 [{-0.9 - half:+.2f}, {-0.9 + half:+.2f}] (n = 3)"
    assert rows[("bn", "resnet20")][5] == "reference"
    assert rows[("mbn", "resnet56")][2:4] == ["missing", "0"]
    assert "## Runs" in md and len(recorded_runs(str(out / "table1.md"))) == 15
    csv_text = (out / "table1.csv").read_text().splitlines()
    assert csv_text[0] == ("method,model,mean,std,n,diverged,train_mean,train_std,delta_mean,delta_lo,delta_hi,"
                           "delta_n,unpaired")


def test_synthetic_tables_are_titled_so_and_never_compared(tmp_path):
    root = tmp_path / "e2-synthetic"
    extra = ["data=synthetic", "data.train_size=64"]
    grid = grids(2)["table6"]
    write_sweep(root, "table6", 2, [0, 1], extra)
    for k, errs in {"10": [30.0, 31.0], "20": [32.0, 34.0]}.items():
        for seed, err in enumerate(errs):
            fake_run(root, cell_overrides(grid, [f"norm.memory_size={k}"], seed, 2, extra), {"test_err": err})
    sweep, grid, cells, runs = load_grid(str(root), "table6")
    rows = table_rows(grid, cells, {"10": {"mbn": 7.87}, "20": {"mbn": 7.8}}, synthetic=True)
    assert all("paper" not in r and "verdict" not in r for r in rows)
    out = tmp_path / "out"
    assert script("make_tables")(["--runs", str(root), "--out", str(out), "--tables", "table6"]) == 0
    md = (out / "table6.md").read_text()
    assert md.startswith("# SYNTHETIC DATA") and "paper" not in md.split("| memory size")[1]
    assert md_rows(out / "table6.md")[("20", "mbn")][4] == "+2.50 [-3.85, +8.85] (n = 2)"


def test_runs_recorded_before_config_keys_were_added_are_found(tmp_path):
    """Old runs lack keys added since (here: MBN's newest_weight and grad, PreciseBN's batch count)
    and sit under run ids of the old config: the tables find them by their recorded config, with
    the missing keys taking today's defaults; a run whose recorded value differs is not taken."""
    root = tmp_path / "e2"
    grid = grids(2)["table6"]
    write_sweep(root, "table6", 2, [0])
    old = ["norm.newest_weight", "norm.grad", "train.precise_batches"]
    fake_run(root, cell_overrides(grid, ["norm.memory_size=10"], 0, 2), {"test_err": 11.0},
             name="cifar10-resnet20-mbn-bs128-e2-df1-seed0-0ld1d000", drop=old)
    fake_run(root, cell_overrides(grid, ["norm.memory_size=20"], 0, 2) + ["norm.eta=0.5"], {"test_err": 99.0},
             name="cifar10-resnet20-mbn-bs128-e2-df1-seed0-0ld2d000", drop=old)
    sweep, grid, cells, runs = load_grid(str(root), "table6")
    assert [r["name"] for r in cells[(10, "mbn")]] == ["cifar10-resnet20-mbn-bs128-e2-df1-seed0-0ld1d000"]
    assert cells[(20, "mbn")] == []  # η = 0.5 is not the cell's η = 0.9


def test_committed_e3_runs_still_regenerate_the_committed_tables(tmp_path):
    """results/runs/e3 was recorded before several config keys existed (its run ids are no longer
    today's): the regenerated tables hold the committed numbers, from the same runs."""
    assert script("make_tables")(["--runs", os.path.join(REPO, "results", "runs", "e3"), "--out", str(tmp_path),
                                  "--tables", "table1", "table6"]) == 0
    for table in ("table1", "table6"):
        committed = md_rows(os.path.join(REPO, "results", "e3", f"{table}.md"))
        regenerated = md_rows(tmp_path / f"{table}.md")
        assert {k: v[2:4] for k, v in regenerated.items()} == {k: v[2:4] for k, v in committed.items()}
        assert sum(v[3] == "1" for v in regenerated.values()) == 3
        made_from = recorded_runs(os.path.join(REPO, "results", "e3", f"{table}.md"))
        assert made_from is None or made_from == recorded_runs(str(tmp_path / f"{table}.md"))


def test_committed_shortened_tables_give_no_verdicts():
    """results/e3 and results/e30 are 3- and 30-epoch tables: no paper columns, and the header says why."""
    for profile, epochs in (("e3", 3), ("e30", 30)):
        md = open(os.path.join(REPO, "results", profile, "table1.md"), encoding="utf-8").read()
        head = next(line for line in md.splitlines() if line.startswith("| method"))
        assert "verdict" not in head and "paper" not in head and "train error" in head
        assert f"**No paper Δ and no verdicts**: these runs have a schedule of {epochs} epochs" in md


# ------------------------------------------------------------------------------ the studies
def test_ablation_grid_definition():
    g = grids(200)["mbn_ablation"]
    assert lam_shift(200) == [0.425, 0.625] and lam_shift(30) == [0.566667, 0.766667] and lam_shift(3) == [0.6, 0.8]
    labeled = [(o, lab) for b in g.blocks for o, lab in expand_labeled(b)]
    assert all("model=resnet20" in o for o, _ in labeled)
    by_label = {lab: o for o, lab in labeled}
    assert len(by_label) == len(labeled)  # every variant its own row
    assert by_label["BN-1 (reference)"] == ["model=resnet20", "norm=bn"]
    assert by_label["BN-2 (double forward: running averages from the second forward)"] == [
        "model=resnet20", "norm=bn", "train.double_forward=true"]
    assert by_label["MBN λ = 0, single forward (control: must equal BN-1)"] == [
        "model=resnet20", "norm=mbn", "norm.lam=[0.0]", "train.double_forward=false"]
    assert by_label["λ = {0.5} throughout"][-1] == "norm.lam=[0.5]"
    assert by_label["λ = {0.9} throughout"][-1] == "norm.lam=[0.9]"
    assert by_label["λ = {0.9, 0.5, 0.1}: λ falls as the lr falls"][-1] == "norm.lam=[0.9,0.5,0.1]"
    assert by_label["memory size k = 2"][-1] == "norm.memory_size=2"
    assert by_label["MBN-1 (single forward)"][-1] == "train.double_forward=false"
    assert by_label["precision bf16"][-1] == "perf.precision=bf16"
    assert "norm.lam_milestones=[0.425,0.625]" in by_label["λ steps 5 epochs after each lr drop (at {0.425, 0.625} of "
                                                          "training)"]
    for key in ("norm.newest_weight=one", "norm.grad=renorm", "norm.eta=1.0"):
        assert any(key in o for o, _ in labeled)
    assert len(g.rows) == len(labeled) + 4 and g.rows[-1].startswith("BN-1 inference: precise")
    assert g.train_err and grids(200)["table1"].train_err


def test_ablation_table(tmp_path):
    root = tmp_path / "e2"
    grid = grids(2)["mbn_ablation"]
    write_sweep(root, "mbn_ablation", 2, [0, 1])
    runs = {("norm=bn",): [{"test_err": 10.0, "test_err_running": 10.0, "test_err_precise": 9.5, "train_err": 8.4},
                           {"test_err": 10.4, "test_err_running": 10.4, "train_err": 8.6}],
            ("norm=mbn",): [{"test_err": 11.0, "test_err_running": 10.5, "train_err": 9.6},
                            {"test_err": 11.6, "test_err_running": 10.7, "train_err": 9.8}],
            ("norm.memory_size=2",): [{"test_err": 12.0}, {"test_err": 12.2}],
            ("norm.lam=[0.0]",): [{"test_err": 10.0}, {"test_err": 10.4}]}
    for want, metrics in runs.items():
        for seed, m in enumerate(metrics):
            fake_run(root, cell_overrides(grid, list(want), seed, 2), m)
    out = tmp_path / "out"
    assert script("make_tables")(["--runs", str(root), "--out", str(out), "--tables", "mbn_ablation"]) == 0
    rows = {k[0]: v for k, v in md_rows(out / "mbn_ablation.md").items()}
    paper_row = rows[next(k for k in rows if k.startswith("MBN-2, the paper"))]
    assert rows["BN-1 (reference)"][4:6] == ["8.50 ± 0.14", "reference"]
    assert paper_row[2:5] == ["11.30 ± 0.42", "2", "9.70 ± 0.14"]  # the train error column
    assert rows["memory size k = 2"][2:5] == ["12.10 ± 0.14", "2", "—"]
    assert rows["memory size k = 10"][2:4] == paper_row[2:4]
    assert rows["MBN λ = 0, single forward (control: must equal BN-1)"][5] == "+0.00, zero width: identical " \
                                                                            "differences (n = 2)"
    assert rows["MBN-2 inference: running averages"][2:6] == ["10.60 ± 0.14", "2", "9.70 ± 0.14",
                                                              "+0.40 [-0.87, +1.67] (n = 2)"]
    assert rows["MBN-2 inference: precise (PreciseBN, final weights)"][2] == "missing (2 runs without this metric)"
    assert rows["BN-1 inference: precise (PreciseBN, final weights)"][2:6] == ["9.50", "1", "8.50 ± 0.14",
                                                                               "-0.50 (n = 1)"]
    assert rows["η = 0.5"][2:4] == ["missing", "0"]
    md = (out / "mbn_ablation.md").read_text()
    assert "**No paper Δ and no verdicts**: the paper has no numbers for this table" in md
    assert "verdict" not in next(line for line in md.splitlines() if line.startswith("| variant"))


def test_small_batch_grids():
    g = grids(30, 390)
    steps, epochs = g["small_batch_steps"], g["small_batch_epochs"]
    cells = [o for b in steps.blocks for o in expand(b)]
    assert 64 in SMALL_BATCHES and len(cells) == len(SMALL_BATCHES) * len(SMALL_BATCH_NORMS) == 49
    assert all("train.steps=11700" in o and not any(x.startswith("optim.lr") for x in o) for o in cells)
    cells = [o for b in epochs.blocks for o in expand(b)]
    assert len(cells) == 49 and not any(x.startswith("train.steps") for o in cells for x in o)
    assert {o[2]: o[3] for o in cells} == {f"train.batch_size={b}": f"optim.lr={0.1 * b / 128:g}"
                                           for b in SMALL_BATCHES}
    assert small_batch_lr(128) == 0.1 and small_batch_lr(2) == 0.0015625
    assert set(steps.row_notes) == {2, 4} and not epochs.row_notes  # below Table 4's smallest batch, 8
    assert steps.cols[-1] == epochs.cols[-1] == "bn (PreciseBN)" and steps.metric_of(8, "bn (PreciseBN)") == \
        "test_err_precise"


def test_small_batch_table_and_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(sweeps, "SMALL_BATCH_NORMS", ["bn", "mbn"])  # two columns keep it fast (a compose per cell)
    root = tmp_path / "e2"
    grid = grids(2)["small_batch_steps"]
    write_sweep(root, "small_batch_steps", 2, [0, 1])
    errs = {("bn", 2): [50.0, 52.0], ("mbn", 2): [40.0, 41.0], ("bn", 128): [10.0, 11.0], ("mbn", 128): [10.5, 11.0]}
    for (norm, bs), values in errs.items():
        for seed, err in enumerate(values):
            fake_run(root, cell_overrides(grid, [f"norm={norm}", f"train.batch_size={bs}"], seed, 2),
                     {"test_err": err, "test_err_precise": err - 1})
    out = tmp_path / "out"
    assert script("make_tables")(["--runs", str(root), "--out", str(out), "--tables", "small_batch_steps"]) == 0
    rows = md_rows(out / "small_batch_steps.md")
    two = "2 (below 8: outside the paper's rule, no verdict)"
    assert rows[(two, "mbn")][2:5] == ["40.50 ± 0.71", "2", "-10.50 [-16.85, -4.15] (n = 2)"]
    assert rows[("128", "bn")][4] == "reference" and rows[("64", "bn")][2] == "missing"
    assert rows[(two, "bn (PreciseBN)")][2:5] == ["50.00 ± 1.41", "2", "-1.00, zero width: identical differences "
                                                                       "(n = 2)"]
    assert len(rows) == 7 * 3 and "SGD steps, lr 0.1" in (out / "small_batch_steps.md").read_text()
    assert script("plot_curves")(["--runs", str(root), "--out", str(out), "--figures", "small_batch_steps"]) == 0
    assert recorded_runs(str(out / "small_batch_steps.png")) == {p.name for p in root.iterdir() if p.is_dir()}


# ------------------------------------------------------------------------------ runs without a sweep file
def test_collect_infers_the_sweep_of_runs_launched_by_hand(tmp_path):
    """Runs made by `train.py -m model=resnet20 norm=bn,mbn` in a folder named for another schedule:
    collect_runs writes the sweep file make_tables needs, naming it as inferred."""
    src = tmp_path / "e200"  # misnamed: the runs are 2-epoch runs
    grid = grids(2)["table1"]
    for norm, err in (("bn", 12.0), ("mbn", 13.0)):
        fake_run(src, cell_overrides(grid, [f"norm={norm}", "model=resnet20"], 0, 2) + ["name=e200"],
                 {"test_err": err})
    runs = [json.loads((d / "run_record.json").read_text()) for d in src.iterdir()]
    assert schedule_name([{"record": r} for r in runs]) == "e2"
    out = tmp_path / "collected" / "e2"
    assert script("collect_runs")(["--runs", str(src), "--out", str(out)]) == 0
    sweep = json.loads((out / "sweep_table1.json").read_text())
    assert sweep["epochs"] == 2 and sweep["seeds"] == [0] and sweep["extra"] == [] and "inferred" in sweep
    assert not (out / "sweep_figure1.json").exists()  # ResNet-56's grid: these runs are not in it
    assert set(infer_sweeps(str(out))) == {"table1", "figure2"}
    assert script("make_tables")(["--runs", str(out), "--out", str(tmp_path / "t"), "--tables", "table1"]) == 0
    assert md_rows(tmp_path / "t" / "table1.md")[("mbn", "resnet20")][5] == "+1.00 (n = 1)"


# ------------------------------------------------------------------------------ committed outputs
def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def test_committed_outputs_are_replaced_only_from_the_same_runs(tmp_path, capsys):
    repo = tmp_path / "repo"
    runs = repo / "runs"
    grid = grids(2)["table6"]
    write_sweep(runs, "table6", 2, [0], ["data=synthetic"])
    fake_run(runs, cell_overrides(grid, ["norm.memory_size=10"], 0, 2, ["data=synthetic"]), {"test_err": 30.0})
    out = repo / "results"
    make_tables = script("make_tables")
    args = ["--runs", str(runs), "--out", str(out), "--tables", "table6"]
    assert make_tables(args) == 0
    _git(repo, "init", "-q")
    _git(repo, "add", "results")
    _git(repo, "commit", "-qm", "tables")
    assert make_tables(args) == 0  # the same runs: regenerating is fine
    fake_run(runs, cell_overrides(grid, ["norm.memory_size=20"], 0, 2, ["data=synthetic"]), {"test_err": 31.0})
    _INDEXES.clear()  # a new run appeared in the folder
    before = (out / "table6.md").read_text()
    with pytest.raises(UserError, match="table6.md is committed and was made from 1 runs.*--force"):
        make_tables(args)
    assert (out / "table6.md").read_text() == before
    assert make_tables(args + ["--force"]) == 0
    assert len(recorded_runs(str(out / "table6.md"))) == 2

    # a figure records its runs in the PNG; one that records none is "made from other runs"
    import matplotlib.pyplot as plt

    png = out / "figure.png"
    for meta in ({"mbn runs": "a b"}, {}):
        plt.figure().savefig(png, metadata=meta)
        plt.close("all")
        _git(repo, "add", "results")
        _git(repo, "commit", "-qm", "figure")
        runs_ab = [{"name": "a"}, {"name": "b"}]
        if meta:
            check_replace(str(png), runs_ab, force=False)
        with pytest.raises(UserError, match="figure.png is committed"):
            check_replace(str(png), runs_ab[:1], force=False)
        check_replace(str(png), runs_ab[:1], force=True)
    check_replace(str(tmp_path / "elsewhere.md"), [], force=False)  # not committed: free to write


def test_table_script_errors_are_one_line(tmp_path):
    """Issue 18 #21: a --runs folder that does not exist is one line, exit 2, and nothing is created
    (neither the default results/<name>/ nor --out)."""
    missing = tmp_path / "does-not-exist"
    r = run_cli("scripts/make_tables.py", "--runs", str(missing), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr == f"error: --runs {missing}: no such folder\n"
    assert not os.path.exists(os.path.join(REPO, "results", "does-not-exist")) and not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="^no finished runs"):  # in-process: the same boundary, no start-up
        script("collect_runs")(["--runs", str(tmp_path)])
    with pytest.raises(UserError, match="invalid choice: 'figure9'.*see .* --help"):  # argparse: one line too
        script("plot_curves")(["--runs", str(tmp_path), "--figures", "figure9"])
    with pytest.raises(UserError, match=r"--runs .*does-not-exist: no such folder"):
        script("plot_curves")(["--runs", str(missing)])
    for margin in ("0", "-1", "nan", "inf"):  # an infinite margin would call every cell equivalent
        with pytest.raises(UserError, match=f"--margin {margin}.*must be a positive number"):
            script("make_tables")(["--runs", str(tmp_path), "--out", str(tmp_path / "out"), "--margin", margin])


def test_every_open_choice_in_results_readme_gives_its_reason():
    """Issue 17.7: each row of 'Choices the paper leaves open' says what we do *and why*."""
    with open(os.path.join(REPO, "results", "README.md"), encoding="utf-8") as f:
        text = f.read()
    table = text.split("## Choices the paper leaves open", 1)[1].split("\n\n|", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in ("|" + table).splitlines()[2:] if line.startswith("| ")]
    assert len(rows) >= 15
    assert [r[:60] for r in rows if "*Why*" not in r.split(" | ")[1]] == []


def test_collect_into_an_out_that_is_a_file_is_a_mistake_in_the_command(tmp_path, capsys):
    """--out names a file: exit 2 (the command's mistake), not 4 (the machine's), and the file is kept."""
    from mbn.cli import guarded

    out = tmp_path / "a-file"
    out.write_text("mine")
    with pytest.raises(SystemExit) as e:  # through the scripts' boundary, as `python scripts/...` runs
        guarded(script("collect_runs"), ["--runs", os.path.join(REPO, "results", "runs", "e3"), "--out", str(out)])
    assert e.value.code == 2 and f"error: {out}: a file is where a folder belongs" in capsys.readouterr().err
    assert out.read_text() == "mine"
