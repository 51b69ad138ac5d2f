"""Sweeps, tables and figures end to end on synthetic data (two seeds, two epochs)."""
import csv
import json
import statistics

import pytest

from mbn.sweeps import expand, grids, multirun_overrides
from tests.conftest import run_cli

TINY = ["data=synthetic", "data.train_size=64", "data.test_size=32", "train.batch_size=32",
        "train.eval_batch_size=32"]


def test_grids_cover_every_cell_the_methods_define():
    g = grids(200)
    runs = [tuple(o) for b in g["table1"].blocks for o in expand(b)]
    assert len(runs) == 4 * 3 + 2  # BN/BRN/MBN on every model (NIN included), NormProp on NIN and VGG
    assert not any("norm=normprop" in r and ("model=resnet20" in r or "model=resnet56" in r) for r in runs)
    t4 = g["table4"].blocks[0]
    assert t4["train.steps"] == [200 * 390] and t4["train.batch_size"] == [8, 16, 32, 64, 128]
    # λ = {0} is BN-1: single forward; the other schedules are MBN-2
    assert multirun_overrides(g["table5"].blocks[0])[-2:] == ["norm.lam=[0.0]", "train.double_forward=false"]
    assert multirun_overrides(g["table5"].blocks[1])[-1] == "norm.lam=choice([0.1],[0.5],[0.9],[0.1,0.5,0.9])"


def read_md_rows(path):
    rows = {}
    for line in open(path, encoding="utf-8"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 4 and cells[3].isdigit():
            rows[cells[0]] = cells
    return rows


def test_sweep_make_tables_and_plots(tmp_path):
    root = tmp_path / "runs"
    r = run_cli("scripts/sweep.py", "table6", "--epochs", "2", "--seeds", "2", "--root", str(root), *TINY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs_dir = root / "e2-synthetic"  # the sweep's name says what it ran
    run_dirs = [d for d in runs_dir.iterdir() if d.is_dir()]
    assert len(run_dirs) == 6 and all((d / "metrics.json").exists() for d in run_dirs)

    # run the same sweep again: everything is already finished and skipped
    r = run_cli("scripts/sweep.py", "table6", "--epochs", "2", "--seeds", "2", "--root", str(root), *TINY)
    assert r.returncode == 0 and r.stdout.count("already finished") == 6

    # the committed copy (metrics and configs only) regenerates the same table
    collected = tmp_path / "collected"
    r = run_cli("scripts/collect_runs.py", "--runs", str(runs_dir), "--out", str(collected))
    assert r.returncode == 0, r.stderr
    assert not list(collected.rglob("*.pt")) and len(list(collected.glob("*/metrics.jsonl"))) == 6
    out = tmp_path / "results"
    r = run_cli("scripts/make_tables.py", "--runs", str(collected), "--out", str(out), "--tables", "table6")
    assert r.returncode == 0, r.stderr
    expected = {}
    for d in run_dirs:
        cfg = json.loads((d / "run_record.json").read_text())["config"]
        expected.setdefault(str(cfg["norm"]["memory_size"]), []).append(
            json.loads((d / "metrics.json").read_text())["test_err"])
    rows = read_md_rows(out / "table6.md")
    assert set(rows) == {"10", "20", "40"}
    for k, errs in expected.items():
        assert len(errs) == 2
        assert rows[k][2] == f"{statistics.fmean(errs):.2f} ± {statistics.stdev(errs):.2f}"
        assert rows[k][3] == "2"
    assert rows["10"][4] == "reference" and rows["20"][4].endswith("(n = 2)")
    with open(out / "table6.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert float(csv_rows[0]["mean"]) == pytest.approx(statistics.fmean(expected["10"]))
    assert "paper" not in csv_rows[0] and "verdict" not in csv_rows[0]
    md = (out / "table6.md").read_text()
    assert "2 epochs (shortened; the paper: 200)" in md and "cpu" in md and "commits" in md
    assert md.startswith("# SYNTHETIC DATA") and "| paper |" not in md  # never compared with the paper
    assert {f"- `{d.name}`" for d in run_dirs} <= set(md.splitlines())  # the runs it was made from


def test_missing_runs_are_missing_not_zero(tmp_path):
    runs_dir = tmp_path / "e2"
    runs_dir.mkdir()
    (runs_dir / "sweep_table1.json").write_text(json.dumps({"table": "table1", "epochs": 2, "seeds": [0, 1],
                                                            "extra": TINY}))
    out = tmp_path / "out"
    r = run_cli("scripts/make_tables.py", "--runs", str(runs_dir), "--out", str(out), "--tables", "table1")
    assert r.returncode == 0, r.stderr
    rows = [line for line in (out / "table1.md").read_text().splitlines() if line.startswith("| ") and "missing" in line]
    assert len(rows) == 14 and all("| 0 |" in line for line in rows)
    assert not any(line.startswith("| bn | resnet20 | 0.00") for line in rows)


def test_figures_from_a_sweep(tmp_path):
    root = tmp_path / "runs"
    r = run_cli("scripts/sweep.py", "figure1", "--epochs", "2", "--seeds", "2", "--norms", "mbn", "--root", str(root),
                *TINY, "model=resnet20")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "results"
    r = run_cli("scripts/plot_curves.py", "--runs", str(root / "e2-synthetic"), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    png = (out / "figure1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_table2_sweep_on_synthetic_cifar100_shapes(tmp_path):
    """CIFAR-100 cannot be downloaded here: its sweep runs on synthetic 100-class data (NIN column
    only, one seed) and the table shows those cells, the rest missing, says why, and is titled
    synthetic."""
    root = tmp_path / "runs"
    r = run_cli("scripts/sweep.py", "table2", "--epochs", "1", "--seeds", "1", "--models", "nin", "--root", str(root),
                *TINY, "data.num_classes=100")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "results"
    r = run_cli("scripts/make_tables.py", "--runs", str(root / "e1-synthetic"), "--out", str(out), "--tables", "table2")
    assert r.returncode == 0, r.stderr
    md = (out / "table2.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    found = {tuple(c.strip().split(" (")[0] for c in line.strip("|").split("|")[:2]): line for line in lines}
    assert len(found) == 14
    for norm in ("normprop", "bn", "brn", "mbn"):
        assert "missing" not in found[(norm, "nin")] and "| 1 |" in found[(norm, "nin")]
    assert "missing" in found[("mbn", "resnet56")] and "29.27" not in md  # synthetic: no paper numbers
    assert md.startswith("# SYNTHETIC DATA") and "CIFAR-100 is downloaded by torchvision" in md
