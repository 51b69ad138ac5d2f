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
                         paired_difference, recorded_runs, schedule_name, t_quantile, t_two_sided_mass, table_rows,
                         verdict)
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
def test_t_quantile_matches_the_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-8)


def test_t_quantile_closed_forms_and_limit():
    # df = 1 is Cauchy: tan(π(q − 1/2)); df = 2: (2q − 1) / sqrt(2q(1 − q))
    for q in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(q, 1) == pytest.approx(math.tan(math.pi * (q - 0.5)), rel=1e-12)
        assert t_quantile(q, 2) == pytest.approx((2 * q - 1) / math.sqrt(2 * q * (1 - q)), rel=1e-12)
    assert t_quantile(0.975, 2000) == pytest.approx(1.959963985, abs=2e-3)  # → the normal's 1.96
    assert t_quantile(0.975, 2000) > 1.959963985


@pytest.mark.parametrize("df", [3, 4, 7])
def test_t_mass_is_the_integral_of_the_density(df):
    """P(|T| <= t) against Simpson's rule on the t density (float64)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def pdf(x):
        return c * (1 + x * x / df) ** (-(df + 1) / 2)

    t, n = 1.7, 2000
    h = t / n
    simpson = pdf(0) + pdf(t) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
    assert t_two_sided_mass(t, df) == pytest.approx(2 * simpson * h / 3, abs=1e-12)


def test_paired_difference_over_shared_seeds():
    ours = {0: 9.0, 1: 9.5, 2: 9.0, 7: 1.0}   # seed 7 has no reference: left out
    ref = {0: 10.0, 1: 11.5, 2: 12.0, 5: 3.0}
    d = paired_difference(ours, ref)
    assert d["n"] == 3 and d["seeds"] == [0, 1, 2] and d["mean"] == pytest.approx(-2.0)
    half = 4.302652730 * 1.0 / math.sqrt(3)  # differences −1, −2, −3: sample std 1
    assert d["lo"] == pytest.approx(-2.0 - half, abs=1e-8) and d["hi"] == pytest.approx(-2.0 + half, abs=1e-8)
    one = paired_difference({0: 5.0}, {0: 4.0, 1: 3.0})
    assert one == {"n": 1, "mean": 1.0, "lo": None, "hi": None, "seeds": [0]}
    assert paired_difference({1: 5.0}, {0: 4.0}) is None


def test_verdicts():
    def iv(lo, hi):
        return {"n": 3, "mean": (lo + hi) / 2, "lo": lo, "hi": hi}

    assert verdict("<", iv(-2, -1)) == "holds" and verdict("<", iv(1, 2)) == "fails"
    assert verdict(">", iv(1, 2)) == "holds" and verdict(">", iv(-2, -1)) == "fails"
    assert verdict("<", iv(-1, 1)) == verdict(">", iv(-1, 0)) == "within noise"
    assert verdict("=", iv(-1, 1)) == "within noise" and verdict("=", iv(0.1, 1)) == "fails"
    assert verdict("<", {"n": 1, "mean": -1.0, "lo": None, "hi": None}) == "n = 1"
    assert verdict(None, iv(-2, -1)) == "no claim" and verdict("<", None) == "missing"


# ------------------------------------------------------------------------------ hand-made runs
def fake_run(root, overrides, metrics, name=None, drop=(), started="2026-01-01T00:00:00+0000"):
    """A finished run directory as the trainer leaves it. `drop`: dotted config keys left out of
    the record, as by code older than those keys; `name`: a directory name other than the run id."""
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
    history = [{"epoch": e, "test_err": metrics["test_err"] + 5 * (2 - e), "train_err": 40.0 - e} for e in (1, 2)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    (d / "metrics.json").write_text(json.dumps({**metrics, "finished": True}))
    (d / "run_record.json").write_text(json.dumps({
        "config": config, "overrides": list(overrides), "git": {"commit": "0123456789abcdef", "dirty": False},
        "device": "cpu (test)", "versions": {"torch": "test"}, "started": started}))
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


def test_table1_paired_differences_and_verdicts(tmp_path):
    root = tmp_path / "e2"
    grid = grids(2)["table1"]
    write_sweep(root, "table1", 2, [0, 1, 2])
    for (norm, model), errs in TABLE1.items():
        for seed, err in enumerate(errs):
            fake_run(root, cell_overrides(grid, [f"norm={norm}", f"model={model}"], seed, 2), {"test_err": err})
    out = tmp_path / "out"
    assert script("make_tables")(["--runs", str(root), "--out", str(out), "--tables", "table1"]) == 0
    md = (out / "table1.md").read_text()
    rows = md_rows(out / "table1.md")
    assert "Δ vs reference (95% CI)" in md and "BN-1 in the same column" in md and "Student-t" in md
    assert "does not say whether they are final- or best-epoch values" in md
    # MBN − BN per seed: −1.0, −0.9, −0.8 -> mean −0.9, half width t(0.975, 2) · 0.1 / √3
    half = 4.302652730 * 0.1 / math.sqrt(3)
    mbn = rows[("mbn", "resnet20")]
    assert mbn[2] == "9.13 ± 0.15" and mbn[3] == "3"
    assert mbn[4] == f"-0.90 [{-0.9 - half:+.2f}, {-0.9 + half:+.2f}] (n = 3)"
    assert mbn[5:] == ["7.93", "-0.48", "no", "holds"]
    assert rows[("brn", "resnet20")][-1] == "fails"  # paper: BRN beats BN; ours: +0.97 [..] above 0
    assert rows[("normprop", "nin")][-1] == "within noise"  # −0.0(3) with an interval across 0
    assert rows[("bn", "resnet20")][4] == "reference" and rows[("bn", "resnet20")][-1] == "—"
    assert rows[("mbn", "resnet56")][2] == "missing" and rows[("mbn", "resnet56")][3] == "0"
    assert "## Runs" in md and len(recorded_runs(str(out / "table1.md"))) == 15
    csv_text = (out / "table1.csv").read_text().splitlines()
    assert csv_text[0].startswith("method,model,mean,std,n,delta_mean,delta_lo,delta_hi,delta_n,paper")


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


# ------------------------------------------------------------------------------ the studies
def test_ablation_grid_definition():
    g = grids(200)["mbn_ablation"]
    assert lam_shift(200) == [0.425, 0.625] and lam_shift(30) == [0.566667, 0.766667] and lam_shift(3) == [0.6, 0.8]
    labeled = [(o, lab) for b in g.blocks for o, lab in expand_labeled(b)]
    assert all("model=resnet20" in o for o, _ in labeled)
    by_label = {lab: o for o, lab in labeled}
    assert by_label["BN-1 (reference)"] == ["model=resnet20", "norm=bn"]
    assert by_label["λ = {0.5} throughout"][-1] == "norm.lam=[0.5]"
    assert by_label["memory size k = 2"][-1] == "norm.memory_size=2"
    assert by_label["MBN-1 (single forward)"][-1] == "train.double_forward=false"
    assert by_label["precision bf16"][-1] == "perf.precision=bf16"
    assert "norm.lam_milestones=[0.425,0.625]" in by_label["λ steps 5 epochs after each lr drop (at {0.425, 0.625} of "
                                                          "training)"]
    for key in ("norm.newest_weight=one", "norm.grad=renorm", "norm.eta=1.0"):
        assert any(key in o for o, _ in labeled)
    assert len(g.rows) == len(labeled) + 4 and g.rows[-1].startswith("BN-1 inference: precise")


def test_ablation_table(tmp_path):
    root = tmp_path / "e2"
    grid = grids(2)["mbn_ablation"]
    write_sweep(root, "mbn_ablation", 2, [0, 1])
    runs = {("norm=bn",): [{"test_err": 10.0, "test_err_running": 10.0, "test_err_precise": 9.5},
                           {"test_err": 10.4, "test_err_running": 10.4}],
            ("norm=mbn",): [{"test_err": 11.0, "test_err_running": 10.5}, {"test_err": 11.6, "test_err_running": 10.7}],
            ("norm.memory_size=2",): [{"test_err": 12.0}, {"test_err": 12.2}]}
    for want, metrics in runs.items():
        for seed, m in enumerate(metrics):
            fake_run(root, cell_overrides(grid, list(want), seed, 2), m)
    out = tmp_path / "out"
    assert script("make_tables")(["--runs", str(root), "--out", str(out), "--tables", "mbn_ablation"]) == 0
    rows = {k[0]: v for k, v in md_rows(out / "mbn_ablation.md").items()}
    assert rows["BN-1 (reference)"][4] == "reference"
    assert rows["memory size k = 2"][2:4] == ["12.10 ± 0.14", "2"]
    assert rows["memory size k = 10"][2:4] == rows[next(k for k in rows if k.startswith("MBN-2, the paper"))][2:4]
    assert rows["MBN-2 inference: running averages"][2:5] == ["10.60 ± 0.14", "2", "+0.40 [-0.87, +1.67] (n = 2)"]
    assert rows["MBN-2 inference: precise (PreciseBN, final weights)"][2] == "missing (2 runs without this metric)"
    assert rows["BN-1 inference: precise (PreciseBN, final weights)"][2:5] == ["9.50", "1", "-0.50 (n = 1)"]
    assert rows["η = 0.5"][2:4] == ["missing", "0"]
    assert "verdict" not in (out / "mbn_ablation.md").read_text()


def test_small_batch_grids():
    g = grids(30, 390)
    steps, epochs = g["small_batch_steps"], g["small_batch_epochs"]
    cells = [o for b in steps.blocks for o in expand(b)]
    assert len(cells) == len(SMALL_BATCHES) * len(SMALL_BATCH_NORMS) == 42
    assert all("train.steps=11700" in o and not any(x.startswith("optim.lr") for x in o) for o in cells)
    cells = [o for b in epochs.blocks for o in expand(b)]
    assert len(cells) == 42 and not any(x.startswith("train.steps") for o in cells for x in o)
    assert {o[2]: o[3] for o in cells} == {f"train.batch_size={b}": f"optim.lr={0.1 * b / 128:g}"
                                           for b in SMALL_BATCHES}
    assert small_batch_lr(128) == 0.1 and small_batch_lr(2) == 0.0015625


def test_small_batch_table_and_figure(tmp_path):
    root = tmp_path / "e2"
    grid = grids(2)["small_batch_epochs"]
    write_sweep(root, "small_batch_epochs", 2, [0, 1])
    errs = {("bn", 2): [50.0, 52.0], ("mbn", 2): [40.0, 41.0], ("bn", 128): [10.0, 11.0], ("mbn", 128): [10.5, 11.0]}
    for (norm, bs), values in errs.items():
        for seed, err in enumerate(values):
            fake_run(root, cell_overrides(grid, [f"norm={norm}", f"train.batch_size={bs}"], seed, 2),
                     {"test_err": err})
    out = tmp_path / "out"
    assert script("make_tables")(["--runs", str(root), "--out", str(out), "--tables", "small_batch_epochs"]) == 0
    rows = md_rows(out / "small_batch_epochs.md")
    assert rows[("2", "mbn")][2:5] == ["40.50 ± 0.71", "2", "-10.50 [-16.85, -4.15] (n = 2)"]
    assert rows[("128", "bn")][4] == "reference" and rows[("4", "bn")][2] == "missing"
    assert len(rows) == 42 and "lr 0.1 · batch / 128" in (out / "small_batch_epochs.md").read_text()
    assert script("plot_curves")(["--runs", str(root), "--out", str(out), "--figures", "small_batch_epochs"]) == 0
    assert recorded_runs(str(out / "small_batch_epochs.png")) == {p.name for p in root.iterdir() if p.is_dir()}


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
    assert md_rows(tmp_path / "t" / "table1.md")[("mbn", "resnet20")][4] == "+1.00 (n = 1)"


def test_sweep_names_say_what_ran(capsys):
    sweep = script("sweep", module=True)
    assert sweep.default_name(2, ["data=synthetic", "data.train_size=64"]) == "e2-synthetic"
    assert sweep.default_name(30, ["data=cifar10"]) == sweep.default_name(30, []) == "e30"
    assert sweep.main(["table6", "--epochs", "2", "--dry-run", "data=synthetic", "data.train_size=64"]) == 0
    out = capsys.readouterr().out
    assert "name=e2-synthetic" in out and "runs/e2-synthetic" in out
    assert sweep.main(["small_batch", "--protocol", "epochs", "--epochs", "2", "--norms", "bn", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "name=e2 " in out and "norm=bn train.batch_size=2 optim.lr=0.0015625" in out


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
    capsys.readouterr()
    assert make_tables(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "--force" in err
    assert "table6.md is committed and was made from 1 runs" in err
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


def test_table_script_errors_are_one_line():
    r = run_cli("scripts/make_tables.py", "--runs", "/nonexistent", "--tables", "table1", "--out", "/tmp/x")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "no sweep file" in r.stdout
    r = subprocess.run([sys.executable, "scripts/collect_runs.py", "--runs", "/nonexistent"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: no finished runs") and "Traceback" not in r.stderr
