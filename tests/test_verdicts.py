"""Verdicts on hand-built runs of the paper's schedule (200 epochs; no training): MDE, Holm-adjusted
p-values against a hand computation, a cell whose verdict Holm changes, a zero-width interval,
`diverged k/n`, a refused cross-precision pair, the commits of mixed pairs, NormProp's recipe in its
row label, TOST for Table 6 with its margin; and the scripts' handling of damaged runs (issue 18
#19) and of runs of several schedules (#22)."""
import csv
import json
import math

import pytest

from mbn import UserError
from mbn.results import DamagedFile, load_run, read_sweep, status_of
from tests.test_results import cell_overrides, fake_run, md_rows, script, write_sweep
from tests.test_stats import by_hand, cdf_df2, quantile_df2

from mbn.sweeps import grids

SEEDS = [0, 1, 2]
# (norm, model) -> test errors of seeds 0, 1, 2; None: the seed diverged
TABLE1 = {("bn", "resnet20"): [10.0, 10.2, 9.9], ("mbn", "resnet20"): [9.0, 9.3, 9.1],  # Δ −1.0 −0.9 −0.8
          ("brn", "resnet20"): [10.4, 10.8, 10.7],        # Δ 0.4 0.6 0.8: raw p 0.035, Holm 0.070
          ("bn", "nin"): [8.0, 8.4, 8.1], ("normprop", "nin"): [8.3, 8.1, 8.2],
          ("bn", "vgg16"): [7.0, 7.5, 7.2], ("brn", "vgg16"): [7.1, 7.6, 7.3],   # identical differences
          ("mbn", "vgg16"): [6.5, None, 6.8],
          ("bn", "resnet56"): [7.0, 7.2, 6.9], ("mbn", "resnet56"): [6.3, 6.6, 6.2]}  # seed 2 ran in bf16


@pytest.fixture(scope="module")
def table1(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "e200"
    grid = grids(200)["table1"]
    write_sweep(root, "table1", 200, SEEDS)
    for (norm, model), errs in TABLE1.items():
        for seed, err in zip(SEEDS, errs):
            record = {"perf": {"precision": "fp32"}}
            if (norm, model, seed) == ("mbn", "resnet56", 2):
                record["perf"] = {"precision": "bf16"}
            if (norm, model, seed) == ("mbn", "resnet20", 0):
                record["git"] = {"commit": "fedcba9876543210", "dirty": False}
            metrics = ({"test_err": err, "train_err": err - 2, "train_loss": 0.3, "test_loss": 0.4} if err is not None
                       else {"train_loss": float("nan"), "epoch": 3})
            fake_run(root, cell_overrides(grid, [f"norm={norm}", f"model={model}"], seed, 200), metrics,
                     record=record, status="finished" if err is not None else "diverged")
    out = root.parent / "out"
    assert script("make_tables")(["--runs", str(root), "--out", str(out), "--tables", "table1"]) == 0
    with open(out / "table1.csv", encoding="utf-8") as f:
        rows = {(r["method"].split(" (")[0], r["model"]): r for r in csv.DictReader(f)}
    return (out / "table1.md").read_text(), md_rows(out / "table1.md"), rows


def errors(norm, model):
    return {s: e for s, e in zip(SEEDS, TABLE1[(norm, model)]) if e is not None}


def test_table1_verdicts_on_the_paper_schedule(table1):
    md, rows, csv_rows = table1
    head = next(line for line in md.splitlines() if line.startswith("| method"))
    assert head.endswith("| Δ vs reference (95% CI) | MDE | p Holm (raw) | paper | paper Δ | paper Δ in CI | verdict |")
    assert "No paper Δ" not in md and "Holm–Bonferroni over the cells of this table" in md
    # the tested cells: MBN and BRN on ResNet-20, NormProp on NIN (m = 3); p by hand from t with df = 2
    raw = {}
    for cell in (("mbn", "resnet20"), ("brn", "resnet20"), ("normprop", "nin")):
        n, mean, sd, t = by_hand(errors(*cell), errors("bn", cell[1]))
        raw[cell] = 2 * (1 - cdf_df2(abs(t)))
        assert float(csv_rows[cell]["p"]) == pytest.approx(raw[cell], rel=1e-9)
        assert float(csv_rows[cell]["mde"]) == pytest.approx(quantile_df2(0.975) * sd / math.sqrt(n), rel=1e-9)
    order = sorted(raw, key=raw.get)
    adjusted, running = {}, 0.0
    for i, cell in enumerate(order):
        running = max(running, min(1.0, (3 - i) * raw[cell]))
        adjusted[cell] = running
    for cell, p in adjusted.items():
        assert float(csv_rows[cell]["p_holm"]) == pytest.approx(p, rel=1e-9)
    mbn = rows[("mbn", "resnet20")]
    assert mbn[2:5] == ["9.13 ± 0.15", "3", "7.13 ± 0.15"] and mbn[-1] == "holds"
    assert mbn[7] == f"{adjusted[('mbn', 'resnet20')]:.3g} ({raw[('mbn', 'resnet20')]:.3g})"


def test_holm_changes_a_verdict(table1):
    """BRN − BN on ResNet-20: raw p 0.035 and an interval above 0 ('fails' uncorrected); Holm's 0.070
    leaves it undecided, and the paper's |Δ| (0.23) is below our MDE (0.50): underpowered."""
    _, rows, csv_rows = table1
    brn = csv_rows[("brn", "resnet20")]
    assert float(brn["p"]) < 0.05 < float(brn["p_holm"]) and float(brn["delta_lo"]) > 0
    assert float(brn["paper_delta"]) == pytest.approx(-0.23) and float(brn["mde"]) == pytest.approx(0.497, abs=1e-3)
    assert rows[("brn", "resnet20")][-1] == "underpowered"


def test_zero_width_diverged_and_unpaired_cells(table1):
    md, rows, csv_rows = table1
    brn = rows[("brn", "vgg16")]
    assert brn[5] == "+0.10, zero width: identical differences (n = 3)" and brn[-1] == "zero-width interval"
    assert brn[6] == "—" and brn[-2] == "—"  # no MDE, no interval to hold the paper's Δ
    assert csv_rows[("brn", "vgg16")]["p_holm"] == ""  # not among the tested cells
    mbn = rows[("mbn", "vgg16")]
    assert mbn[2:4] == ["diverged 1/3; the other 2: 6.65 ± 0.21", "3"]
    assert mbn[5] == "no interval: diverged 1/3" and mbn[-1] == "diverged 1/3"
    assert csv_rows[("mbn", "vgg16")]["delta_lo"] == "" and csv_rows[("mbn", "vgg16")]["diverged"] == "1"
    r56 = rows[("mbn", "resnet56")]
    half = 12.706204736 * math.sqrt(0.005) / math.sqrt(2)  # seeds 0, 1: differences −0.7, −0.6
    assert r56[5] == f"-0.65 [{-0.65 - half:+.2f}, {-0.65 + half:+.2f}] (n = 2); not paired: seed 2 (precision bf16 ≠ fp32)"
    assert r56[-1] == "n = 2 (< 3 pairs)"
    assert ("- commits differ between paired runs: mbn × resnet20: 0123456789, fedcba9876 (reference: 0123456789)"
            in md)
    assert "- runs found: 30 (1 diverged)" in md
    assert rows[("normprop (recipe: filter_norm)", "nin")][-1] == "underpowered"


@pytest.mark.parametrize("margin,verdicts", [(None, ("equivalent", "not shown equivalent")),
                                             ("0.1", ("not shown equivalent", "not shown equivalent"))])
def test_table6_equivalence_by_tost(tmp_path, margin, verdicts):
    root = tmp_path / "e200"
    grid = grids(200)["table6"]
    write_sweep(root, "table6", 200, SEEDS)
    errs = {10: [8.0, 8.2, 8.1], 20: [8.05, 8.15, 8.2], 40: [8.5, 8.0, 8.4]}
    for k, values in errs.items():
        for seed, err in zip(SEEDS, values):
            fake_run(root, cell_overrides(grid, [f"norm.memory_size={k}"], seed, 200), {"test_err": err})
    out = tmp_path / "out"
    extra = ["--margin", margin] if margin else []
    assert script("make_tables")(["--runs", str(root), "--out", str(out), "--tables", "table6"] + extra) == 0
    md = (out / "table6.md").read_text()
    m = float(margin or 0.3)
    assert f"two one-sided paired t-tests (TOST) with margin ±{m:g} percentage points" in md
    rows = md_rows(out / "table6.md")
    assert (rows[("20", "mbn")][-1], rows[("40", "mbn")][-1]) == verdicts
    raw = {}
    for k in (20, 40):
        n, mean, sd, _ = by_hand(dict(zip(SEEDS, errs[k])), dict(zip(SEEDS, errs[10])))
        se = sd / math.sqrt(n)
        raw[k] = max(1 - cdf_df2((mean + m) / se), cdf_df2((mean - m) / se))
    with open(out / "table6.csv", encoding="utf-8") as f:
        got = {int(r["memory size"]): r for r in csv.DictReader(f)}
    low, high = sorted(raw, key=raw.get)
    assert float(got[low]["p"]) == pytest.approx(raw[low], rel=1e-9)
    assert float(got[low]["p_holm"]) == pytest.approx(min(1.0, 2 * raw[low]), rel=1e-9)
    assert float(got[high]["p_holm"]) == pytest.approx(max(min(1.0, 2 * raw[low]), raw[high]), rel=1e-9)


def test_a_run_is_diverged_when_metrics_json_says_so_or_a_loss_is_not_finite():
    nan, inf = float("nan"), float("inf")
    assert status_of({"test_err": 9.0, "finished": True}) == "finished"  # recorded before `status` existed
    assert status_of({"status": "diverged", "finished": False, "epoch": 3}) == "diverged"
    assert status_of({"test_err": 89.0, "test_loss": nan, "train_loss": 1.6e10, "finished": True}) == "diverged"
    assert status_of({"test_err": 9.0, "train_loss": inf, "finished": True, "status": "finished"}) == "diverged"
    assert status_of({"finished": False, "status": "preempted"}) == status_of({}) == "partial"


# ------------------------------------------------------------------------------ damaged runs, mixed schedules
def test_damaged_runs_are_named_and_skipped(tmp_path, capsys):
    """Issue 18 #19: a metrics.jsonl whose last line is cut in half, a metrics.json that is not
    JSON and a run record that is not an object: each named in one warning line, the run skipped;
    the table, the figure and the collection are still made from the others."""
    root = tmp_path / "e2"
    grid = grids(2)["table6"]
    extra = ["data=synthetic", "data.train_size=64"]
    for name in ("table6", "figure2"):
        write_sweep(root, name, 2, [0, 1], extra)
    good = fake_run(root, cell_overrides(grid, ["norm.memory_size=10"], 0, 2, extra), {"test_err": 30.0})
    cut = fake_run(root, cell_overrides(grid, ["norm.memory_size=10"], 1, 2, extra), {"test_err": 31.0})
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "test_e')
    bad_summary = fake_run(root, cell_overrides(grid, ["norm.memory_size=20"], 0, 2, extra), {"test_err": 32.0})
    (bad_summary / "metrics.json").write_text('{"test_err": 32.0, "fin')
    bad_record = fake_run(root, cell_overrides(grid, ["norm.memory_size=20"], 1, 2, extra), {"test_err": 33.0})
    (bad_record / "run_record.json").write_text("[1, 2]")
    fake_run(root, cell_overrides(grid, ["norm.memory_size=40"], 0, 2, extra), {"test_err": 34.0}, status="preempted")
    out = tmp_path / "out"
    assert script("make_tables")(["--runs", str(root), "--out", str(out), "--tables", "table6"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("warning: ") and line.endswith("; run skipped") for line in err)
    named = {f"{cut / 'metrics.jsonl'}: line 3 is not JSON (cut short?)",
             f"{bad_summary / 'metrics.json'}: not valid JSON at line 1",
             f"{bad_record / 'run_record.json'}: holds a list, not a JSON dict"}
    assert all(sum(text in line for line in err) == 1 for text in named)
    rows = md_rows(out / "table6.md")
    assert rows[("10", "mbn")][2:4] == ["30.00", "1"] and rows[("20", "mbn")][2] == "missing"
    assert rows[("40", "mbn")][2] == "missing"  # preempted: not finished yet
    collected = tmp_path / "collected"
    assert script("collect_runs")(["--runs", str(root), "--out", str(collected)]) == 0
    assert [p.name for p in collected.iterdir() if p.is_dir()] == [good.name]
    plot = script("plot_curves")
    assert plot(["--runs", str(root), "--out", str(out), "--figures", "figure2"]) == 0  # MBN k = 10: one run
    (root / "sweep_figure2.json").write_text('{"epochs": 2, "seeds": [0')  # a damaged sweep file
    capsys.readouterr()
    with pytest.raises(UserError, match="no figure drawn"):
        plot(["--runs", str(root), "--out", str(out), "--figures", "figure2"])
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {root / 'sweep_figure2.json'}: not valid JSON at line 1 ")
    assert err.endswith("cut short or edited?; figure2 skipped\n") and err.count("\n") == 1


@pytest.mark.parametrize("name,text,says", [
    ("sweep_table1.json", '{"epochs": 0, "seeds": [0], "extra": []}', "'epochs' is missing or not a positive integer"),
    ("sweep_table1.json", '{"epochs": 2, "seeds": "0,1", "extra": []}', "'seeds' is missing or not a list"),
    ("sweep_table1.json", '{"epochs": 2, "seeds": [0]}', "'extra' is missing"),
    ("run/run_record.json", '{"config": "resnet20"}', "'config' is a str, not a dict"),
    ("run/run_record.json", '{"config": {}, "perf": ["bf16"]}', "'perf' is a list, not a dict"),
    ("run/metrics.json", "null", "holds a NoneType, not a JSON dict"),
    ("run/metrics.json", b"\xff\xfe{", "not UTF-8 text")])
def test_damaged_files_of_other_shapes_are_named(tmp_path, capsys, name, text, says):
    """The class of #19: a file that parses but has the wrong shape, or is not text at all."""
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    if name.startswith("sweep"):
        with pytest.raises(DamagedFile, match=f"{path}: .*{says}"):
            read_sweep(str(path))
        return
    assert load_run(str(path.parent)) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and says in err and err.endswith("; run skipped\n")


def test_collect_puts_each_schedule_in_its_own_folder(tmp_path, monkeypatch):
    """Issue 18 #22: runs of 1 and 2 epochs in one folder go to results/runs/e1 and e2 (each with the
    sweep file inferred from its own runs); --out, which names one folder, is refused for them."""
    src = tmp_path / "mixed"
    for epochs in (1, 2):
        grid = grids(epochs)["table1"]
        for norm in ("bn", "mbn"):
            fake_run(src, cell_overrides(grid, [f"norm={norm}", "model=resnet20"], 0, epochs), {"test_err": 10.0})
    collect = script("collect_runs", module=True)
    with pytest.raises(UserError, match=r"2 schedules \(e1, e2\) and --out takes one"):
        collect.main(["--runs", str(src), "--out", str(tmp_path / "one")])
    assert not (tmp_path / "one").exists()
    monkeypatch.setattr(collect, "REPO", str(tmp_path / "repo"))
    assert collect.main(["--runs", str(src)]) == 0
    for epochs in (1, 2):
        folder = tmp_path / "repo" / "results" / "runs" / f"e{epochs}"
        runs = [json.loads((d / "run_record.json").read_text()) for d in folder.iterdir() if d.is_dir()]
        assert len(runs) == 2 and {r["config"]["train"]["epochs"] for r in runs} == {epochs}
        assert json.loads((folder / "sweep_table1.json").read_text())["epochs"] == epochs


def test_collect_copies_diverged_runs_and_leaves_unfinished_ones(tmp_path, capsys):
    """A diverged run belongs in its table (`diverged k/n`): collected with the finished ones; a
    preempted one stays until it has finished."""
    root = tmp_path / "e2"
    grid = grids(2)["table6"]
    extra = ["data=synthetic", "data.train_size=64"]
    write_sweep(root, "table6", 2, [0, 1], extra)
    done = fake_run(root, cell_overrides(grid, ["norm.memory_size=10"], 0, 2, extra), {"test_err": 30.0})
    diverged = fake_run(root, cell_overrides(grid, ["norm.memory_size=10"], 1, 2, extra),
                        {"train_loss": float("nan")}, status="diverged")
    fake_run(root, cell_overrides(grid, ["norm.memory_size=20"], 0, 2, extra), {"test_err": 32.0}, status="preempted")
    out = tmp_path / "collected"
    assert script("collect_runs")(["--runs", str(root), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted([done.name, diverged.name])
    assert "2 runs (1 diverged)" in capsys.readouterr().out


def test_a_figure_draws_finished_runs_only_and_counts_the_diverged(tmp_path):
    import matplotlib.pyplot as plt

    plot = script("plot_curves", module=True)
    finished = {"status": "finished", "dir": str(tmp_path / "a"),
                "history": [{"epoch": 1, "train_err": 40.0, "test_err": 45.0},
                            {"epoch": 2, "train_err": 30.0, "test_err": 35.0}]}
    diverged = {"status": "diverged", "dir": str(tmp_path / "b"),
                "history": [{"epoch": 1, "train_err": 80.0, "test_err": 90.0}]}
    fig = plot.figure2({("resnet20", "mbn"): [finished, diverged]}, grids(2)["figure2"], "title")
    (test,) = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("MBN test")]
    assert test.get_label() == "MBN test (n=1, 1 diverged)"
    assert list(test.get_xdata()) == [1, 2] and list(test.get_ydata()) == [45.0, 35.0]  # the finished run's curve
    plt.close(fig)


def test_figure1_judges_each_methods_gain_from_the_second_forward(tmp_path):
    """Figure 1's claims are X-2 against X-1 (MBN-2 0.30 and BRN-2 0.47 below their single-forward
    runs): each double-forward cell pairs with its own method's single-forward cell, not with BN-1."""
    root = tmp_path / "e200"
    grid = grids(200)["figure1"]
    write_sweep(root, "figure1", 200, SEEDS)
    errs = {("brn", False): [7.0, 7.1, 7.3], ("brn", True): [6.5, 6.7, 6.8], ("bn", False): [9.0, 9.5, 9.9]}
    for (norm, double), values in errs.items():
        for seed, err in zip(SEEDS, values):
            fake_run(root, cell_overrides(grid, [f"norm={norm}", f"train.double_forward={str(double).lower()}"],
                                          seed, 200), {"test_err": err})
    out = tmp_path / "out"
    assert script("make_tables")(["--runs", str(root), "--out", str(out), "--tables", "figure1"]) == 0
    with open(out / "figure1.csv", encoding="utf-8") as f:
        rows = {(r["method"], r["double forward"]): r for r in csv.DictReader(f)}
    brn2 = rows[("brn", "double")]
    assert float(brn2["delta_mean"]) == pytest.approx(-(0.5 + 0.4 + 0.5) / 3, abs=1e-9)  # vs BRN-1, not BN-1
    assert float(brn2["paper_delta"]) == pytest.approx(6.46 - 6.93)
    assert rows[("brn", "single")]["verdict"] == "—" and rows[("bn", "single")]["verdict"] == "—"


def test_table6_says_which_interval_tost_corresponds_to(tmp_path):
    """TOST at 5 % is the 90 % interval inside ±margin; the table shows 95 % intervals, so an
    `equivalent` row may show a 95 % interval that crosses the margin: the header says so."""
    root = tmp_path / "e200"
    grid = grids(200)["table6"]
    write_sweep(root, "table6", 200, SEEDS)
    for k, values in {10: [8.0, 8.2, 8.1], 20: [8.03, 8.32, 8.31]}.items():  # Δ 0.03 0.12 0.21
        for seed, err in zip(SEEDS, values):
            fake_run(root, cell_overrides(grid, [f"norm.memory_size={k}"], seed, 200), {"test_err": err})
    out = tmp_path / "out"
    assert script("make_tables")(["--runs", str(root), "--out", str(out), "--tables", "table6"]) == 0
    md = (out / "table6.md").read_text()
    assert "the 90 % interval — not the 95 % one shown — lies inside ±0.3 pp" in md
    with open(out / "table6.csv", encoding="utf-8") as f:
        row = next(r for r in csv.DictReader(f) if r["memory size"] == "20")
    half90 = 2.919985580 * 0.09 / math.sqrt(3)  # t(0.95, 2): the 90 % interval lies inside ±0.3 ...
    assert 0.12 + half90 < 0.3 < float(row["delta_hi"]) and row["verdict"] == "equivalent"  # ... the 95 % not
